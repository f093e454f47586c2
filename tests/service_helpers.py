"""A real ``medloupe serve`` process on loopback for the service and browser tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m medloupe serve`` in a subprocess, with its own MEDLOUPE_HOME."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.args = args
        self.extra_env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> Server:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MEDLOUPE_HOME": str(self.home), **self.extra_env}
        cmd = [sys.executable, "-m", "medloupe", "serve", "--port", str(self.port), *self.args]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run (a crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def post_run(
    client: httpx.Client,
    image: Path | bytes,
    question: str,
    options: dict[str, Any] | None = None,
    name: str = "image.bin",
) -> httpx.Response:
    data = image.read_bytes() if isinstance(image, Path) else image
    return client.post(
        "/v1/runs",
        files={"image": (name, data, "application/octet-stream")},
        data={"question": question, "options": json.dumps(options or {})},
    )


def sse_events(client: httpx.Client, run_id: str, timeout_s: float = 180.0) -> Iterator[tuple[str, Any]]:
    """(event name, parsed data) of a run's event stream until ``end``."""
    with client.stream("GET", f"/v1/runs/{run_id}/events", timeout=timeout_s) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        name, data = None, []
        for line in resp.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and name is not None:
                yield name, json.loads("\n".join(data)) if data else None
                if name == "end":
                    return
                name, data = None, []


def wait_done(client: httpx.Client, run_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.get(f"/v1/runs/{run_id}").json()
        if info["status"] in ("done", "failed"):
            return info
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not finish in {timeout_s} s")


def blood_smear_png(path: Path) -> Path:
    """A drawn blood smear: pink background, red cells, two purple-stained white cells
    centred at (150, 160) r=30 and (340, 230) r=26 (pixels)."""
    import cv2

    rng = np.random.default_rng(0)
    img = np.full((360, 480, 3), (232, 190, 200), np.uint8)
    for _ in range(60):
        c = (int(rng.integers(10, 470)), int(rng.integers(10, 350)))
        cv2.circle(img, c, 18, (215, 140, 150), -1)
    cv2.circle(img, (150, 160), 30, (95, 45, 140), -1)
    cv2.circle(img, (340, 230), 26, (100, 50, 150), -1)
    img = cv2.GaussianBlur(img, (5, 5), 0)
    cv2.imwrite(str(path), img[:, :, ::-1])
    return path
