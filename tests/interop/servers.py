"""Start real third-party servers (vLLM, transformers serve, langgraph dev, medloupe serve-vlm)
on loopback for the interop tests, and stop them (the whole process group) after."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@contextmanager
def running(
    cmd: list[str],
    *,
    ready: str,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    timeout_s: float = 240.0,
) -> Iterator[Server]:
    """Run ``cmd`` in its own process group until ``ready`` (a URL) answers 200; yield; stop
    it. A server that exits or never gets ready fails the test with its log's tail."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(url=ready.rsplit("/", 1)[0], process=proc, log=log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited with {proc.returncode}:\n{server.output()[-4000:]}")
            try:
                if httpx.get(ready, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{' '.join(cmd[:3])} not ready in {timeout_s:.0f} s:\n"
                            f"{server.output()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


def vllm_python() -> Path:
    """The vLLM venv's python (``MEDLOUPE_VLLM_PYTHON`` or ``.venv-vllm``); the test skips,
    loudly, when it is absent (``.ci/run`` builds it with ``.ci/vllm-env``)."""
    path = Path(os.environ.get("MEDLOUPE_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    problem = None if path.is_file() else f"no vLLM venv at {path}"
    if problem is None and not _imports_vllm(str(path)):
        problem = f"the venv of {path} has no working vllm (a build that stopped half way?)"
    if problem:
        msg = (f"SKIPPED LOUDLY: {problem}; build it with `.ci/vllm-env` "
               "(.ci/run does) or set MEDLOUPE_VLLM_PYTHON")
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    return path


@functools.cache
def _imports_vllm(python: str) -> bool:
    done = subprocess.run(
        [python, "-c", "import vllm"], env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},
        capture_output=True, timeout=300,
    )
    return done.returncode == 0


def vllm_command(model: Path, port: int, *extra: str) -> list[str]:
    """The documented CPU recipe (README, "Serving with vLLM")."""
    return [
        str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny",
        "--dtype", "float32", "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port),
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
        *extra,
    ]


VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
