"""medloupe-mini: does a crop-aware yes/no answer (whole image + the zoomed target region)
beat the whole-image answer on questions that name a target the grounder knows?

The question the second look's answerer must settle before it may change an answer. Training
images only (dev.jsonl images and test splits never used), 5 folds by image. Per fold:

- *whole image*: the shipped yes/no recipe (:func:`medloupe.mini.yesno.train_yesno`: image
  and question experts and their gate) trained on every plain yes/no question of the other
  folds;
- *crop-aware*: an MLP (:func:`medloupe.mini.yesno.build_expert`) over ``[whole-image
  features, features of the zoomed crop, question embedding]``, trained on the other folds'
  SLAKE yes/no questions that name a target. The crop is made as the second look makes it at
  inference: the grounder's own best box of the question's first target (modality from
  SLAKE's metadata), grown by the rethink's margin, zoomed to 224 pixels
  (:func:`medloupe.tools.builtin.crop_array`);
- *mean*: the two logits averaged.

Both answer the fold's SLAKE yes/no questions naming a target, split into *presence* ("Does
the picture contain liver?") and *condition* ("Does the liver look abnormal?",
:func:`medloupe.mini.backend.presupposes`). Paired: McNemar's exact test and a bootstrap 95 %
interval of the difference.

Run: ``.venv/bin/python benchmarks/bench_mini_crop.py`` (about 8 minutes on 2 cores). Writes
its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
from bench_report import append_section, machine

from medloupe.evaluation.paired import bootstrap_interval, mcnemar_exact
from medloupe.graphs.nodes import CROP_MARGIN
from medloupe.mini import yesno
from medloupe.mini.answerer import plain_yes_no
from medloupe.mini.backend import MiniBackend, presupposes
from medloupe.mini.data import fold, split_images, training_examples
from medloupe.mini.features import image_features
from medloupe.mini.tool import GroundTool, named_targets
from medloupe.tools.builtin import crop_array

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FOLDS = 5
SIDE = MiniBackend.profile.preferred_image_side  # the second look's zoom for medloupe-mini


def mean_of(values: np.ndarray, sample: np.ndarray) -> float:
    """The mean of ``values`` at the resampled indices ``sample``."""
    return float(values[sample].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    import torch
    from PIL import Image

    from medloupe.knowledge_base.embedders import TextEmbedder

    t0 = time.perf_counter()
    examples = [e for e in training_examples(args.data) if plain_yes_no(e.question, e.answer)]
    grounder = GroundTool().grounder
    modality = split_images(args.data / "slake" / "splits" / "train.json")
    targeted: list[tuple[int, str]] = []
    for i, e in enumerate(examples):
        names = named_targets(e.question, grounder.labels) if e.source == "slake" else []
        if names:
            targeted.append((i, names[0]))
    images = sorted({e.image for e in examples})
    by_image = dict(zip(images, image_features(images), strict=True))
    whole = np.stack([by_image[e.image] for e in examples])
    q = TextEmbedder().encode([e.question for e in examples])
    yes = np.array([e.answer == "yes" for e in examples])
    folds = np.array([fold(e.image, FOLDS) for e in examples])
    crops: dict[tuple[str, str], np.ndarray] = {}
    for i, target in targeted:
        key = (examples[i].image, target)
        if key not in crops:
            rgb = np.asarray(Image.open(key[0]).convert("RGB"))
            found = grounder.ground(rgb, target, modality[Path(key[0]).parent.name], 1)
            box = found.boxes[0][0] if found.boxes else (0, 0, rgb.shape[1], rgb.shape[0])
            crops[key] = crop_array(rgb, box, CROP_MARGIN, SIDE)[0]
    crop = image_features([crops[(examples[i].image, t)] for i, t in targeted])
    idx = np.array([i for i, _ in targeted])
    kind = np.array([presupposes(examples[i].question) for i in idx])
    t_fold = folds[idx]
    base, aware = np.zeros(len(idx)), np.zeros(len(idx))

    def joined(rows: np.ndarray) -> torch.Tensor:
        parts = [whole[idx[rows]], crop[rows], q[idx[rows]]]
        return torch.from_numpy(np.concatenate(parts, 1).astype(np.float32))

    for f in range(FOLDS):
        train = np.flatnonzero(folds != f)
        state = yesno.train_yesno(whole[train], q[train], yes[train], folds[train], seed=f)
        test = np.flatnonzero(t_fold == f)
        p = yesno.YesNo(state).probabilities(whole[idx[test]], q[idx[test]])["gated"]
        base[test] = np.log(p / (1 - p))
        rows = np.flatnonzero(t_fold != f)
        answers = torch.from_numpy(yes[idx[rows]].astype(np.float32))
        net = yesno._train_expert(joined(rows), answers, yesno.EPOCHS["image"], f)
        aware[test] = yesno._logits(net, joined(test))
        print(f"fold {f + 1}/{FOLDS} done, {time.perf_counter() - t0:.0f} s", flush=True)
    truth = yes[idx]
    table = []
    for group, mask in (
        ("all", np.ones(len(idx), bool)),
        ("presence", ~kind),
        ("condition", kind),
    ):
        right_base = (base[mask] > 0) == truth[mask]
        for name, logits in (("crop-aware", aware), ("mean of both", (aware + base) / 2)):
            right = (logits[mask] > 0) == truth[mask]
            only_new, only_base = int((right & ~right_base).sum()), int((~right & right_base).sum())
            diff = right.astype(float) - right_base.astype(float)
            lo, hi = bootstrap_interval(partial(mean_of, diff), len(diff), seed=0)
            table.append(
                (
                    f"{group} ({int(mask.sum())}): {name} vs whole image",
                    f"{right.mean():.3f} vs {right_base.mean():.3f}: {diff.mean():+.3f} "
                    f"[{lo:+.3f}, {hi:+.3f}]",
                    f"McNemar p {mcnemar_exact(only_new, only_base):.2g} (right only "
                    f"{name}: {only_new}, only whole image: {only_base})",
                )
            )
    append_section(
        "medloupe-mini, crop-aware vs whole-image yes/no answers (5 folds by training image)",
        table,
        columns=("SLAKE yes/no questions naming a target", "accuracy out of fold", "test"),
        note=(
            f"{len(examples)} plain yes/no training questions, {len(idx)} of them SLAKE "
            f"questions naming a grounder target ({len(crops)} image-target crops, the "
            "grounder's own best box, margin "
            f"{CROP_MARGIN}, zoomed to {SIDE} px). Whole image: the shipped gated yes/no recipe "
            "on every yes/no question of the other folds; crop-aware: an MLP over whole-image "
            "features, crop features and the question, on the other folds' targeted "
            "questions. The grounder was trained on these images, so its boxes here are "
            "better than at inference: the crop-aware figures are if anything optimistic. "
            f"{time.perf_counter() - t0:.0f} s in all."
        ),
        context=machine("CPU"),
    )


if __name__ == "__main__":
    main()
