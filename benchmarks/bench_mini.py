"""medloupe-mini on the development set: train the answerer (seeded, all training data), then
evaluate the VQA items of ``../shared/datasets/dev.jsonl`` through the whole graph with the
second look on and off. Closed accuracy per source against the goals (VQA-RAD >= 0.70, SLAKE
>= 0.78), open accuracy, ECE and latency go to BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_mini.py [--model DIR]`` (about 5 minutes on 2 cores;
``--model`` reuses a trained folder).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench_report import append_section, machine

from medloupe.evaluation import Ablation, Evaluation, filter_items, load_dataset
from medloupe.evaluation.harness import fmt_value, read_records

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"


def closed_by_source(records: list[dict]) -> dict[str, float]:
    out: dict[str, list[bool]] = {}
    for r in records:
        if r["answer_type"] == "closed":
            out.setdefault(r["source"], []).append(bool(r["correct"]))
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="bench-mini-")
    rows = []
    model = args.model
    if model is None:
        from medloupe.mini.train import train_answerer

        model = Path(tmp.name) / "model"
        t0 = time.perf_counter()
        meta = train_answerer(DATA, model)
        held = meta["held_out"]
        rows.append(
            (
                "training (seed 0, all training data)",
                f"{time.perf_counter() - t0:.0f} s; {len(meta['vocab'])} answers; "
                f"held-out accuracy {fmt_value(held['accuracy_in_vocab'])}, closed "
                f"{fmt_value(held['closed_accuracy'])}",
                f"{meta['data']['train_questions']} train / {meta['data']['held_out_questions']} "
                f"held-out questions, {meta['data']['images']} images; epochs {meta['epochs']}, "
                f"temperature {meta['temperature']:.2f}",
            )
        )
        print(rows[-1], flush=True)
    items = filter_items(load_dataset(DATA / "dev.jsonl"), task="vqa")
    for ablation in (Ablation(), Ablation(rethink=False)):
        out = Path(tmp.name) / ablation.name
        m = asyncio.run(
            Evaluation(out, vlm=f"mini:{model}", ablation=ablation, workers=2).run(items)
        )
        records = read_records(out / "items.jsonl")
        closed = closed_by_source(records)
        by_type = m["by"]["answer_type"]
        rows.append(
            (
                f"dev VQA ({len(items)} items), second look {'on' if ablation.rethink else 'off'}",
                ", ".join(f"{k} closed {v:.2f}" for k, v in closed.items())
                + f"; open exact {fmt_value(by_type['open']['accuracy'])}, token recall "
                f"{fmt_value(m['overall'].get('open_token_recall'))}",
                f"goals VQA-RAD >= 0.70, SLAKE >= 0.78; ECE {fmt_value(m['calibration']['ece'])}; "
                f"p50 {fmt_value(m['runtime']['latency_p50_s'])} s per question (whole graph)",
            )
        )
        print(rows[-1], flush=True)
    append_section(
        "medloupe-mini answerer",
        rows,
        context=machine("CPU"),
        note=(
            "Trained on VQA-RAD trainset.json and the SLAKE English train split with every "
            "dev.jsonl image left out; epochs and the temperature chosen on held-out training "
            "images. Dev items are scored as `medloupe eval` scores them. VQA-RAD (CC0 1.0), "
            "SLAKE (CC BY 4.0); backbone EfficientNet-Lite0 ImageNet weights (Apache-2.0)."
        ),
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
