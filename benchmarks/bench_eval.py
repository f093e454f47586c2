"""Full evaluation of the development set (``../shared/datasets/dev.jsonl``) with the ablation
grid (full, no tools, no retrieval, no rethink): one comparison table, plus the full setting's
breakdown by task, into BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_eval.py [--vlm SPEC] [--kb default] [--workers 2]``
(no VLM: about 10 minutes on 2 CPU cores). Never point it at a test split to tune anything.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench_report import append_section, machine

from medloupe.evaluation import load_dataset, run_ablations
from medloupe.evaluation.harness import fmt_value

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "datasets" / "dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vlm", default=None)
    parser.add_argument("--kb", default="default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    if not DEV.is_file():
        raise SystemExit(f"{DEV} is absent; nothing to evaluate")
    items = load_dataset(DEV)
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-eval-")
        out = Path(tmp.name)
    results = asyncio.run(run_ablations(items, out, vlm=args.vlm, kb=args.kb, workers=args.workers))
    rows = []
    for name, m in results.items():
        o, rt = m["overall"], m["runtime"]
        rows.append(
            (
                name,
                f"accuracy {fmt_value(o['accuracy'])}, answered {o['answered']}/{o['items']} "
                f"(accuracy {fmt_value(o['accuracy_answered'])}), count exact "
                f"{fmt_value(o.get('count_exact'))}, IoU>=0.5 {fmt_value(o.get('grounding_hit_rate'))}",
                f"ECE {fmt_value(m['calibration']['ece'])}; {rt['tool_calls']} tool calls, "
                f"failure rate {fmt_value(rt['tool_failure_rate'])}; p50 {fmt_value(rt['latency_p50_s'])} s, "
                f"p95 {fmt_value(rt['latency_p95_s'])} s",
            )
        )
    for task, g in results["full"]["by"]["task"].items():
        rows.append(
            (
                f"full, task {task} ({g['items']} items)",
                f"accuracy {fmt_value(g['accuracy'])}, abstained {fmt_value(g['abstention_rate'])}",
                "",
            )
        )
    append_section(
        "evaluation, dev set with ablations",
        rows,
        columns=("setting", "result", "notes"),
        context=machine(f"VLM {args.vlm or 'none'}, KB {args.kb or 'none'}"),
        note=(
            "Every item is a fresh run (its own thread, registry and trace). Abstentions count "
            "as wrong in `accuracy`; `answered` leaves them out. Without a VLM (the default here; "
            "`--vlm mini:` for medloupe-mini) the graph answers only what its instruments state "
            "outright (white-cell counts, grounder boxes, markers), so most items abstain by "
            "design. Data: ../shared/datasets/dev.jsonl (see each source's licence)."
        ),
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
