"""Relative-position questions on MIRP's preview ("Your other Left", ``../shared/datasets/
mirp_sample``): every QA file (RQ1 organ names; RQ2 names with markers; RQ3 and the ablation
study markers only; dots, letters, numbers), read by ``medloupe eval``'s MIRP loader, through
the whole graph with the default model, against the goal 0.8; accuracy, answered share and
ECE per set, to BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_relative.py``. Nothing is trained or tuned on these
items; dev.jsonl's five relative-position items are RQ1 items of this preview.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench_report import append_section, machine

from medloupe.evaluation import Evaluation, load_dataset
from medloupe.evaluation.harness import fmt_value, read_records
from medloupe.evaluation.metrics import calibration

ROOT = Path(__file__).resolve().parents[1]
MIRP = ROOT.parent / "shared" / "datasets" / "mirp_sample" / "1_dataset_guide"


def main() -> None:
    files = sorted(MIRP.glob("*/qa*.json"))
    if not files:
        raise SystemExit(f"no MIRP QA files under {MIRP} (see ../shared/README)")
    items = [i for f in files for i in load_dataset(f)]
    with tempfile.TemporaryDirectory(prefix="bench-relative-") as tmp:
        t0 = time.perf_counter()
        m = asyncio.run(Evaluation(Path(tmp) / "eval", workers=2).run(items))
        seconds = time.perf_counter() - t0
        records = read_records(Path(tmp) / "eval" / "items.jsonl")
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r["question_type"]), []).append(r)
        groups.setdefault("all", []).append(r)
    rows = []
    for name in ["all", *sorted(g for g in groups if g != "all")]:
        rs = groups[name]
        right = sum(bool(r["correct"]) for r in rs)
        answered = [r for r in rs if not r.get("abstained") and not r.get("error")]
        wrong = sum(not r["correct"] for r in answered)
        rows.append(
            (
                f"MIRP {name} ({len(rs)} items)",
                f"accuracy {right / len(rs):.2f} ({right}/{len(rs)}); answered "
                f"{len(answered) / len(rs):.2f}, wrong when answered {wrong}",
                ("goal >= 0.8; " if name == "all" else "")
                + f"ECE {fmt_value(calibration(rs)['ece'])}",
            )
        )
    rows.append(
        (
            "time",
            f"{seconds:.0f} s for {len(items)} questions",
            f"p50 {fmt_value(m['runtime']['latency_p50_s'])} s per question (whole graph, "
            "2 workers)",
        )
    )
    append_section(
        "relative position: MIRP preview",
        rows,
        context=machine("CPU, medloupe-mini, no KB"),
        note=(
            "All QA files of MIRP's 10-case preview (github.com/Wolfda95/MIRP_Benchmark, "
            "1_dataset_guide, CC BY 4.0; slices from AMOS and BTCV), 10 questions each, scored "
            "as `medloupe eval` scores closed items (an abstention counts as wrong). Names: "
            "the grounder's two boxes decide, and it abstains on structures it was not trained "
            "on (aorta, pancreas, prostate, iliopsoas, gallbladder); markers: `find_markers` "
            "(dots by hue, labels by RapidOCR). Left and right as the slice is shown."
        ),
    )


if __name__ == "__main__":
    main()
