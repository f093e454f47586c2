"""Which image features would let medloupe-mini answer yes/no questions better? A model-choice
study on the training split only (never dev, never test).

For each source (VQA-RAD, SLAKE), the yes/no questions of the training images are split into 5
folds by image (a question's image never in its own training fold), and medloupe-mini's experts
(:mod:`medloupe.mini.yesno`: MLP, 80 epochs for the image expert, 40 for the question expert)
are trained and scored out of fold with four kinds of frozen EfficientNet-Lite0 features:

- ``pooled 224``: the shipped input (whole image at 224 px, global average pool, 1280-d);
- ``pooled 448``: the same at twice the resolution;
- ``grid 2x2``: the whole image plus its four quadrants, each pooled at 224 (6400-d);
- ``pyramid``: mean and max of the grounder's pyramid maps (stages 3, 5, 7; 944-d).

Reports accuracy of the question expert alone, the image expert (image + question) and the
mean of both logits. Writes its section of BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_mini_features.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_report import append_section, machine

from medloupe.mini import yesno
from medloupe.mini.answerer import plain_yes_no
from medloupe.mini.data import Example, fold, training_examples

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def variants() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    import torch

    from medloupe.knowledge_base.backbone import build_backbone, preprocess

    net = build_backbone()

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return net.features(torch.from_numpy(x[None]))[0].numpy()

    def grid(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        parts = [run(preprocess(rgb))]
        for y in (0, h // 2):
            for x in (0, w // 2):
                parts.append(
                    run(preprocess(np.ascontiguousarray(rgb[y : y + h // 2, x : x + w // 2])))
                )
        return np.concatenate(parts)

    def pyramid(rgb: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            m = net.pyramid(torch.from_numpy(preprocess(rgb)[None]))[0]
            return torch.cat([m.mean((1, 2)), m.amax((1, 2))]).numpy()

    return {
        "pooled 224": lambda rgb: run(preprocess(rgb, 224)),
        "pooled 448": lambda rgb: run(preprocess(rgb, 448)),
        "grid 2x2": grid,
        "pyramid": pyramid,
    }


def out_of_fold(x: Any, y: Any, folds: np.ndarray, epochs: int) -> np.ndarray:
    import torch

    logits = np.zeros(len(y))
    for f in range(yesno.FOLDS):
        train = torch.from_numpy(np.flatnonzero(folds != f))
        test = np.flatnonzero(folds == f)
        net = yesno._train_expert(x[train], y[train], epochs, f)
        logits[test] = yesno._logits(net, x[torch.from_numpy(test)])
    return logits


def study(examples: list[Example], source: str) -> list[tuple[str, str, str]]:
    import torch
    from PIL import Image

    from medloupe.knowledge_base.embedders import TextEmbedder

    ex = [e for e in examples if e.source == source]
    images = sorted({e.image for e in ex})
    where = {p: i for i, p in enumerate(images)}
    yes = np.array([e.answer == "yes" for e in ex])
    y = torch.from_numpy(yes.astype(np.float32))
    folds = np.array([fold(e.image, yesno.FOLDS) for e in ex])
    q = TextEmbedder().encode([e.question for e in ex]).astype(np.float32)
    question = out_of_fold(torch.from_numpy(q), y, folds, yesno.EPOCHS["question"])
    acc_q = float(np.mean((question > 0) == yes))
    rows = [
        (
            f"{source}: {len(ex)} yes/no questions on {len(images)} images, question expert",
            f"{acc_q:.3f}",
            f"answer 'yes' {yes.mean():.2f} of the time",
        )
    ]
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    for name, encode in variants().items():
        t0 = time.perf_counter()
        feats = np.stack([encode(rgb) for rgb in pixels]).astype(np.float32)
        seconds = time.perf_counter() - t0
        # the same scale for every variant: unit vectors times sqrt(1280)
        feats *= np.sqrt(1280) / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-6)
        x = torch.from_numpy(np.concatenate([feats[[where[e.image] for e in ex]], q], axis=1))
        image = out_of_fold(x, y, folds, yesno.EPOCHS["image"])
        rows.append(
            (
                f"{source}: image expert, {name} ({feats.shape[1]}-d)",
                f"{np.mean((image > 0) == yes):.3f}",
                f"mean of both experts' logits {np.mean(((image + question) / 2 > 0) == yes):.3f}; "
                f"features {1000 * seconds / len(images):.0f} ms/image",
            )
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sources", default="vqa_rad,slake")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"the shared datasets are absent ({args.data}); nothing to measure")
    examples = [e for e in training_examples(args.data) if plain_yes_no(e.question, e.answer)]
    rows: list[tuple[str, str, str]] = []
    for source in args.sources.split(","):
        rows += study(examples, source)
    append_section(
        "medloupe-mini, image features for yes/no questions (training images, 5 folds by image)",
        rows,
        columns=("measure", "accuracy out of fold", "notes"),
        context=machine("CPU"),
        note=(
            "Frozen ImageNet EfficientNet-Lite0 features of four kinds, fed with the question "
            "embedding to the yes/no image expert; accuracy of out-of-fold predictions on the "
            "training images' yes/no questions (dev and test images never used)."
        ),
    )


if __name__ == "__main__":
    main()
