"""medloupe-mini on the development set: the VQA items of ``../shared/datasets/dev.jsonl``
through the whole graph with the second look on and off (closed accuracy per source against
the goals VQA-RAD >= 0.70, SLAKE >= 0.85; open accuracy; ECE; latency), and the grounding items
(hit rate at IoU >= 0.5 per source, SLAKE organs and lesions against the goals 0.6 and 0.3),
with the second look on (the grounder's zoomed second pass) and off (paired), to BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_mini.py`` measures the model shipped in the package;
``--train`` retrains it first into a temporary folder (seed 0, all training data; reports the
training time) and measures that; ``--model DIR`` measures a trained folder. ``--card`` also
writes the dev-set table into the measured folder's ``MODEL_CARD.md`` (its "Dev-set metrics"
section).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from bench_report import append_section, machine

from medloupe.evaluation import Ablation, Evaluation, filter_items, load_dataset
from medloupe.evaluation.harness import fmt_value, read_records
from medloupe.evaluation.paired import paired_differences
from medloupe.mini import BUNDLED

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
# SLAKE detection labels that are lesions or findings; the rest are organs
LESIONS = {
    "atelectasis", "brain edema", "brain enhancing tumor", "brain non-enhancing tumor",
    "cardiomegaly", "effusion", "infiltrate", "liver cancer", "lung cancer", "mass", "nodule",
    "pneumonia", "pneumothorax",
}  # fmt: skip


def closed_by_source(records: list[dict]) -> dict[str, float]:
    out: dict[str, list[bool]] = {}
    for r in records:
        if r["answer_type"] == "closed":
            out.setdefault(r["source"], []).append(bool(r["correct"]))
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def rate(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.2f} ({sum(flags)}/{len(flags)})" if flags else "-"


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine paths in reports)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--train", action="store_true", help="retrain first (seed 0)")
    parser.add_argument("--card", action="store_true", help="write the dev table into the card")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="bench-mini-")
    rows = []
    model = args.model or BUNDLED
    if args.train:
        from medloupe.mini.train import train_mini

        model = Path(tmp.name) / "model"
        t0 = time.perf_counter()
        meta, grounder = train_mini(DATA, model)
        held, gheld = meta["held_out"], grounder["held_out"]
        rows.append(
            (
                "training (seed 0, all training data)",
                f"{time.perf_counter() - t0:.0f} s in all; answerer {meta['train_seconds']:.0f} s, "
                f"{len(meta['vocab'])} answers, held-out accuracy "
                f"{fmt_value(held['accuracy_in_vocab'])} (closed "
                f"{fmt_value(held['closed_accuracy'])}); grounder "
                f"{grounder['train_seconds']:.0f} s, held-out hit rate "
                f"{fmt_value(gheld['hit_rate_iou50'])} (prior alone "
                f"{fmt_value(gheld['prior_only_hit_rate'])})",
                f"goal: at most 30 min on 2 cores; answerer {meta['data']['train_questions']} "
                f"train questions, grounder {grounder['data']['train_targets']} train targets",
            )
        )
        print(rows[-1], flush=True)
    os.environ["MEDLOUPE_MINI"] = str(model)  # the ground tool's weights
    vlm = f"mini:{model}"
    dev = load_dataset(DATA / "dev.jsonl")
    items = filter_items(dev, task="vqa")
    for ablation in (Ablation(), Ablation(rethink=False)):
        out = Path(tmp.name) / ablation.name
        m = asyncio.run(Evaluation(out, vlm=vlm, ablation=ablation, workers=2).run(items))
        records = read_records(out / "items.jsonl")
        closed = closed_by_source(records)
        by_type = m["by"]["answer_type"]
        rows.append(
            (
                f"dev VQA ({len(items)} items), second look {'on' if ablation.rethink else 'off'}",
                ", ".join(f"{k} closed {v:.2f}" for k, v in closed.items())
                + f"; open exact {fmt_value(by_type['open']['accuracy'])}, token recall "
                f"{fmt_value(m['overall'].get('open_token_recall'))}",
                f"goals VQA-RAD >= 0.70, SLAKE >= 0.85; ECE {fmt_value(m['calibration']['ece'])}; "
                f"p50 {fmt_value(m['runtime']['latency_p50_s'])} s per question (whole graph)",
            )
        )
        print(rows[-1], flush=True)
    grounding = filter_items(dev, task="grounding")
    runs = {}
    for name, ablation in (("coarse", Ablation(rethink=False)), ("refined", Ablation())):
        out = Path(tmp.name) / f"grounding-{name}"
        m = asyncio.run(Evaluation(out, vlm=vlm, ablation=ablation, workers=2).run(grounding))
        runs[name] = (m, read_records(out / "items.jsonl"))
    for name, (m, records) in runs.items():
        if name == "coarse" and not (Path(model) / "refiner.pt").is_file():
            continue  # no second pass in this model: one run says it all
        by_source: dict[str, list[bool]] = {}
        organs, lesions, ious = [], [], []
        for r in records:
            by_source.setdefault(r["source"], []).append(bool(r["correct"]))
            ious.append(r.get("iou") or 0.0)
            if r["source"] == "slake":
                kind = lesions if str(r["truth"]).lower() in LESIONS else organs
                kind.append(bool(r["correct"]))
        rows.append(
            (
                f"dev grounding ({len(grounding)} items), IoU >= 0.5 of the answer's first box, "
                + (
                    "second look off (coarse boxes)"
                    if name == "coarse"
                    else "second look on (the zoomed second pass)"
                ),
                f"SLAKE organs {rate(organs)}, SLAKE lesions {rate(lesions)}; "
                + ", ".join(f"{k} {rate(v)}" for k, v in sorted(by_source.items())),
                f"goals SLAKE organs >= 0.6, lesions >= 0.3; mean IoU {statistics.mean(ious):.2f}; "
                f"ECE {fmt_value(m['calibration']['ece'])}; p50 "
                f"{fmt_value(m['runtime']['latency_p50_s'])} s per question (whole graph)",
            )
        )
        print(rows[-1], flush=True)
    if (Path(model) / "refiner.pt").is_file():
        diffs = {
            (d.group, d.measure): d
            for d in paired_differences(runs["coarse"][1], runs["refined"][1])
            if d.group in ("overall", "source=slake") and d.measure in ("accuracy", "mean_iou")
        }
        rows.append(
            (
                "dev grounding: second look on minus off, paired",
                "; ".join(
                    f"{g} {meas} {d.difference:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"
                    + (
                        f" (McNemar p {d.p_value:.2g}, {d.only_b} gained / {d.only_a} lost)"
                        if d.p_value is not None
                        else ""
                    )
                    for (g, meas), d in sorted(diffs.items())
                ),
                "significant where p < 0.05 and the interval excludes 0: "
                + (
                    ", ".join(f"{g} {m}" for (g, m), d in sorted(diffs.items()) if d.significant)
                    or "none"
                ),
            )
        )
        print(rows[-1], flush=True)
    if args.card:
        write_card_metrics(model / "MODEL_CARD.md", rows)
    append_section(
        "medloupe-mini (answerer + grounder)",
        rows,
        context=machine("CPU"),
        note=(
            f"Model: {'retrained by this run' if args.train else shown_path(model)}. Answerer trained on "
            "VQA-RAD trainset.json and the SLAKE English train split; grounder on SLAKE "
            "train-split images (none its test split uses), the NIH ChestX-ray14 sample boxes and "
            "BCCD's train list; every dev.jsonl image left out of both; epochs, thresholds and "
            "calibration chosen on held-out training images. Dev items scored as `medloupe eval` "
            "scores them; on white-cell items the classical count_cells boxes answer (the "
            "composer prefers them). VQA-RAD (CC0 1.0), SLAKE (CC BY 4.0), NIH ChestX-ray14 "
            "(NIH, unrestricted with citation), BCCD (MIT); backbone EfficientNet-Lite0 ImageNet "
            "weights (Apache-2.0)."
        ),
    )
    tmp.cleanup()


def write_card_metrics(card: Path, rows: list[tuple[str, str, str]]) -> None:
    """Replace the card's "Dev-set metrics" section with this run's dev rows."""
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    table = "\n".join(
        ["| measure | result | notes |", "|---|---|---|"]
        + [f"| {a} | {b} | {c} |" for a, b, c in rows if a.startswith("dev ")]
    )
    section = (
        f"## Dev-set metrics\nMeasured {stamp} by `benchmarks/bench_mini.py` on "
        "`../shared/datasets/dev.jsonl` (never trained or tuned on), whole graph, CPU:\n\n"
        f"{table}\n\n"
    )
    text = card.read_text(encoding="utf-8")
    text = re.sub(r"## Dev-set metrics\n.*?(?=\n## |\Z)", section.rstrip() + "\n", text,
                  flags=re.S)  # fmt: skip
    card.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
