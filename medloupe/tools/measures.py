"""Measures of binary masks and checks of prompt points, shared by the tools."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from medloupe.schemas import Box


class MaskMeasures(BaseModel):
    """Measures of one binary mask. Lengths in mm when the spacing is known, else pixels."""

    box_xyxy: Box = Field(description="tight XYXY pixel box of the mask")
    area_px: int
    area_mm2: float | None = None
    perimeter_px: float
    perimeter_mm: float | None = None
    max_diameter_px: float = Field(description="largest distance across the mask (max Feret)")
    max_diameter_mm: float | None = None
    components: int = Field(description="connected components (8-connectivity)")


def mask_measures(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> MaskMeasures:
    """Measure ``mask`` (``(H, W)`` bool or 0/nonzero).

    Args:
        mask: the mask; must not be empty.
        spacing_mm: ``(row, column)`` pixel spacing in mm, or ``None``.

    Raises:
        ValueError: the mask is empty.
    """
    import cv2

    m = np.asarray(mask) > 0
    if not m.any():
        raise ValueError("the mask is empty")
    ys, xs = np.nonzero(m)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    sy, sx = spacing_mm if spacing_mm else (1.0, 1.0)
    scale = np.array([sx, sy], dtype=np.float64)
    per_px = sum(cv2.arcLength(c, True) for c in contours)
    per_mm = sum(
        cv2.arcLength((c.reshape(-1, 2) * scale).astype(np.float32).reshape(-1, 1, 2), True)
        for c in contours
    )
    pts = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
    hull = cv2.convexHull(pts).reshape(-1, 2).astype(np.float64)
    # pixel centres: a one-pixel mask is 1 px across, so add one pixel to the span
    d_px = _max_pairwise(hull) + 1.0
    d_mm = _max_pairwise(hull * scale) + float(min(sx, sy))
    area = int(m.sum())
    n_components = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)[0] - 1
    known = spacing_mm is not None
    return MaskMeasures(
        box_xyxy=box,
        area_px=area,
        area_mm2=area * sx * sy if known else None,
        perimeter_px=float(per_px),
        perimeter_mm=float(per_mm) if known else None,
        max_diameter_px=float(d_px),
        max_diameter_mm=float(d_mm) if known else None,
        components=int(n_components),
    )


def _max_pairwise(points: np.ndarray) -> float:
    if len(points) < 2:
        return 0.0
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


def check_point(x: float, y: float, width: int, height: int) -> None:
    """Raise ``ValueError`` for a prompt point outside the image or on its border pixels."""
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(
            f"point ({x:g}, {y:g}) lies outside the {width}x{height} image (pixels expected)"
        )
    if x < 1 or y < 1 or x >= width - 1 or y >= height - 1:
        raise ValueError(
            f"point ({x:g}, {y:g}) lies on the border of the {width}x{height} image; put prompt "
            "points inside the structure, in pixels (not 0-1 normalised coordinates)"
        )
