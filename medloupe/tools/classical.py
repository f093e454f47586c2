"""Weight-free instruments: a prompted segmenter (GrabCut / region growing) and a cell counter.

Both are honest classical image processing (OpenCV, SciPy) that runs anywhere; their outputs
say so (``method="classical:..."``). They stand in for SAM when no checkpoint is present and
for a trained detector on blood smears.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medloupe.tools.sam import MaskPrediction, normalise_prompts

GRABCUT_MAX_SIDE = 512
FLAT_RANGE = 8  # gray levels: a box whose values span less has no boundary to find


def _largest_component(mask: np.ndarray, prefer: np.ndarray | None = None) -> np.ndarray:
    """The largest connected component of ``mask`` (that overlaps ``prefer`` if any does),
    with its holes filled."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    if prefer is not None and prefer.any():
        overlap = ndi.sum_labels(prefer.astype(np.int32), labels, index=np.arange(1, n + 1))
        if overlap.max() > 0:
            sizes = np.where(overlap > 0, sizes, 0)
    keep = labels == int(np.argmax(sizes)) + 1
    return ndi.binary_fill_holes(keep)


def _contrast_score(gray: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """How well the mask separates from its surroundings inside the box: the difference of
    mean intensities over the box's standard deviation, squashed to [0, 1]."""
    x0, y0, x1, y1 = box
    inner = gray[y0:y1, x0:x1].astype(np.float32)
    m = mask[y0:y1, x0:x1]
    if m.all() or not m.any():
        return 0.0
    sd = float(inner.std()) or 1.0
    d = abs(float(inner[m].mean()) - float(inner[~m].mean())) / sd
    return float(1.0 - math.exp(-d))


class ClassicalSegmenter:
    """A prompted segmenter without weights, with the same two-phase API as
    :class:`~medloupe.tools.sam.SamEngine`.

    - Box prompts (``box-otsu``): Otsu's threshold of the smoothed grayscale inside the box;
      the side of the threshold holding the box centre is the object; its largest component
      overlapping the centre, holes filled. (On the SLAKE dev masks this beat GrabCut, which
      often returns nothing on low-contrast gray images: see BENCHMARKS.md.)
    - Box + points (``grabcut``): GrabCut initialised with the box, foreground/background
      points as hard seeds (on the image downscaled to at most 512 px).
    - Points only: region growing (flood fill) from the foreground points in the smoothed
      grayscale image, up to Otsu's threshold of the point's surroundings (a window a quarter
      of the image across); regions holding a background point are removed.
    """

    name = "classical"

    def set_image(self, image: np.ndarray) -> ClassicalImage:
        """Args: ``image``: ``(H, W, 3)`` uint8 RGB."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"set_image expects an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}"
            )
        return ClassicalImage(image)


@dataclass
class ClassicalImage:
    image: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def predict(
        self,
        boxes: Sequence[Sequence[float]] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
    ) -> list[MaskPrediction]:
        """Masks for XYXY pixel boxes (one each) or ``(x, y)`` points (one mask)."""
        import cv2

        boxes, pts, labels = normalise_prompts(boxes, points, point_labels)
        h, w = self.image.shape[:2]
        gray = cv2.cvtColor(self.image, cv2.COLOR_RGB2GRAY)
        if not boxes:
            mask = self._grow(gray, pts, labels)
            ys, xs = np.nonzero(mask)
            box = (
                (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                if len(xs)
                else (0, 0, w, h)
            )
            score = _contrast_score(gray, mask, box)
            return [MaskPrediction(mask=mask, score=score, method="classical:region-growing")]
        out = []
        for b in boxes:
            if pts:
                mask, ibox = self._grabcut(b, pts, labels)
                method = "classical:grabcut"
            else:
                mask, ibox = self._box_threshold(gray, b)
                method = "classical:box-otsu"
            score = _contrast_score(gray, mask, ibox)
            out.append(MaskPrediction(mask=mask, score=score, method=method))
        return out

    def _box_threshold(
        self, gray: np.ndarray, box: Sequence[float]
    ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        import cv2
        from scipy import ndimage as ndi

        from medloupe.tools.builtin import otsu_threshold

        h, w = gray.shape
        x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise ValueError(f"box {list(box)} is too small to segment (under 2 px inside)")
        sub = cv2.GaussianBlur(gray, (0, 0), 1.0)[y0:y1, x0:x1]
        if int(sub.max()) - int(sub.min()) < FLAT_RANGE:  # nothing to separate: no mask
            return np.zeros((h, w), bool), (x0, y0, x1, y1)
        t = otsu_threshold(sub)
        cy, cx = (y1 - y0) // 2, (x1 - x0) // 2
        qh, qw = max(1, (y1 - y0) // 6), max(1, (x1 - x0) // 6)
        centre = np.zeros(sub.shape, bool)
        centre[cy - qh : cy + qh + 1, cx - qw : cx + qw + 1] = True
        inside = sub > t if float(sub[centre].mean()) > t else sub <= t
        inside = ndi.binary_opening(inside, iterations=1)
        inside = _largest_component(inside, prefer=centre & inside)
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = inside
        return mask, (x0, y0, x1, y1)

    def _grabcut(
        self, box: Sequence[float], pts: list[tuple[float, float]], labels: list[int]
    ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        import cv2

        h, w = self.image.shape[:2]
        s = min(1.0, GRABCUT_MAX_SIDE / max(h, w))
        img = self.image
        if s < 1.0:
            img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        sh, sw = img.shape[:2]
        x0, y0, x1, y1 = (float(v) * s for v in box)
        rx0, ry0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        rx1, ry1 = min(sw, math.ceil(x1)), min(sh, math.ceil(y1))
        if rx1 - rx0 < 2 or ry1 - ry0 < 2:
            raise ValueError(f"box {list(box)} is too small to segment (under 2 px)")
        bgr = np.ascontiguousarray(img[:, :, ::-1])
        mask = np.zeros((sh, sw), np.uint8)
        bgd = np.zeros((1, 65), np.float64)
        fgd = np.zeros((1, 65), np.float64)
        full = rx0 == 0 and ry0 == 0 and rx1 == sw and ry1 == sh
        if full:  # GrabCut needs background outside the rectangle: keep a 1-px frame
            rx0, ry0, rx1, ry1 = 1, 1, sw - 1, sh - 1
        rect = (rx0, ry0, rx1 - rx0, ry1 - ry0)
        cv2.grabCut(bgr, mask, rect, bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)
        if pts:
            radius = max(2, round(min(sh, sw) / 100))
            for (px, py), lab in zip(pts, labels, strict=True):
                value = cv2.GC_FGD if lab else cv2.GC_BGD
                cv2.circle(mask, (round(px * s), round(py * s)), radius, int(value), -1)
            cv2.grabCut(bgr, mask, None, bgd, fgd, 3, cv2.GC_INIT_WITH_MASK)  # type: ignore[call-overload]
        fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        centre = np.zeros_like(fg)
        cx, cy = (rx0 + rx1) // 2, (ry0 + ry1) // 2
        qw, qh = max(1, (rx1 - rx0) // 4), max(1, (ry1 - ry0) // 4)
        centre[cy - qh : cy + qh + 1, cx - qw : cx + qw + 1] = True
        for (px, py), lab in zip(pts, labels, strict=True):
            if lab:
                centre[min(sh - 1, round(py * s)), min(sw - 1, round(px * s))] = True
        fg = _largest_component(fg, prefer=centre & fg)
        if s < 1.0:
            fg = cv2.resize(fg.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        ibox = (
            max(0, math.floor(box[0])),
            max(0, math.floor(box[1])),
            min(w, math.ceil(box[2])),
            min(h, math.ceil(box[3])),
        )
        return fg, ibox

    def _grow(
        self, gray: np.ndarray, pts: list[tuple[float, float]], labels: list[int]
    ) -> np.ndarray:
        import cv2

        from medloupe.tools.builtin import otsu_threshold

        h, w = gray.shape
        smooth = cv2.GaussianBlur(gray, (0, 0), 1.5)
        grown = np.zeros((h, w), bool)
        for (px, py), lab in zip(pts, labels, strict=True):
            if not lab:
                continue
            x, y = min(w - 1, round(px)), min(h - 1, round(py))
            # grow up to Otsu's threshold of the seed's surroundings (a quarter of the image)
            r = max(8, round(max(h, w) / 4))
            window = smooth[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
            tol = max(4.0, abs(float(smooth[y, x]) - otsu_threshold(window)))
            ff = np.zeros((h + 2, w + 2), np.uint8)
            flags = 4 | cv2.FLOODFILL_MASK_ONLY | cv2.FLOODFILL_FIXED_RANGE | (1 << 8)
            cv2.floodFill(smooth.copy(), ff, (x, y), 0, tol, tol, flags)
            grown |= ff[1:-1, 1:-1] > 0
        from scipy import ndimage as ndi

        grown = ndi.binary_fill_holes(ndi.binary_opening(grown, iterations=1) | grown)
        for (px, py), lab in zip(pts, labels, strict=True):
            if lab:
                continue
            labels_img, _ = ndi.label(grown)
            hit = labels_img[min(h - 1, round(py)), min(w - 1, round(px))]
            if hit:
                grown &= labels_img != hit
        return grown
