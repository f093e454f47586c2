"""Expert-tools benchmark:

- SAM embedding cache: a second box prompt on the same image against the first (which runs
  the image encoder), with a ViT-B-sized SAM (random weights: timing only); goal >= 10x;
- the classical segmenter against the SLAKE organ masks of ``../shared/datasets/dev.jsonl``
  (box prompt = the ground-truth box; ground truth = the mask colour that fills most of the
  box, inside the box), Dice per modality next to the Dice of the box itself; the same for
  each SAM/MedSAM model whose checkpoint is on this machine;
- the classical white-cell counter on the BCCD dev items: count exact match and mean absolute
  error (with the "always 1" baseline), and box hits (IoU >= 0.5) on the WBC grounding items.

Writes its section of BENCHMARKS.md. Run: ``.venv/bin/python benchmarks/bench_tools.py``
(about 2 minutes on 2 CPU cores; ``--device cuda`` times the SAM encoder on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from bench_report import append_section, machine
from PIL import Image

from medloupe.tools.cells import detect_wbc
from medloupe.tools.classical import ClassicalSegmenter
from medloupe.tools.sam import SAM_MODELS, SamEngine, SamModelSpec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"


def cache_speedup(device: str, repeats: int) -> tuple[str, str, str]:
    import data_store

    spec = SamModelSpec(**{**SAM_MODELS["sam_vit_b"].__dict__, "weights": None})
    engine = SamEngine(spec, device=device)
    engine.load()
    ct = Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"
    from medloupe.io import load_image

    rgb = load_image(ct).display
    rgb = rgb if rgb.ndim == 3 else np.repeat(rgb[..., None], 3, axis=2)
    firsts, seconds = [], []
    box = [(150, 150, 350, 350)]
    for i in range(repeats):
        img = rgb.copy()
        img[0, 0, 0] = i  # a new image each round: the first prompt must encode it
        t0 = time.perf_counter()
        engine.set_image(img).predict(boxes=box)
        t1 = time.perf_counter()
        engine.set_image(img).predict(boxes=box)
        t2 = time.perf_counter()
        firsts.append(t1 - t0)
        seconds.append(t2 - t1)
    f, s = statistics.median(firsts), statistics.median(seconds)
    return (
        f"SAM embedding cache, ViT-B-sized encoder on {device}, 512x512 CT, {repeats} images",
        f"first prompt {f * 1000:.0f} ms, second {s * 1000:.1f} ms: {f / s:.0f}x",
        f"goal >= 10x; encoder runs {engine.encoder_runs} for {2 * repeats} prompts",
    )


def slake_items() -> list[dict]:
    items = [json.loads(line) for line in (DATA / "dev.jsonl").open()]
    return [i for i in items if i.get("mask")]


def ground_truth(item: dict) -> np.ndarray:
    labels = np.asarray(Image.open(DATA / item["mask"]).convert("RGB"))
    x0, y0, x1, y1 = (round(v) for v in item["boxes_xyxy"][0])
    sub = labels[y0:y1, x0:x1].reshape(-1, 3)
    sub = sub[(sub != 0).any(1)]
    colours, counts = np.unique(sub, axis=0, return_counts=True)
    truth = (labels == colours[counts.argmax()]).all(-1)
    inside = np.zeros_like(truth)
    inside[y0:y1, x0:x1] = True
    return truth & inside


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def segmentation_rows(device: str) -> list[tuple[str, str, str]]:
    segmenters: dict[str, object] = {"classical": ClassicalSegmenter()}
    for name, spec in SAM_MODELS.items():
        engine = SamEngine(spec, device=device)
        if engine.weights_present():
            segmenters[name] = engine
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    times: dict[str, list[float]] = defaultdict(list)
    skipped = []
    for item in slake_items():
        if item["modality"] == "X-Ray":
            skipped.append(item["id"])
            continue
        rgb = np.asarray(Image.open(DATA / item["image"]).convert("RGB"))
        truth = ground_truth(item)
        box = item["boxes_xyxy"][0]
        x0, y0, x1, y1 = (round(v) for v in box)
        whole = np.zeros_like(truth)
        whole[y0:y1, x0:x1] = True
        scores["box itself"][item["modality"]].append(dice(whole, truth))
        for name, seg in segmenters.items():
            t0 = time.perf_counter()
            (pred,) = seg.set_image(rgb).predict(boxes=[box])  # type: ignore[attr-defined]
            times[name].append(time.perf_counter() - t0)
            scores[name][item["modality"]].append(dice(pred.mask, truth))
    rows = []
    for name, by_mod in scores.items():
        parts = [
            f"{mod} {statistics.mean(v):.3f} (n={len(v)})" for mod, v in sorted(by_mod.items())
        ]
        every = [x for v in by_mod.values() for x in v]
        note = (
            f"median {statistics.median(times[name]) * 1000:.0f} ms per image"
            if name in times
            else "baseline: the prompt box as the mask"
        )
        rows.append(
            (
                f"Dice vs SLAKE organ masks, {name}",
                f"{', '.join(parts)}; all {statistics.mean(every):.3f}",
                note,
            )
        )
    rows.append(
        (
            "SLAKE X-ray items",
            f"{len(skipped)} not scored",
            "their mask files are grayscale pictures, not organ label maps",
        )
    )
    return rows


def iou(a: list[float], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def cell_rows() -> list[tuple[str, str, str]]:
    items = [json.loads(line) for line in (DATA / "dev.jsonl").open()]
    bccd = [i for i in items if i["source"] == "bccd"]
    exact, errors, base_exact, base_err = [], [], [], []
    hits, ious = [], []
    for item in bccd:
        rgb = np.asarray(Image.open(DATA / item["image"]).convert("RGB"))
        cells = detect_wbc(rgb)
        if item["task"] == "count":
            truth = int(item["answer"])
            exact.append(len(cells) == truth)
            errors.append(abs(len(cells) - truth))
            base_exact.append(truth == 1)
            base_err.append(abs(1 - truth))
        else:
            best = max((iou(b, c.box_xyxy) for b in item["boxes_xyxy"] for c in cells), default=0.0)
            hits.append(best >= 0.5)
            ious.append(best)
    # the BCCD validation split (not the test split): more images than the dev items
    import xml.etree.ElementTree as ET

    voc = DATA / "bccd" / "BCCD"
    val_exact, val_err, val_base = [], [], []
    for name in (voc / "ImageSets" / "Main" / "val.txt").read_text().split():
        tree = ET.parse(voc / "Annotations" / f"{name}.xml")
        truth = sum(
            1 for o in tree.findall("object") if (o.findtext("name") or "").strip() == "WBC"
        )
        rgb = np.asarray(Image.open(voc / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        n = len(detect_wbc(rgb))
        val_exact.append(n == truth)
        val_err.append(abs(n - truth))
        val_base.append(truth == 1)
    return [
        (
            f"white-cell count, BCCD validation split ({len(val_exact)} images)",
            f"exact match {np.mean(val_exact):.3f}, MAE {np.mean(val_err):.3f}",
            f"'always 1' baseline: exact {np.mean(val_base):.3f}",
        ),
        (
            f"white-cell count, BCCD dev ({len(exact)} count items)",
            f"exact match {np.mean(exact):.2f}, MAE {np.mean(errors):.2f}",
            f"'always 1' baseline: exact {np.mean(base_exact):.2f}, MAE {np.mean(base_err):.2f}; "
            "thresholds chosen on the BCCD train split",
        ),
        (
            f"white-cell boxes, BCCD dev ({len(hits)} grounding items)",
            f"IoU >= 0.5 for {np.mean(hits):.2f}, mean best IoU {np.mean(ious):.2f}",
            "best of the detected boxes against the ground-truth WBC box",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [cache_speedup(args.device, args.repeats)]
    print(rows[-1], flush=True)
    if (DATA / "dev.jsonl").is_file():
        rows += segmentation_rows(args.device)
        rows += cell_rows()
    else:
        print(f"{DATA} is absent: only the cache speed-up is measured")
    extra = f"SAM on {args.device}"
    if args.device.startswith("cuda"):
        import torch

        extra += f", {torch.cuda.get_device_name(0)}"
    append_section(
        "expert tools",
        rows,
        context=machine(extra),
        note=(
            "Datasets: SLAKE (CC BY 4.0), BCCD (MIT), from ../shared/datasets/dev.jsonl (the "
            "development set) and BCCD's validation split; thresholds were chosen on the BCCD "
            "train split and the SLAKE dev items, never on a test split."
        ),
    )


if __name__ == "__main__":
    main()
