"""Pixel helpers shared by the readers: windowing, 8-bit conversion, content hashing."""

from __future__ import annotations

import hashlib

import numpy as np


def content_hash(arr: np.ndarray) -> str:
    """sha256 (hex) of an array's values, shape and dtype: equal pixels give equal hashes."""
    h = hashlib.sha256()
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).data.cast("B"))  # no copy of the pixels
    return h.hexdigest()


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear window, mapped to ``uint8``; non-finite values (NaN,
    +-Inf) render black.

    Args:
        values: modality values (e.g. HU), any shape.
        center: window centre, same unit as ``values``.
        width: window width (> 1), same unit.
    """
    v = (values.astype(np.float32) - (center - 0.5)) / (width - 1.0) + 0.5
    v = np.where(np.isfinite(v), v, 0.0)
    return (np.clip(v, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """(centre, width) spanning the ``lo``-``hi`` percentiles of the finite ``values``
    (``(0, 2)`` when none is finite: the image is then flagged by :func:`quality_problems`)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (0.0, 2.0)
    a, b = np.percentile(finite, [lo, hi])
    if b <= a:
        a, b = float(finite.min()), float(finite.max())
    width = max(float(b - a), 2.0)
    return (float(a) + width / 2.0, width)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric array into ``uint8``: 8-bit data is kept, wider data min-max scaled
    over its finite values (non-finite ones render black)."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    scaled = np.where(finite, (a - lo) / (hi - lo), 0.0)
    return (scaled * 255.0 + 0.5).astype(np.uint8)


MIN_SIDE_PX = 16
MAX_NON_FINITE_SHARE = 0.05
# Neighbouring pixels of any picture are alike: every image of ../shared (radiographs, CT, MRI,
# smears, textbook figures) and pydicom-data has r >= 0.58; uniform, Gaussian or salt-and-
# pepper noise has r ~ 0.
MIN_NEIGHBOUR_CORRELATION = 0.2


def neighbour_correlation(display: np.ndarray) -> float:
    """The larger of the Pearson correlations between horizontally and vertically adjacent
    pixels of ``display`` (``(H, W)`` or ``(H, W, C)``; channels averaged), on every k-th row
    and column so that at most 512 remain per side; 1.0 where a direction has no variation."""
    gray = display.astype(np.float32)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    step = max(1, -(-max(gray.shape) // 512))
    gray = gray[::step, ::step]
    best = -1.0
    for a, b in ((gray[:, :-1], gray[:, 1:]), (gray[:-1], gray[1:])):
        if a.size == 0:
            continue
        da, db = a - a.mean(), b - b.mean()
        denom = float(np.sqrt(np.sum(da * da) * np.sum(db * db)))
        best = max(best, float(np.sum(da * db)) / denom if denom > 0 else 1.0)
    return best


def quality_problems(display: np.ndarray, raw: np.ndarray | None) -> list[str]:
    """Why an image cannot inform an answer, or ``[]``: too small, a single value (blank),
    values that are not numbers (NaN / Inf beyond a few pixels), or random noise (neighbouring
    pixels uncorrelated, :func:`neighbour_correlation` below
    :data:`MIN_NEIGHBOUR_CORRELATION`)."""
    problems = []
    h, w = display.shape[:2]
    if min(h, w) < MIN_SIDE_PX:
        problems.append(f"the image is {w}x{h} pixels, below {MIN_SIDE_PX} on a side")
    if raw is not None:
        bad = float(np.mean(~np.isfinite(raw))) if raw.size else 1.0
        if bad > MAX_NON_FINITE_SHARE:  # a few bad pixels render black; the image stays usable
            problems.append(f"{bad:.0%} of its values are not numbers (NaN or infinite)")
    if display.size and int(display.max()) == int(display.min()):
        problems.append("every pixel has the same value (a blank image)")
    elif min(h, w) >= MIN_SIDE_PX:
        r = neighbour_correlation(display)
        if r < MIN_NEIGHBOUR_CORRELATION:
            problems.append(
                f"its pixels look like random noise (neighbouring pixels correlate at r = {r:.2f}, "
                f"below {MIN_NEIGHBOUR_CORRELATION} for any picture)"
            )
    return problems
