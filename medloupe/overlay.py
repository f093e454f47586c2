"""Drawing regions (boxes, masks, labels) over an image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medloupe.schemas import Region

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
]


def draw_overlay(
    rgb: np.ndarray, regions: Sequence[Region], masks: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """Draw ``regions`` on a copy of ``rgb``.

    Args:
        rgb: ``(H, W, 3)`` uint8 image.
        regions: boxes in XYXY pixels of ``rgb``; each is outlined and numbered.
        masks: optional ``{region id: (H, W) bool}`` tinted in the region's colour.

    Returns:
        ``(H, W, 3)`` uint8 image.
    """
    from PIL import Image, ImageDraw

    out = rgb.copy()  # uint8: only masked pixels are blended in float (a large image stays cheap)
    for i, region in enumerate(regions):
        mask = (masks or {}).get(region.id)
        if mask is not None and mask.shape == rgb.shape[:2]:
            tint = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
            out[mask] = (out[mask].astype(np.float32) * 0.6 + tint * 0.4).astype(np.uint8)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(rgb.shape[:2]) / 400))
    for i, region in enumerate(regions):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = region.box_xyxy
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        draw.text((x0 + width + 2, y0 + width + 2), str(i + 1), fill=colour)
    return np.asarray(img)


def draw_overview(rgb: np.ndarray, regions: Sequence[Region], max_side: int) -> np.ndarray:
    """:func:`draw_overlay` on ``rgb`` shrunk so its longer side is at most ``max_side``
    pixels (a model is shown no more: drawing and encoding a larger picture is wasted); the
    boxes (XYXY pixels of ``rgb``) are scaled with it.

    Returns:
        ``(h, w, 3)`` uint8 image, ``max(h, w) <= max(max_side, 1)``.
    """
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return draw_overlay(rgb, regions)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    scaled = [
        r.model_copy(update={"box_xyxy": tuple(v * scale for v in r.box_xyxy)}) for r in regions
    ]
    return draw_overlay(small, scaled)
