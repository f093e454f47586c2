"""Pixel helpers shared by the readers: windowing, 8-bit conversion, content hashing."""

from __future__ import annotations

import hashlib

import numpy as np


def content_hash(arr: np.ndarray) -> str:
    """sha256 (hex) of an array's values, shape and dtype: equal pixels give equal hashes."""
    h = hashlib.sha256()
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear window, mapped to ``uint8``.

    Args:
        values: modality values (e.g. HU), any shape.
        center: window centre, same unit as ``values``.
        width: window width (> 1), same unit.
    """
    v = (values.astype(np.float32) - (center - 0.5)) / (width - 1.0) + 0.5
    return (np.clip(v, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """(centre, width) spanning the ``lo``-``hi`` percentiles of ``values``."""
    a, b = np.percentile(values, [lo, hi])
    if b <= a:
        a, b = float(values.min()), float(values.max())
    width = max(float(b - a), 2.0)
    return (float(a) + width / 2.0, width)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric array into ``uint8``: 8-bit data is kept, wider data min-max scaled."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return ((a - lo) / (hi - lo) * 255.0 + 0.5).astype(np.uint8)
