"""medloupe-mini's orientation estimate: which of the eight rotations and flips of a square
(the dihedral group D4) brings a CT or MR slice to the standard radiological display
(patient's right on the image's left, anterior up).

Benchmarks such as MIRP rotate and flip slices; the grounder learnt anatomy in the standard
display, with an atlas prior of where each organ lies. So it grounds in the standard view and
maps its heatmap back to the image as shown: relative positions are then read in the image as
shown, never from the atlas.

A softmax regression over frozen EfficientNet-Lite0 stride-32 features pooled to a 4x4 grid
(5,120 values, standardised), trained on every D4 transform of SLAKE's training CT and MR slices
(none of its test split's, none of the dev set's). Nearly every slice a clinic or a dataset
shows is as displayed, so a slice is taken as displayed unless the estimate gives that less
than ``keep_at`` (chosen out of fold: the largest of :data:`KEEP_GRID` that keeps at least
:data:`KEEP_STANDARD` of the as-displayed slices of every modality as they are); below it the
most probable element is used. Files: ``orientation.pt`` (tensors) and ``orientation.json``
(``keep_at``, out-of-fold figures by modality, the data).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.mini.data import dev_images, every_kth, fold

log = logging.getLogger(__name__)

POOL = 4
STRIDE32 = slice(152, None)  # the stride-32 channels of the backbone's pyramid (40 + 112 + 320)
KEEP_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
KEEP_STANDARD = 0.99  # share of as-displayed slices ``keep_at`` must leave as they are
KEEP_AT = 0.05  # for a folder whose orientation.json predates ``keep_at``
MODALITIES = ("CT", "MRI")
FOLDS = 5
L2 = 100.0  # inverse of sklearn's C = 0.01, chosen out of fold on SLAKE train (C 0.01 / 0.1)
NAMES = (
    "as displayed",
    "rotated 90 degrees counter-clockwise",
    "rotated 180 degrees",
    "rotated 90 degrees clockwise",
    "mirrored left-right",
    "rotated 90 degrees counter-clockwise, then mirrored",
    "rotated 180 degrees, then mirrored",
    "rotated 90 degrees clockwise, then mirrored",
)


def d4(a: np.ndarray, k: int) -> np.ndarray:
    """Element ``k`` (0-7) of D4 applied to the first two axes of ``a``: ``np.rot90`` ``k % 4``
    times, then a left-right mirror when ``k >= 4``. Each mirror is its own inverse; see
    :func:`d4_inverse`."""
    out = np.rot90(a, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def d4_box(box: tuple[float, float, float, float], k: int) -> tuple[float, float, float, float]:
    """A normalised ``[0, 1]`` XYXY box of an array mapped to where :func:`d4` ``k`` puts it:
    ``d4(box_map(box), k)`` is the box map of ``d4_box(box, k)``."""
    corners = [(box[0], box[1]), (box[2], box[3])]
    for _ in range(k % 4):  # np.rot90: a point (x, y) goes to (y, 1 - x)
        corners = [(y, 1.0 - x) for x, y in corners]
    if k >= 4:
        corners = [(1.0 - x, y) for x, y in corners]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return (min(xs), min(ys), max(xs), max(ys))


def d4_inverse(k: int) -> int:
    """The element undoing ``k``: ``d4(d4(a, k), d4_inverse(k))`` equals ``a``."""
    return (4 - k) % 4 if k < 4 else k


def slice_features(rgb: np.ndarray, backbone: Any, ks: tuple[int, ...] = (0,)) -> np.ndarray:
    """``(len(ks), 5120)`` float32: pooled stride-32 features of ``rgb`` (``(H, W, 3)`` uint8
    RGB) under each D4 element of ``ks``."""
    import torch

    from medloupe.knowledge_base.backbone import preprocess

    x = torch.from_numpy(np.stack([preprocess(d4(rgb, k)) for k in ks]))
    with torch.inference_mode():
        return pooled(backbone.pyramid(x))


def pooled(pyramid: Any) -> np.ndarray:
    """``(N, 5120)`` float32 from the backbone's ``(N, 472, G, G)`` pyramid tensor: its
    stride-32 channels mean-pooled to 4x4."""
    from torch.nn import functional as F

    f = F.adaptive_avg_pool2d(pyramid[:, STRIDE32], POOL)
    return f.flatten(1).numpy().astype(np.float32)


def fit_softmax(x: np.ndarray, y: np.ndarray, l2: float = L2) -> dict[str, np.ndarray]:
    """An L2-regularised softmax regression (full-batch LBFGS) on standardised ``x``; returns
    the tensors :class:`Orientation` uses (``mean``, ``std``, ``weight``, ``bias``)."""
    import torch
    from torch.nn import functional as F

    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.from_numpy((x - mean) / std)
    ys = torch.from_numpy(y.astype(np.int64))
    w = torch.zeros(8, x.shape[1], requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")
    lam = l2 / len(x)

    def closure() -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T + b, ys) + 0.5 * lam * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"mean": mean, "std": std, "weight": w.detach().numpy(), "bias": b.detach().numpy()}


def _predict(t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = ((x - t["mean"]) / t["std"]) @ t["weight"].T + t["bias"]
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def choose(probs: np.ndarray, keep_at: float) -> np.ndarray:
    """``(N,)`` D4 elements from ``(N, 8)`` probabilities: 0 (as displayed) where its
    probability is at least ``keep_at``, else the most probable element."""
    return np.where(probs[:, 0] >= keep_at, 0, probs.argmax(1))


def pick_keep_at(probs: np.ndarray, y: np.ndarray, mods: np.ndarray) -> float:
    """The largest of :data:`KEEP_GRID` under which :func:`choose` leaves at least
    :data:`KEEP_STANDARD` of the as-displayed slices (``y == 0``) of every modality as they
    are (out-of-fold ``probs``; the smallest of the grid when none does)."""
    upright = [(mods == m) & (y == 0) for m in np.unique(mods)]
    upright = [u for u in upright if u.any()]
    best = KEEP_GRID[0]
    for keep_at in KEEP_GRID:
        if upright and all(
            np.mean(choose(probs[u], keep_at) == 0) >= KEEP_STANDARD for u in upright
        ):
            best = keep_at
    return best


def training_slices(datasets: str | Path) -> list[tuple[str, str]]:
    """``(image path, modality)`` of SLAKE's training CT and MR slices, leaving out every image
    its test split or ``dev.jsonl`` uses."""
    root = Path(datasets)
    slake = root / "slake" / "splits"
    rows = json.loads((slake / "train.json").read_text(encoding="utf-8"))
    test = {
        r["img_name"].split("/")[0]
        for r in json.loads((slake / "test.json").read_text(encoding="utf-8"))
    }
    excluded = dev_images(root)
    seen: dict[str, str] = {}
    for r in rows:
        name = r["img_name"].split("/")[0]
        image = (root / "slake" / "imgs" / name / "source.jpg").resolve()
        usable = r["modality"] in MODALITIES and name not in test and image.is_file()
        if usable and str(image) not in excluded:
            seen.setdefault(str(image), r["modality"])
    return sorted(seen.items())


def train_orientation(
    datasets: str | Path,
    out: str | Path,
    *,
    max_slices: int | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Train on every D4 transform of :func:`training_slices` (every k-th, to keep at most
    ``max_slices``), measure accuracy out of fold (folds by image), fit on all and save
    ``orientation.pt`` / ``orientation.json`` into ``out``; returns the metadata."""
    import torch
    from PIL import Image

    from medloupe.knowledge_base.backbone import build_backbone

    t0 = time.perf_counter()
    slices = every_kth(training_slices(datasets), max_slices)
    if not slices:
        raise FileNotFoundError(f"no SLAKE training CT or MR slices under {datasets}")
    backbone = build_backbone()
    ks = tuple(range(8))
    feats = []
    for i, (path, _) in enumerate(slices):
        with Image.open(path) as im:
            feats.append(slice_features(np.asarray(im.convert("RGB")), backbone, ks))
        if on_progress:
            on_progress("orientation slices", i + 1, len(slices))
    x = np.concatenate(feats)
    y = np.tile(np.arange(8), len(slices))
    groups = np.repeat([fold(p, FOLDS) for p, _ in slices], 8)
    mods = np.repeat([m for _, m in slices], 8)
    probs = np.zeros((len(y), 8), np.float32)
    for k in range(FOLDS):
        probs[groups == k] = _predict(fit_softmax(x[groups != k], y[groups != k]), x[groups == k])
    keep_at = pick_keep_at(probs, y, mods)
    pred, chosen = probs.argmax(1), choose(probs, keep_at)
    held: dict[str, Any] = {}
    for mod in MODALITIES:
        sel = mods == mod
        if not sel.any():
            held[mod] = {"slices": 0, "accuracy": None}
            continue
        turned = sel & (y != 0)
        held[mod] = {
            "slices": int(sel.sum() // 8),
            "accuracy": round(float((pred[sel] == y[sel]).mean()), 4),
            "kept_as_displayed": round(float((chosen[sel & (y == 0)] == 0).mean()), 4),
            "turned_found": round(float((chosen[turned] == y[turned]).mean()), 4),
        }
    tensors = fit_softmax(x, y)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "orientation.pt")
    meta = {
        "format": "medloupe-mini-orientation/1",
        "features": "EfficientNet-Lite0 stride-32 stage, mean-pooled to 4x4 (5120 values)",
        "classes": list(NAMES),
        "keep_at": keep_at,
        "l2": L2,
        "data": "every D4 transform of SLAKE train-split CT and MR slices (none of the test "
        "split's, none of dev.jsonl's)",
        "out_of_fold": held,
        "folds": FOLDS,
        "slices": len(slices),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    (folder / "orientation.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


class Orientation:
    """Loads ``orientation.pt`` (and ``keep_at`` from ``orientation.json``) from a
    medloupe-mini folder on first use (thread-safe)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._tensors: dict[str, np.ndarray] | None = None
        self._keep_at = KEEP_AT

    def available(self) -> bool:
        return (self.folder / "orientation.pt").is_file()

    def _load(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._tensors is None:
                import torch

                state = torch.load(
                    self.folder / "orientation.pt", map_location="cpu", weights_only=True
                )
                meta_path = self.folder / "orientation.json"
                if meta_path.is_file():
                    meta = json.loads(meta_path.read_text(encoding="utf-8"))
                    self._keep_at = float(meta.get("keep_at", KEEP_AT))
                self._tensors = {k: v.float().numpy() for k, v in state.items()}
            return self._tensors

    def estimate(self, pyramid: Any) -> tuple[int, float]:
        """``(k, probability)`` from the backbone's pyramid of one slice (``(1, 472, G, G)``,
        as the grounder computes it): the D4 element the slice shows the standard display
        under (the slice is ``d4(standard, k)``; ``d4(slice, d4_inverse(k))`` is the standard
        view), as :func:`choose` decides (0 unless "as displayed" is less likely than
        ``keep_at``), and the model's probability for it."""
        p = _predict(self._load(), pooled(pyramid))
        k = int(choose(p, self._keep_at)[0])
        return k, float(p[0, k])
