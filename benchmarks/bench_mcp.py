"""MCP benchmark, both directions, measured in one run:

- a medloupe tool (``crop`` of a 64x64 PNG) called through ``medloupe mcp serve`` over stdio
  with the official SDK's client, versus the same call on the in-process registry (p50 of
  each, and the added latency);
- an MCP server's tool (tests/tools/mcp_lab_server.py's ``brightness``, over stdio) called by
  medloupe's registry, versus the same function called in process;
- ``diagnose`` over MCP versus ``medloupe.api.ask_async`` in process on the same item (the
  default model, both warm: the second call of each is timed).

Writes its section of BENCHMARKS.md. Run: ``.venv/bin/python benchmarks/bench_mcp.py``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_report import append_section, machine
from PIL import Image

from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings
from medloupe.io.intake import ingest_image, read_input
from medloupe.options import RunOptions
from medloupe.tools import default_registry
from medloupe.tools.base import ToolContext
from medloupe.tools.registry import ToolRegistry

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "tests" / "tools" / "mcp_lab_server.py"
CROP = {"box_xyxy": [8, 8, 40, 40], "zoom_to": 64}


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


async def server_direction(image: Path, n: int, env: dict[str, str]) -> tuple[float, float]:
    """(p50 s through MCP stdio, p50 s in process) of ``crop``."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client

    settings = Settings.from_env()
    registry = default_registry(plugins=False)
    store = ArtifactStore(Path(env["MEDLOUPE_HOME"]) / "inproc", durable=False)
    record = ingest_image(read_input(image, RunOptions(), settings.max_pixels), store)
    ctx = ToolContext(image=record, store=store)
    local = []
    for _ in range(n):
        t0 = time.perf_counter()
        ev = await registry.call("crop", CROP, ctx, default_timeout_s=30)
        local.append(time.perf_counter() - t0)
        assert ev.status == "ok", ev.error
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "medloupe", "mcp", "serve", "--vlm", "none", "--root", str(image.parent)],
        env=env,
    )
    remote = []
    with open(os.devnull, "w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            await client.list_tools()
            for i in range(n + 3):
                t0 = time.perf_counter()
                r = await client.call_tool("crop", {"image_path": str(image), **CROP})
                if i >= 3:  # the first calls warm the image cache
                    remote.append(time.perf_counter() - t0)
                assert not r.is_error, r.content
    return statistics.median(remote), statistics.median(local)


async def client_direction(image: Path, n: int) -> tuple[float, float]:
    """(p50 s of the lab server's tool through medloupe's registry, p50 s of the same
    function in process)."""
    sys.path.insert(0, str(LAB.parent))
    import mcp_lab_server  # type: ignore[import-not-found]

    settings = Settings.from_env()
    registry = ToolRegistry()
    registry.load_mcp_servers(json.dumps([{"name": "lab", "command": [sys.executable, str(LAB)]}]))
    store = ArtifactStore(Path(tempfile.mkdtemp()), durable=False)
    record = ingest_image(read_input(image, RunOptions(), settings.max_pixels), store)
    ctx = ToolContext(image=record, store=store)
    path = str(store.path(record.display_artifact or ""))
    local, remote = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        mcp_lab_server.brightness(path, 128)
        local.append(time.perf_counter() - t0)
    for i in range(n + 3):
        t0 = time.perf_counter()
        ev = await registry.call("lab_brightness", {}, ctx, default_timeout_s=30)
        if i >= 3:
            remote.append(time.perf_counter() - t0)
        assert ev.status == "ok", ev.error
    return statistics.median(remote), statistics.median(local)


async def diagnose_vs_ask(item: Path, question: str, env: dict[str, str]) -> tuple[float, float]:
    """(seconds of diagnose over MCP, seconds of ask in process), each its second call."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client

    from medloupe.api import ask_async

    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        await ask_async(item, question)
        times.append(time.perf_counter() - t0)
    local = times[-1]
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "medloupe", "mcp", "serve", "--root", str(item.parent)],
        env=env,
    )
    with open(os.devnull, "w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                r = await client.call_tool("diagnose", {"image_path": str(item), "question": question})
                times.append(time.perf_counter() - t0)
                assert not r.is_error, r.content
    return times[-1], local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    from pydicom.data import get_testdata_file

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["MEDLOUPE_HOME"] = str(tmp / "home")
        env = {**os.environ}
        image = tmp / "small.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(image)
        s_remote, s_local = asyncio.run(server_direction(image, args.calls, env))
        c_remote, c_local = asyncio.run(client_direction(image, args.calls))
        item = Path(get_testdata_file("CT_small.dcm"))
        d_mcp, d_local = asyncio.run(diagnose_vs_ask(item, "Is this a CT image?", env))
    added_s = (s_remote - s_local) * 1000
    added_c = (c_remote - c_local) * 1000
    rows = [
        (
            f"medloupe `crop` (64x64 PNG) through `mcp serve` stdio vs in process, p50 of {args.calls}",
            f"{s_remote * 1000:.2f} ms vs {s_local * 1000:.2f} ms: +{added_s:.2f} ms",
            "<= 5 ms added",
        ),
        (
            f"an MCP server's tool through medloupe's registry vs the function in process, p50 of {args.calls}",
            f"{c_remote * 1000:.2f} ms vs {c_local * 1000:.2f} ms: +{added_c:.2f} ms",
            "<= 5 ms added",
        ),
        (
            "`diagnose` over MCP vs `ask` in process (CT_small.dcm, medloupe-mini, warm)",
            f"{d_mcp:.2f} s vs {d_local:.2f} s ({d_mcp / d_local:.2f}x)",
            "",
        ),
    ]
    append_section(
        "MCP: tool calls and diagnose over stdio",
        rows,
        columns=("measure", "result", "goal"),
        context=machine(f"mcp {_mcp_version()}"),
        note="Added latency: the MCP path's p50 minus the in-process p50, measured in one run. "
        "The served call includes reading and hashing the image file named by `image_path` "
        "(its decode is cached by content).",
    )


def _mcp_version() -> str:
    from importlib.metadata import version

    return version("mcp")


if __name__ == "__main__":
    main()
