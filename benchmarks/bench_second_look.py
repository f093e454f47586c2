"""Does the second look help? The shipped medloupe-mini through the whole graph on every dev
item, second look on and off, compared item by item (McNemar's exact test, paired bootstrap
95 % intervals: ``medloupe.evaluation.paired``) overall, per task, source and question type.

    python benchmarks/bench_second_look.py [--limit N] [--seed S]

Writes the "second look on vs off" section of BENCHMARKS.md. Needs ../shared/datasets.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench_report import append_section, machine

from medloupe.evaluation import Ablation, filter_items, load_dataset, run_ablations
from medloupe.evaluation.harness import fmt_value

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
SHOWN = ("overall", "task=", "source=", "question_type=")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    items = filter_items(load_dataset(DATA / "dev.jsonl"), limit=args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(
            run_ablations(
                items,
                Path(tmp),
                grid=(Ablation(), Ablation(rethink=False)),
                seed=args.seed,
                vlm="mini:",
                workers=2,
            )
        )
    on, off = results["full"], results["no-rethink"]
    rows = []
    for d in off["paired"]["differences"]:
        if d["measure"] not in ("accuracy", "mean_iou", "ece") or not d["group"].startswith(SHOWN):
            continue
        # the table reads "on minus off": the paired list is "no-rethink minus full"
        diff = 0.0 - d["difference"] if d["difference"] is not None else None
        lo, hi = (
            (0.0 - d["ci_high"], 0.0 - d["ci_low"]) if d["ci_low"] is not None else (None, None)
        )
        p = "" if d["p_value"] is None else f"; McNemar p {d['p_value']:.3g}"
        flips = "" if d["only_a"] is None else f" (right only on: {d['only_a']}, only off: {d['only_b']})"
        rows.append(
            (
                f"{d['group']}, {d['measure']} ({d['items']} items)",
                f"on {fmt_value(d['a'])}, off {fmt_value(d['b'])}: {fmt_value(diff)} "
                f"[{fmt_value(lo)}, {fmt_value(hi)}]",
                f"{'significant' if d['significant'] else 'not significant'}{p}{flips}",
            )
        )
    rows.append(
        (
            "latency p50 per question, on / off",
            f"{fmt_value(on['runtime']['latency_p50_s'])} s / "
            f"{fmt_value(off['runtime']['latency_p50_s'])} s",
            "whole graph, 2 workers",
        )
    )
    append_section(
        "second look on vs off, medloupe-mini on the dev set",
        rows,
        columns=("group, measure", "on, off: difference [95 % CI]", "test"),
        context=machine(f"VLM mini: (shipped), no KB, bootstrap seed {args.seed}"),
        note=(
            "Each dev item run twice, the second look (crops of the regions the tools found, "
            "the question's named targets first, and the grounder's zoomed second pass at its "
            "top box) on and off; differences are on minus off with "
            "a paired bootstrap 95 % interval (2,000 resamples); McNemar's exact test on the "
            "items right in one setting only. Significant: p < 0.05 and an interval excluding "
            "0. Data: ../shared/datasets/dev.jsonl (VQA-RAD CC0 1.0, SLAKE CC BY 4.0, NIH "
            "ChestX-ray14, BCCD MIT, MIRP CC BY 4.0)."
        ),
    )


if __name__ == "__main__":
    main()
