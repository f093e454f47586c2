"""medloupe-mini: yes/no questions about what kind of image this is ("Is this a CT scan?", "Is
this an axial image?", "Is this a study of the chest?"), answered by asking the answerer's head
the open question (:mod:`medloupe.mini.attributes`; the body region by its own classifier)
against the gated yes/no experts; and the body region of each fold's images as the datasets
state it, read by the region classifier against the head.

The training images (dev and test never used) are split into 5 folds by image; for each fold
the whole answerer is trained on the other four with the shipped recipe
(:func:`medloupe.mini.train.fit_answerer`: epochs and temperature on its own held-out images,
yes/no experts and gate) and the fold's closed questions are answered by
:meth:`MiniAnswerer.predict_features` with attribute answering on and off.

Run: ``.venv/bin/python benchmarks/bench_mini_attributes.py`` (about 8 minutes on 2 cores).
Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from bench_report import append_section, machine

from medloupe.mini.answerer import MiniAnswerer, plain_yes_no
from medloupe.mini.attributes import most_probable
from medloupe.mini.data import fold, training_examples
from medloupe.mini.features import image_features
from medloupe.mini.train import fit_answerer
from medloupe.text import attribute_claims

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FOLDS = 5


def rate(flags: list[bool]) -> str:
    return f"{np.mean(flags):.3f}" if flags else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    from medloupe.knowledge_base.embedders import TextEmbedder

    t0 = time.perf_counter()
    examples = training_examples(args.data)
    images = sorted({e.image for e in examples})
    feats = dict(zip(images, image_features(images), strict=True))
    q = TextEmbedder().encode([e.question for e in examples])
    folds = np.array([fold(e.image, FOLDS) for e in examples])
    # (source, kind) -> [(with attributes right, without right)]
    hits: dict[tuple[str, str], list[tuple[bool, bool]]] = defaultdict(list)
    by_attribute: Counter[str] = Counter()
    regions = {e.image: e.region for e in examples if e.region is not None}
    source_of = {e.image: e.source for e in examples}
    # source -> per held-out image: (region right by the classifier, by the head)
    region_hits: dict[str, list[tuple[bool, ...]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-attr-") as tmp:
        for f in range(FOLDS):
            train = np.flatnonzero(folds != f)
            folder = Path(tmp) / str(f)
            fit_answerer(
                [examples[i] for i in train],
                {p: feats[p] for p in {examples[i].image for i in train}},
                q[train],
                folder,
            )
            answerer = MiniAnswerer(folder)
            for image in sorted({examples[i].image for i in np.flatnonzero(folds == f)}):
                stated = regions.get(image)
                if stated is None:
                    continue
                said = [
                    answerer.attribute_shares(feats[image], "region", classifier=by)
                    for by in (True, False)
                ]
                region_hits[source_of[image]].append(
                    tuple(bool(s) and most_probable(s) == stated for s in said)
                )
            for i in np.flatnonzero(folds == f):
                e = examples[i]
                if not e.closed:
                    continue
                on = answerer.predict_features(feats[e.image], e.question, q[i])
                off = answerer.predict_features(feats[e.image], e.question, q[i], attributes=False)
                pair = (on.answer == e.answer, off.answer == e.answer)
                hits[(e.source, "closed")].append(pair)
                if plain_yes_no(e.question, e.answer):
                    hits[(e.source, "yes/no")].append(pair)
                    claims = attribute_claims(e.question)
                    if claims:
                        hits[(e.source, "claims")].append(pair)
                        by_attribute["+".join(sorted(claims))] += 1
                    if on.basis is not None:
                        hits[(e.source, "answered by attributes")].append(pair)
            print(f"fold {f + 1}/{FOLDS} done, {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for source in ("vqa_rad", "slake"):
        for kind, what in (
            ("answered by attributes", "yes/no questions answered by attributes"),
            ("claims", "yes/no questions that only assert attributes"),
            ("yes/no", "all yes/no questions"),
            ("closed", "all closed questions"),
        ):
            pairs = hits[(source, kind)]
            rows.append(
                (
                    f"{source}: {what} ({len(pairs)})",
                    f"{rate([a for a, _ in pairs])} vs {rate([b for _, b in pairs])}",
                    "attributes on vs off",
                )
            )
    for source in ("vqa_rad", "slake"):
        hits_r = region_hits[source]
        rows.append(
            (
                f"{source}: body region of the fold's images ({len(hits_r)})",
                f"{rate([a for a, _ in hits_r])} vs {rate([b for _, b in hits_r])}",
                "region classifier vs the head's open question",
            )
        )
    kinds = ", ".join(f"{k} {v}" for k, v in by_attribute.most_common())
    append_section(
        "medloupe-mini, yes/no questions about the kind of image (5 folds by training image)",
        rows,
        columns=("questions", "accuracy out of fold", "notes"),
        note=(
            f"Training images only (dev.jsonl images and test splits never used), {FOLDS} folds "
            "by image; per fold the answerer is trained on the other folds with the shipped "
            "recipe and answers the fold's closed questions with attribute answering on and off "
            f"(off: the gated yes/no experts answer every yes/no question). Claims by attribute: "
            f"{kinds}. A claim whose value the head has no trained answer for (e.g. sagittal) "
            f"stays with the experts. {time.perf_counter() - t0:.0f} s in all."
        ),
        context=machine("CPU"),
    )


if __name__ == "__main__":
    main()
