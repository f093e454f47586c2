"""VLM serving benchmark with the tiny random-weight Qwen2.5-VL (real architecture):

- requests per second and p95 latency of ``medloupe serve-vlm`` at 1, 4 and 16 concurrent
  clients (OpenAI-compatible backend over loopback HTTP);
- overhead of the HTTP path over calling the same transformers backend in process, for a
  20-token answer about one image (ratio of medians);
- image encoding cost per crop (PNG data URI on the client, decode on the server).

The server runs as a separate process (``medloupe serve-vlm``), as in production. With a GPU
the same numbers are taken with the model on CUDA (``--device cuda``). Writes its section of
BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_vlm.py``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from bench_report import append_section, machine

from medloupe.agents.hf_backend import TransformersBackend
from medloupe.agents.images import store_data_uri
from medloupe.agents.openai_backend import OpenAIBackend
from medloupe.agents.protocol import ChatMessage, ImagePart, TextPart
from medloupe.artifacts import ArtifactStore
from medloupe.testing.tiny_model import build_tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[1]
ANSWER_TOKENS = 20


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def gpu_name() -> str:
    import torch

    return f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def messages(store: ArtifactStore, seed: int) -> list[ChatMessage]:
    rng = np.random.default_rng(seed)
    crop = store.put_png(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8), kind="crop")
    return [
        ChatMessage(
            role="user",
            content=[ImagePart(artifact=crop), TextPart(text="Describe the region briefly.")],
        )
    ]


async def timed(backend: object, msgs: list[ChatMessage], store: ArtifactStore) -> float:
    t0 = time.perf_counter()
    gen = await backend.generate(msgs, store=store, max_tokens=ANSWER_TOKENS)  # type: ignore[attr-defined]
    assert gen.usage.completion_tokens == ANSWER_TOKENS, gen.usage
    return (time.perf_counter() - t0) * 1000.0


async def sequential(backend: object, store: ArtifactStore, n: int) -> list[float]:
    return [await timed(backend, messages(store, i), store) for i in range(n)]


async def concurrent(
    backend: OpenAIBackend, store: ArtifactStore, clients: int, total: int
) -> tuple[float, list[float]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    latencies: list[float] = []
    prepared = {i: messages(store, i % 8) for i in range(total)}

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            latencies.append(await timed(backend, prepared[i], store))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return total / (time.perf_counter() - t0), latencies


def caller_threads(backend: TransformersBackend, store: ArtifactStore, n: int, total: int) -> float:
    """Requests/s when ``n`` threads call the in-process backend at once (no HTTP)."""
    from concurrent.futures import ThreadPoolExecutor

    prepared = [messages(store, i % 8) for i in range(total)]
    with ThreadPoolExecutor(n) as pool:
        t0 = time.perf_counter()
        list(
            pool.map(
                lambda m: backend.complete_sync(m, store=store, max_tokens=ANSWER_TOKENS), prepared
            )
        )
        return total / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if present)")
    parser.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = Path(args.model) if args.model else build_tiny_qwen2_5_vl(tmp / "tiny")
        text = json.loads((model_dir / "config.json").read_text()).get("text_config") or {}
        shape = (
            f"{text.get('num_hidden_layers', '?')} layers, hidden {text.get('hidden_size', '?')}"
        )
        store = ArtifactStore(tmp / "store")
        local = TransformersBackend(str(model_dir), device=args.device)

        # image encoding cost per crop (client PNG data URI, server decode)
        client = OpenAIBackend("http://127.0.0.1:1/v1", "x")
        rng = np.random.default_rng(1)
        crop = store.put_png(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), kind="crop")
        scratch = ArtifactStore(tmp / "server-scratch", durable=False)
        enc, dec = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            uri = client.encode_image(store, crop)
            enc.append((time.perf_counter() - t0) * 1000.0)
            t0 = time.perf_counter()
            store_data_uri(scratch, uri)
            dec.append((time.perf_counter() - t0) * 1000.0)

        # in process
        asyncio.run(sequential(local, store, 3))  # warm-up (load, first kernels)
        in_proc = asyncio.run(sequential(local, store, 20))
        threaded = {n: caller_threads(local, store, n, max(24, 3 * n)) for n in (1, 4, 16)}

        # served in a separate process
        port = free_port()
        env = dict(os.environ)
        if args.device:
            env["MEDLOUPE_HF_DEVICE"] = args.device
        server = subprocess.Popen(
            [sys.executable, "-m", "medloupe", "serve-vlm", str(model_dir), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}/v1"
            deadline = time.monotonic() + 300
            while True:
                try:
                    httpx.get(f"{base}/models", timeout=1).raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("serve-vlm did not start") from None
                    time.sleep(0.3)
            remote = OpenAIBackend(base, None, max_concurrency=16)

            async def http_runs() -> tuple[list[float], dict[int, tuple[float, list[float]]]]:
                await sequential(remote, store, 3)
                seq = await sequential(remote, store, 20)
                conc = {}
                for c in (1, 4, 16):
                    conc[c] = await concurrent(remote, store, c, max(16, 4 * c))
                await remote.aclose()
                return seq, conc

            over_http, conc = asyncio.run(http_runs())
        finally:
            server.terminate()
            server.wait(timeout=30)

    device = local.device_name or (
        "cuda" if local.loaded and "cuda" in str(local._model.device) else "cpu"
    )
    ratio = statistics.median(over_http) / statistics.median(in_proc)
    rows = [
        (
            f"in-process transformers backend, {ANSWER_TOKENS}-token answer about a 224x224 crop "
            "(median of 20)",
            f"{statistics.median(in_proc):.0f} ms",
            "",
        ),
        (
            "same through `serve-vlm` + OpenAI-compatible backend over loopback HTTP (median of 20)",
            f"{statistics.median(over_http):.0f} ms",
            "",
        ),
        ("HTTP path / in process", f"{ratio:.2f}x", "< 1.2x"),
        (
            "in process, 1 / 4 / 16 caller threads: requests/s",
            " / ".join(f"{threaded[n]:.1f}" for n in (1, 4, 16)),
            "",
        ),
    ]
    for c, (rps, lat) in conc.items():
        rows.append(
            (
                f"served endpoint, {c} concurrent client(s): requests/s, p95 latency",
                f"{rps:.1f} req/s, p95 {p95(lat):.0f} ms",
                "",
            )
        )
    rows.append(
        (
            "image encoding per 512x512 crop: PNG data URI (client) / check + store (server), median",
            f"{statistics.median(enc):.1f} ms / {statistics.median(dec):.1f} ms",
            "",
        )
    )
    append_section(
        "VLM serving, tiny random-weight Qwen2.5-VL",
        rows,
        columns=("measure", "result", "goal"),
        context=machine(f"model on {device}{gpu_name()}"),
        note=(
            f"The tiny model ({shape}) makes generation cheap, so the HTTP share is "
            "shown at its largest; with a real 3B-7B model the same fixed per-request cost is a "
            "far smaller fraction. Generation is serialised per model, so requests/s stays flat "
            "as clients are added while p95 latency grows with the queue."
        ),
    )


if __name__ == "__main__":
    main()
