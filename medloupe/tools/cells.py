"""``count_cells``: a classical detector/counter for stained blood smears and microscopy.

- White cells (``wbc``): their nuclei take the purple/blue stain (Giemsa/Wright): pixels with
  HSV hue 100-165 (OpenCV's 0-180 scale) and saturation above 70, opened, then dilated by
  ~0.8% of the image width so the lobes of one nucleus merge; components above 1.3% of the
  image area are white cells; each box is grown by 10% of its size to cover the cytoplasm;
  boxes overlapping by 15% of the smaller one are lobes of one cell and merged.
  (Thresholds chosen on the BCCD *train* split; BENCHMARKS.md has the dev numbers.)
- Red cells (``rbc``): stained foreground (saturation above Otsu's threshold, minus the white
  cells), holes filled, split by a distance-transform watershed; components between 0.1% and
  3% of the image area.

Both are thresholding + morphology (+ watershed), not a trained model; the output says so.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from medloupe.io.records import ImageRecord
from medloupe.schemas import Box, Claim, Evidence, Region
from medloupe.tools.base import Statement, ToolContext, ToolResult, box_text, successful, tool

_COUNT_WBC_Q = re.compile(r"\bhow many\b.*\b(white (blood )?cells?|leu[ck]ocytes?|wbcs?)\b", re.I)
_LOCATE_WBC_Q = re.compile(
    r"\b(locate|where|find|bounding box)\b.*\b(white (blood )?cells?|leu[ck]ocytes?|wbcs?)\b",
    re.I,
)
# exact-match rate of count_cells(wbc) on the BCCD validation split (BENCHMARKS.md)
WBC_COUNT_CONFIDENCE = 0.9

WBC_HUE = (100, 165)
WBC_MIN_SATURATION = 70
WBC_MERGE_FRACTION = 5 / 640
WBC_MIN_AREA_FRACTION = 0.013
WBC_BOX_GROWTH = 0.10
WBC_MERGE_OVERLAP = 0.15


class CountCellsArgs(BaseModel):
    model_config = {"extra": "forbid"}

    cell_type: Literal["wbc", "rbc"] = Field(
        default="wbc", description="wbc: white blood cells (stained nuclei); rbc: red cells"
    )
    min_area_fraction: float | None = Field(
        default=None,
        gt=0.0,
        lt=0.5,
        description="smallest cell kept, as a share of the image (default per cell type)",
    )


class CellBox(BaseModel):
    box_xyxy: Box
    area_px: int


class CountCellsResult(ToolResult):
    cell_type: str
    count: int
    cells: list[CellBox]
    method: str

    def summary(self) -> str:
        return f"{self.count} {self.cell_type.upper()} counted ({self.method})"


def _stain_hsv(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)


def wbc_mask(rgb: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels of stained white-cell nuclei, lobes merged."""
    import cv2

    hsv = _stain_hsv(rgb)
    hue, sat = hsv[..., 0], hsv[..., 1]
    raw = ((sat > WBC_MIN_SATURATION) & (hue >= WBC_HUE[0]) & (hue <= WBC_HUE[1])).astype(np.uint8)
    opened = cv2.morphologyEx(raw, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    r = max(1, round(rgb.shape[1] * WBC_MERGE_FRACTION))
    merged = cv2.dilate(
        opened, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    )
    return np.asarray(merged) > 0


def detect_wbc(rgb: np.ndarray, min_area_fraction: float = WBC_MIN_AREA_FRACTION) -> list[CellBox]:
    """White cells of an ``(H, W, 3)`` uint8 RGB smear, as boxes (XYXY pixels)."""
    import cv2

    h, w = rgb.shape[:2]
    m = wbc_mask(rgb).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    cells = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < min_area_fraction * h * w:
            continue
        gx, gy = WBC_BOX_GROWTH * bw, WBC_BOX_GROWTH * bh
        box = (
            max(0.0, x - gx),
            max(0.0, y - gy),
            min(float(w), x + bw + gx),
            min(float(h), y + bh + gy),
        )
        cells.append(CellBox(box_xyxy=box, area_px=area))
    cells = _merge_overlapping(cells)
    cells.sort(key=lambda c: -c.area_px)
    return cells


def _overlap_of_smaller(a: Box, b: Box) -> float:
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def _merge_overlapping(cells: list[CellBox]) -> list[CellBox]:
    """Merge cells whose boxes overlap by at least ``WBC_MERGE_OVERLAP`` of the smaller box:
    the lobes of one nucleus that the dilation did not join. (On BCCD train, the lobes of one
    cell overlapped 0.18-0.52, two touching cells 0.01-0.13.)"""
    merged = True
    while merged and len(cells) > 1:
        merged = False
        for i in range(len(cells)):
            for j in range(i + 1, len(cells)):
                a, b = cells[i].box_xyxy, cells[j].box_xyxy
                if _overlap_of_smaller(a, b) >= WBC_MERGE_OVERLAP:
                    box = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    union = CellBox(box_xyxy=box, area_px=cells[i].area_px + cells[j].area_px)
                    cells = [c for k, c in enumerate(cells) if k not in (i, j)] + [union]
                    merged = True
                    break
            if merged:
                break
    return cells


def detect_rbc(rgb: np.ndarray, min_area_fraction: float = 0.001) -> list[CellBox]:
    """Red cells of an ``(H, W, 3)`` uint8 RGB smear (threshold + distance-transform watershed)."""
    import cv2
    from scipy import ndimage as ndi

    from medloupe.tools.builtin import otsu_threshold

    h, w = rgb.shape[:2]
    sat = cv2.GaussianBlur(_stain_hsv(rgb)[..., 1], (0, 0), 1.5)
    fg = sat > otsu_threshold(sat)
    fg &= ~wbc_mask(rgb)
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg, iterations=2))
    dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    # one marker per cell: maxima of the distance map at least ~a cell radius apart
    radius = max(3, round(min(h, w) * 0.03))
    peaks = (dist == ndi.maximum_filter(dist, size=2 * radius + 1)) & (dist > 0.4 * radius)
    markers, _ = ndi.label(ndi.binary_dilation(peaks, iterations=2))
    markers = markers.astype(np.int32)
    markers[~fg] = -1  # background is not flooded
    ws = cv2.watershed(np.ascontiguousarray(rgb[..., :3][:, :, ::-1]), markers.copy())
    cells = []
    for lab in range(1, int(ws.max()) + 1):
        ys, xs = np.nonzero(ws == lab)
        area = len(xs)
        if area < min_area_fraction * h * w or area > 0.03 * h * w:
            continue
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        cells.append(CellBox(box_xyxy=box, area_px=area))
    return cells


def _wbc_question(question: str, image: ImageRecord) -> dict[str, Any] | None:
    """Colour images asked to count or locate white blood cells."""
    asks = _COUNT_WBC_Q.search(question) or _LOCATE_WBC_Q.search(question)
    return {"cell_type": "wbc"} if image.channels == 3 and asks else None


def _cells_statement(question: str, evidence: list[Evidence]) -> Statement | None:
    """The white-cell count ("how many ...") and boxes ("locate ...") the counter found."""
    counts = [
        e for e in successful(evidence, "count_cells") if (e.output or {}).get("cell_type") == "wbc"
    ]
    if not counts:
        return None
    ev, out = counts[0], counts[0].output or {}
    parts: list[str] = []
    claims: list[Claim] = []
    regions: tuple[Region, ...] = ()
    if _COUNT_WBC_Q.search(question):
        n = int(out.get("count", 0))
        text = (
            f"A classical stain-threshold counter ({out.get('method')}) found {n} white "
            f"blood cell{'s' if n != 1 else ''}."
        )
        claims.append(Claim(text=text, evidence_ids=[ev.id]))
        parts.append(str(n))
    if _LOCATE_WBC_Q.search(question) and ev.regions:
        cells = ev.regions  # largest first
        boxes = "; ".join(box_text(r.box_xyxy) for r in cells)
        text = (
            f"A classical stain-threshold detector boxed {len(cells)} white blood "
            f"cell{'s' if len(cells) != 1 else ''} (XYXY pixels): {boxes}."
        )
        claims.append(Claim(text=text, evidence_ids=[ev.id]))
        parts.append(boxes)
        regions = tuple(cells)  # the located cells lead the answer's regions
    if not parts:
        return None
    return Statement(
        parts=tuple(parts), claims=tuple(claims), regions=regions, confidence=WBC_COUNT_CONFIDENCE
    )


@tool(name="count_cells", timeout_s=60.0, suggest=_wbc_question, states=_cells_statement)
def count_cells(args: CountCellsArgs, ctx: ToolContext) -> CountCellsResult:
    """Count and box white (wbc) or red (rbc) blood cells on a stained smear with classical
    thresholding, morphology and watershed (no trained model)."""
    px = ctx.pixels()
    if px.ndim != 3:
        raise ValueError(
            "count_cells needs a colour (stained) microscopy image; this one is grayscale"
        )
    if args.cell_type == "wbc":
        cells = detect_wbc(px, args.min_area_fraction or WBC_MIN_AREA_FRACTION)
        method = "classical:stain-threshold"
    else:
        cells = detect_rbc(px, args.min_area_fraction or 0.001)
        method = "classical:threshold+watershed"
    name = args.cell_type.upper()
    regions = [
        Region(id="pending", box_xyxy=c.box_xyxy, label=f"{name} {i + 1}")
        for i, c in enumerate(cells)
    ]
    return CountCellsResult(
        cell_type=args.cell_type, count=len(cells), cells=cells, method=method, regions=regions
    )
