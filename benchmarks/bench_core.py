"""Core benchmark: graph overhead per node transition, its share of a demo run, concurrency of
independent tool calls, and ``medloupe --help`` start-up time. Writes its section of BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_core.py``
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_report import append_section, machine
from pydantic import BaseModel

from medloupe.cli import DEMO_QUESTION, demo_image
from medloupe.config import Settings
from medloupe.graphs.context import ResourceSpec, load_resources
from medloupe.io import load_image
from medloupe.runner import create_run, execute
from medloupe.tools import ToolContext, ToolResult, default_registry, tool
from medloupe.trace import TraceRecorder

ROOT = Path(__file__).resolve().parents[1]


class PauseArgs(BaseModel):
    seconds: float


class Paused(ToolResult):
    seconds: float


@tool(description="sleep (benchmark)")
def pause(args: PauseArgs, ctx: ToolContext) -> Paused:
    time.sleep(args.seconds)
    return Paused(seconds=args.seconds)


def one_run(tmp: Path, *, review: object = None, **options: object) -> tuple[float, list]:
    """One demo run; returns its wall time (ingest, graph, outputs) in ms and its events."""
    settings = Settings(home=tmp / "home")
    t0 = time.perf_counter()
    run = create_run(
        load_image(demo_image()),
        DEMO_QUESTION,
        settings=settings,
        out_dir=tmp / "run",
        options=dict(options),
    )
    registry = default_registry(plugins=False)
    registry.register(pause)
    resources = load_resources(ResourceSpec(), registry=registry)
    asyncio.run(execute(run, settings=settings, resources=resources, review=review))  # type: ignore[arg-type]
    wall = (time.perf_counter() - t0) * 1000.0
    trace = TraceRecorder(run.trace_path)
    events = trace.events()
    trace.close()
    return wall, events


def transition_gaps(events: list) -> tuple[list[float], float]:
    """Milliseconds between each node's end and the next node's start (checkpoint write,
    routing, scheduling), and the graph's whole run time (first node start to last node end)."""
    nodes = [e for e in events if e.kind in ("node_start", "node_end")]
    gaps = [
        (b.ts - a.ts) * 1000.0
        for a, b in itertools.pairwise(nodes)
        if a.kind == "node_end" and b.kind == "node_start"
    ]
    return gaps, (nodes[-1].ts - nodes[0].ts) * 1000.0


def main() -> None:
    overheads, shares, node_shares, instant = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        one_run(Path(d))  # warm-up: lazy imports
    for _ in range(5):
        with tempfile.TemporaryDirectory() as d:
            wall_ms, events = one_run(Path(d))
        gaps, run_ms = transition_gaps(events)
        overheads.append(statistics.mean(gaps))
        shares.append(sum(gaps) / wall_ms)
        node_shares.append(sum(gaps) / run_ms)
    # with instant tools: the reviewer rejects the plan, so no tool runs
    for _ in range(3):
        with tempfile.TemporaryDirectory() as d:
            _, events = one_run(Path(d), review=lambda p: {"action": "reject"}, review_plan=True)
        gaps, _ = transition_gaps(events)
        instant.append(statistics.mean(gaps))

    plan = {
        "calls": [{"tool": "pause", "arguments": {"seconds": 1.0 + i / 1000}} for i in range(3)]
    }
    with tempfile.TemporaryDirectory() as d:
        _, events = one_run(
            Path(d), review=lambda p: {"action": "edit", "plan": plan}, review_plan=True
        )
    act_ms = next(e.duration_ms for e in events if e.kind == "node_end" and e.node == "act")
    assert act_ms is not None

    help_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "medloupe", "--help"], capture_output=True, check=True
        )
        help_s.append(time.perf_counter() - t0)

    rows = [
        (
            "graph overhead per node transition, demo run (checkpoint write + routing + scheduling)",
            f"{statistics.median(overheads):.1f} ms",
            "< 5 ms",
        ),
        (
            "graph overhead per node transition, instant tools (plan rejected, no tool runs)",
            f"{statistics.median(instant):.1f} ms",
            "< 5 ms",
        ),
        (
            "graph overhead as a share of a demo run (ingest, graph and outputs, in process)",
            f"{100 * statistics.median(shares):.1f} %",
            "< 2 %",
        ),
        (
            "graph overhead as a share of the graph's own span (first node start to answer)",
            f"{100 * statistics.median(node_shares):.1f} %",
            "(no VLM: the tools' work is ~150 ms)",
        ),
        (
            "three independent 1-second tools in one plan: act node time",
            f"{act_ms / 1000:.2f} s (ratio to serial 3 s: {act_ms / 3000:.2f})",
            "about 1 s",
        ),
        ("`medloupe --help` start-up (median of 5)", f"{statistics.median(help_s):.2f} s", "< 2 s"),
    ]
    append_section(
        "core graph",
        rows,
        columns=("measure", "result", "goal"),
        context=machine("CPU only"),
    )


if __name__ == "__main__":
    main()
