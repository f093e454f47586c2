"""medloupe-mini's grounder: image + target phrase -> boxes with scores.

A small heatmap head over frozen EfficientNet-Lite0 features (the stride-8/16/32 stage
outputs on a 28x28 grid for the 224x224 input), conditioned on the target (its MiniLM
embedding and the modality, by feature-wise modulation) and fed the mean box map of that
(target, modality) in training as a prior channel. The heatmap is thresholded and each
connected component becomes a box, scored by its peak; the top box is given the chance that
it overlaps the truth with IoU >= 0.5 by a logistic map of its peak(s), its size and the
modality (:func:`calibration_features`, fitted on held-out training images: a small box on an
X-ray is a far worse bet than a large one on a CT at the same peak).

Coarse to fine: the top box is then looked at again, closer. A window around it
(:func:`refine_window`) is cropped, zoomed to the backbone's input and given to a second head
of the same shape (``refiner.pt``), whose prior channel is the coarse box drawn in the window;
its top box replaces the coarse one. On a 28x28 grid over the whole image a small lesion is a
cell or two; in the window it spans many, so the box's edges are placed where the pixels say.

Targets: SLAKE's detection labels (organs and lesions, CT / MRI / X-ray), NIH ChestX-ray14
findings and BCCD's white blood cells. Checkpoint: ``grounder.pt`` (tensors) +
``grounder.json`` (labels, thresholds, calibration, data, held-out metrics), and
``refiner.pt`` + ``refiner.json`` for the second pass (without them the coarse box stands).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.mini.orientation import MODALITIES as ORIENTED
from medloupe.mini.orientation import Orientation, d4, d4_box, d4_inverse

GRID = 28
DECODE = 112  # the heatmap is upsampled to this grid before thresholding
REFINE_GROW = 0.5  # the second pass's window: the coarse box grown by half its size each side,
REFINE_MIN_SHARE = 0.15  # and at least this share of the image's width and height
MODALITIES = ("CT", "MRI", "X-Ray", "microscopy")
# DICOM modality codes (and common words) -> the grounder's modality names
_MODALITY_CODES = {
    "CT": "CT",
    "MR": "MRI",
    "MRI": "MRI",
    "CR": "X-Ray",
    "DX": "X-Ray",
    "DR": "X-Ray",
    "RG": "X-Ray",
    "X-RAY": "X-Ray",
    "XRAY": "X-Ray",
    "SM": "microscopy",
    "MICROSCOPY": "microscopy",
}
_MODALITY_WORDS = re.compile(
    r"\b(?P<ct>ct|computed tomography)\b|\b(?P<mri>mri|mr|magnetic resonance)\b|"
    r"\b(?P<xray>x-?ray|radiograph|cxr)\b|\b(?P<micro>smear|microscop\w*)\b",
    re.I,
)
SYNONYMS = {
    "wbc": "white blood cell",
    "wbcs": "white blood cell",
    "white cell": "white blood cell",
    "white blood cells": "white blood cell",
    "leukocyte": "white blood cell",
    "leucocyte": "white blood cell",
    "pleural effusion": "effusion",
    "lung nodule": "nodule",
    "kidneys": "kidney",
}


def modality_key(value: str | None) -> str | None:
    """The grounder's modality name (``CT``, ``MRI``, ``X-Ray``, ``microscopy``) for a DICOM
    code or a phrase ("in this MRI image"), or ``None`` when unknown."""
    if not value:
        return None
    code = _MODALITY_CODES.get(value.strip().upper())
    if code:
        return code
    m = _MODALITY_WORDS.search(value)
    if not m:
        return None
    return {"ct": "CT", "mri": "MRI", "xray": "X-Ray", "micro": "microscopy"}[str(m.lastgroup)]


def normalise_target(phrase: str) -> str:
    """Lower case, punctuation to spaces, a leading article dropped, synonyms folded."""
    text = re.sub(r"[^a-z0-9 -]+", " ", phrase.lower())
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^(the|a|an) ", "", text)
    return SYNONYMS.get(text, text)


def side_of(text: str) -> str | None:
    """``"left"`` or ``"right"`` when a lower-case phrase names one side only, else ``None``."""
    words = set(text.split())
    sides = words & {"left", "right"}
    return sides.pop() if len(sides) == 1 else None


def box_map(
    boxes_xyxy: list[tuple[float, float, float, float]],
    width: float,
    height: float,
    grid: int = GRID,
) -> np.ndarray:
    """``(grid, grid)`` float32: the share of each cell covered by the union of the boxes
    (pixel boxes of a ``width`` x ``height`` image; the image is resized to the grid whole)."""
    fine = grid * 4
    m = np.zeros((fine, fine), np.float32)
    for x0, y0, x1, y1 in boxes_xyxy:
        c0 = int(np.floor(max(0.0, x0) / width * fine))
        c1 = int(np.ceil(min(float(width), x1) / width * fine))
        r0 = int(np.floor(max(0.0, y0) / height * fine))
        r1 = int(np.ceil(min(float(height), y1) / height * fine))
        m[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)] = 1.0
    return m.reshape(grid, 4, grid, 4).mean(axis=(1, 3))


def build_head(in_ch: int, cond_dim: int, hidden: int = 64) -> Any:
    """The heatmap head: ``(features (N, in_ch, G, G), cond (N, cond_dim), prior (N, G, G))
    -> logits (N, G, G)``."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class GrounderHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.reduce = nn.Conv2d(in_ch, hidden, 1)
            self.film = nn.Linear(cond_dim, 2 * hidden)
            self.conv1 = nn.Conv2d(hidden + 3, hidden, 3, padding=1)
            self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.out = nn.Conv2d(hidden, 1, 1)
            self.drop = nn.Dropout2d(0.1)

        def forward(
            self, feats: torch.Tensor, cond: torch.Tensor, prior: torch.Tensor
        ) -> torch.Tensor:
            h = self.drop(F.relu(self.reduce(feats)))
            gamma, beta = self.film(cond).chunk(2, dim=-1)
            h = F.relu(h * (1 + gamma[..., None, None]) + beta[..., None, None])
            n, _, g, _ = h.shape
            ramp = torch.linspace(-1.0, 1.0, g, device=h.device)
            ys = ramp.view(1, 1, g, 1).expand(n, 1, g, g)
            xs = ramp.view(1, 1, 1, g).expand(n, 1, g, g)
            h = torch.cat([h, prior[:, None], ys, xs], dim=1)
            h = F.relu(self.conv1(h))
            h = F.relu(self.conv2(h))
            return self.out(h)[:, 0]

    return GrounderHead()


def condition(text_embedding: np.ndarray, modality: str | None) -> np.ndarray:
    """The head's condition vector: the target's MiniLM embedding and a one-hot modality
    (last slot: unknown)."""
    onehot = np.zeros(len(MODALITIES) + 1, np.float32)
    onehot[MODALITIES.index(modality) if modality in MODALITIES else len(MODALITIES)] = 1.0
    return np.concatenate([text_embedding.astype(np.float32), onehot])


def decode(
    prob: np.ndarray, threshold: float, max_boxes: int
) -> list[tuple[tuple[float, float, float, float], float]]:
    """Boxes in normalised ``[0, 1]`` XYXY from a ``(G, G)`` probability map, best first,
    each scored by its peak. With nothing above ``threshold``, half the peak is the cut."""
    import torch
    from scipy import ndimage as ndi
    from torch.nn import functional as F

    logits = torch.logit(torch.from_numpy(prob.astype(np.float32)).clamp(1e-5, 1 - 1e-5))
    fine = torch.sigmoid(
        F.interpolate(
            logits[None, None], size=(DECODE, DECODE), mode="bilinear", align_corners=False
        )
    )[0, 0].numpy()
    cut = min(threshold, 0.5 * float(fine.max()))
    labels, n = ndi.label(fine >= cut)
    boxes = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        score = float(fine[ys, xs].max())
        boxes.append(
            (
                (
                    xs.min() / DECODE,
                    ys.min() / DECODE,
                    (xs.max() + 1) / DECODE,
                    (ys.max() + 1) / DECODE,
                ),
                score,
            )
        )
    boxes.sort(key=lambda b: -b[1])
    return boxes[:max_boxes]


def calibration_features(
    coarse_peak: float,
    box: tuple[float, float, float, float],
    modality: str | None,
    refined_peak: float | None = None,
) -> dict[str, float]:
    """What the hit probability of the top box is read from: the coarse pass's peak, the
    refiner's (where it ran), the log of the box's share of the image (``box`` normalised
    XYXY) and the modality (one of :data:`MODALITIES`, or ``None``: unknown), one-hot."""
    share = max((box[2] - box[0]) * (box[3] - box[1]), 1e-4)
    features = {"coarse_peak": float(coarse_peak), "log_area": float(np.log(share))}
    if refined_peak is not None:
        features["refined_peak"] = float(refined_peak)
    for m in (*MODALITIES, None):
        features[f"modality={m or 'unknown'}"] = float(modality == m)
    return features


def hit_probability(calibration: dict[str, Any] | list[float], features: dict[str, float]) -> float:
    """The calibrated chance of a hit: ``sigmoid(bias + sum(weight * feature))`` over the
    features ``calibration`` names (``grounder.json`` / ``refiner.json``; a bare ``[a, b]``, as
    folders trained before the features existed hold, is ``a * coarse_peak + b``)."""
    if isinstance(calibration, list):
        a, b = calibration
        calibration = {"features": ["coarse_peak"], "weights": [a], "bias": b}
    z = float(calibration["bias"]) + sum(
        float(w) * features[name]
        for name, w in zip(calibration["features"], calibration["weights"], strict=True)
    )
    return float(1.0 / (1.0 + np.exp(-z)))


def refine_window(
    box: tuple[float, float, float, float], width: float, height: float
) -> tuple[float, float, float, float]:
    """The second pass's window around ``box`` (XYXY, in the units of ``width`` and ``height``):
    the box grown by :data:`REFINE_GROW` of its size on each side, at least
    :data:`REFINE_MIN_SHARE` of the image on each axis, at most the image, shifted (not cut)
    to lie inside it."""
    x0, y0, x1, y1 = box
    ww = min(width, max((x1 - x0) * (1 + 2 * REFINE_GROW), REFINE_MIN_SHARE * width))
    wh = min(height, max((y1 - y0) * (1 + 2 * REFINE_GROW), REFINE_MIN_SHARE * height))
    wx0 = min(max(0.0, (x0 + x1) / 2 - ww / 2), width - ww)
    wy0 = min(max(0.0, (y0 + y1) / 2 - wh / 2), height - wh)
    return (wx0, wy0, wx0 + ww, wy0 + wh)


def crop_window(rgb: np.ndarray, window: tuple[float, float, float, float]) -> np.ndarray:
    """The pixels of ``rgb`` (``(H, W, 3)`` uint8 RGB) inside ``window`` (XYXY pixels), at
    least one pixel each way."""
    x0, y0, x1, y1 = (round(v) for v in window)
    return rgb[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]


def in_window(
    box: tuple[float, float, float, float], window: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """``box`` (XYXY pixels of the image) in the pixels of ``window``'s crop."""
    return (box[0] - window[0], box[1] - window[1], box[2] - window[0], box[3] - window[1])


def from_window(
    box: tuple[float, float, float, float], window: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """``box`` (normalised ``[0, 1]`` XYXY of ``window``'s crop, as :func:`decode` gives it) in
    the pixels of the image."""
    ww, wh = window[2] - window[0], window[3] - window[1]
    return (
        window[0] + box[0] * ww,
        window[1] + box[1] * wh,
        window[0] + box[2] * ww,
        window[1] + box[3] * wh,
    )


@dataclass
class Grounding:
    """What the grounder found: the label it matched, the modality it assumed, and boxes
    (XYXY pixels of the input image) with their peak scores, best first; ``confidence`` is the
    calibrated chance that the first box has IoU >= 0.5 with the truth. ``orientation``: the
    D4 element (:mod:`medloupe.mini.orientation`) the slice was found displayed under and
    grounded back from (0: as displayed), with the estimate's probability (``None``: not
    estimated). ``refined``: the first box is the second, zoomed pass's (its score the
    refiner's peak; ``confidence`` the refiner's calibration, :func:`hit_probability`)."""

    label: str
    modality: str | None
    boxes: list[tuple[tuple[float, float, float, float], float]]
    confidence: float
    orientation: int = 0
    orientation_probability: float | None = None
    refined: bool = False


class UnknownTarget(ValueError):
    """The target phrase matches no label the grounder was trained on."""


class MiniGrounder:
    """Loads a trained grounder folder on first use (thread-safe), with its refiner (the
    second, zoomed pass) where the folder has one."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._meta: dict[str, Any] | None = None
        self._loaded: tuple[Any, Any, Any, np.ndarray] | None = None
        self._refiner: tuple[Any, dict[str, Any]] | None = None
        self.orientation = Orientation(self.folder)

    @property
    def meta(self) -> dict[str, Any]:
        """``grounder.json`` (labels, threshold, calibration, metrics); no weights loaded."""
        if self._meta is None:
            self._meta = json.loads((self.folder / "grounder.json").read_text(encoding="utf-8"))
        return self._meta

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    def known(self, phrase: str) -> str | None:
        """The label a phrase names exactly (after :func:`normalise_target`), else ``None``."""
        key = normalise_target(phrase)
        for label in self.labels:
            if label.lower() == key:
                return label
        return None

    def _load(self) -> tuple[Any, Any, Any, np.ndarray]:
        with self._lock:
            if self._loaded is None:
                import torch

                from medloupe.knowledge_base.backbone import build_backbone
                from medloupe.knowledge_base.embedders import TextEmbedder

                meta = self.meta
                head = build_head(meta["in_ch"], meta["cond_dim"], meta["hidden"])
                state = torch.load(
                    self.folder / "grounder.pt", map_location="cpu", weights_only=True
                )
                priors = state.pop("priors").float().numpy()
                head.load_state_dict(state)
                self._loaded = (build_backbone(), head.eval(), TextEmbedder(), priors)
                if (self.folder / "refiner.pt").is_file():
                    rmeta = json.loads((self.folder / "refiner.json").read_text(encoding="utf-8"))
                    refiner = build_head(meta["in_ch"], meta["cond_dim"], meta["hidden"])
                    refiner.load_state_dict(
                        torch.load(
                            self.folder / "refiner.pt", map_location="cpu", weights_only=True
                        )
                    )
                    self._refiner = (refiner.eval(), rmeta)
            return self._loaded

    def match(self, phrase: str) -> str:
        """The trained label for a target phrase: exact (case, articles, synonyms folded), else
        the nearest label by MiniLM similarity when it is close enough, never one of the other
        side ("right lung middle lobe" may be "Right Lung", never "Left Lung").

        Raises:
            UnknownTarget: nothing close; the message names the nearest labels.
        """
        exact = self.known(phrase)
        if exact:
            return exact
        _, _, text, _ = self._load()
        key = normalise_target(phrase)
        side = side_of(key)
        labels = [lab for lab in self.labels if side_of(lab.lower()) in (None, side)]
        vecs = text.encode([key, *(lab.lower() for lab in labels)])
        sims = vecs[1:] @ vecs[0]
        order = np.argsort(-sims)
        if sims[order[0]] >= float(self.meta.get("match_similarity", 0.75)):
            return labels[int(order[0])]
        near = ", ".join(repr(labels[int(i)]) for i in order[:3])
        raise UnknownTarget(
            f"the grounder was not trained to find {phrase!r}; nearest targets it knows: {near} "
            f"(all {len(self.labels)}: see grounder.json)"
        )

    def ground(
        self,
        rgb: np.ndarray,
        target: str,
        modality: str | None = None,
        max_boxes: int = 3,
        *,
        refine: bool = True,
    ) -> Grounding:
        """Find ``target`` in ``rgb`` (``(H, W, 3)`` uint8 RGB); ``modality`` is one of
        :data:`MODALITIES` or ``None`` (unknown). Boxes are XYXY pixels of ``rgb``. ``refine``:
        look again closer at the top box where the folder has a refiner (off: the coarse boxes
        alone)."""
        import torch

        from medloupe.knowledge_base.backbone import preprocess

        label = self.match(target)
        backbone, head, text, priors = self._load()
        meta = self.meta
        mod = modality if modality in MODALITIES else None
        emb = text.encode([label.lower()])[0]
        cond = condition(emb, mod)
        li = meta["labels"].index(label)
        mi = MODALITIES.index(mod) if mod else len(MODALITIES)
        prior = priors[li, mi]
        k, k_prob = 0, None
        view = rgb
        with torch.inference_mode():
            feats = backbone.pyramid(torch.from_numpy(preprocess(rgb))[None])
            if mod in ORIENTED and self.orientation.available():
                k, k_prob = self.orientation.estimate(feats)
            if k:  # ground in the standard display the prior knows
                view = d4(rgb, d4_inverse(k))
                feats = backbone.pyramid(torch.from_numpy(preprocess(view))[None])
            logits = head(feats, torch.from_numpy(cond)[None], torch.from_numpy(prior)[None])
        prob = torch.sigmoid(logits)[0].numpy()
        found = decode(prob, float(meta["threshold"]), max_boxes)  # in the view, [0, 1]
        calibration, coarse_peak = meta["calibration"], found[0][1] if found else 0.0
        refined_peak, refined = None, False
        if found and refine and self._refiner is not None:
            better = self._refine(view, found[0][0], cond)
            if better is not None:
                calibration = self._refiner[1]["calibration"]
                found[0], refined_peak, refined = better, better[1], True
        confidence = (
            hit_probability(
                calibration, calibration_features(coarse_peak, found[0][0], mod, refined_peak)
            )
            if found
            else 0.0
        )
        h, w = rgb.shape[:2]
        boxes = []
        for b, s in found:  # back to the image as shown, in pixels
            x0, y0, x1, y1 = d4_box(b, k) if k else b
            boxes.append(((x0 * w, y0 * h, x1 * w, y1 * h), s))
        return Grounding(label, mod, boxes, confidence, k, k_prob, refined)

    def _refine(
        self, view: np.ndarray, box: tuple[float, float, float, float], cond: np.ndarray
    ) -> tuple[tuple[float, float, float, float], float] | None:
        """The second pass on ``view`` (``(H, W, 3)`` uint8 RGB) around ``box`` (normalised
        XYXY): its top box (normalised XYXY of ``view``) with the refiner's peak, or ``None``
        when it finds nothing."""
        import torch

        from medloupe.knowledge_base.backbone import preprocess

        assert self._refiner is not None
        refiner, rmeta = self._refiner
        backbone = self._load()[0]
        h, w = view.shape[:2]
        coarse = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
        win = refine_window(coarse, w, h)
        prior = box_map([in_window(coarse, win)], win[2] - win[0], win[3] - win[1])
        with torch.inference_mode():
            feats = backbone.pyramid(torch.from_numpy(preprocess(crop_window(view, win)))[None])
            logits = refiner(feats, torch.from_numpy(cond)[None], torch.from_numpy(prior)[None])
        top = decode(torch.sigmoid(logits)[0].numpy(), float(rmeta["threshold"]), 1)
        if not top:
            return None
        x0, y0, x1, y1 = from_window(top[0][0], win)
        return (x0 / w, y0 / h, x1 / w, y1 / h), top[0][1]
