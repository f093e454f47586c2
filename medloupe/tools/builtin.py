"""Built-in tools that need no weights: image facts, candidate regions, crop, measure, window.

All coordinates are ``XYXY`` / ``(x, y)`` pixels of the run's image. Lengths are in mm when
the image's pixel spacing is known, otherwise in pixels with a warning.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from medloupe.io.records import ImageRecord
from medloupe.schemas import Box, Claim, Evidence, Region
from medloupe.text import attribute_claims
from medloupe.tools.base import Statement, Tool, ToolContext, ToolResult, successful, tool

MODALITY_NAMES = {
    "CR": "computed radiography (X-ray)",
    "DX": "digital radiography (X-ray)",
    "CT": "computed tomography (CT)",
    "MR": "magnetic resonance imaging (MRI)",
    "US": "ultrasound",
    "MG": "mammography",
    "NM": "nuclear medicine",
    "PT": "positron emission tomography (PET)",
    "XA": "X-ray angiography",
    "RF": "radiofluoroscopy",
    "SM": "slide microscopy",
    "OT": "unknown (other)",
}


def _clamp_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (
        max(0, min(width, math.floor(x0))),
        max(0, min(height, math.floor(y0))),
        max(0, min(width, math.ceil(x1))),
        max(0, min(height, math.ceil(y1))),
    )


def _check_inside(box: Box, width: int, height: int) -> None:
    x0, y0, x1, y1 = box
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(
            f"box {list(box)} lies outside the {width}x{height} image (XYXY pixels expected)"
        )


# --- image_info ---------------------------------------------------------------------------


class NoArgs(BaseModel):
    """This tool takes no arguments."""

    model_config = {"extra": "forbid"}


class ImageInfo(ToolResult):
    modality: str
    modality_name: str
    body_part: str | None
    view_position: str | None
    format: str
    width_px: int
    height_px: int
    spacing_mm: tuple[float, float] | None
    field_of_view_mm: tuple[float, float] | None
    value_unit: str | None
    intensity_p1: float
    intensity_p50: float
    intensity_p99: float
    notes: list[str]

    def summary(self) -> str:
        part = f" of the {self.body_part.lower()}" if self.body_part else ""
        size = f"{self.width_px}x{self.height_px} px"
        if self.field_of_view_mm:
            size += f" ({self.field_of_view_mm[0]:.0f}x{self.field_of_view_mm[1]:.0f} mm)"
        else:
            size += " (pixel spacing unknown)"
        return f"{self.modality} - {self.modality_name}{part}; {size}"


# questions about the modality itself; a question that merely names one ("Locate the liver
# in this CT image") is not one of them
_MODALITY_Q = re.compile(
    r"\b(modality|imaging (technique|method|type)|what (kind|type) of (image|scan|imaging)|"
    r"how was (this|the) image (taken|acquired)|"
    r"(is|was) (this|the image) (an? )?(x-?ray|ct|mri|ultrasound|radiograph)"
    # ... but not "is this radiograph under-exposed?": the modality must end the question
    r"(?=\s*(\?|$|\.|or\b|(image|scan|study|film)\b)))",
    re.I,
)
_BODY_Q = re.compile(
    r"\b(body part|which organ system|what part of the body|region of the body|anatomy)\b", re.I
)
_SIZE_Q = re.compile(
    r"\b(size|dimensions?|field of view|pixel spacing|resolution|how large|how big)\b", re.I
)
# DICOM modality codes -> the modality values yes/no questions claim (medloupe.text)
_CLAIMED_MODALITY = {
    "CT": "CT",
    "MR": "MRI",
    **dict.fromkeys(("CR", "DX", "DR", "RG", "MG", "RF", "XA", "PX", "IO"), "X-ray"),
}


def _header_statement(question: str, evidence: list[Evidence]) -> Statement | None:
    """What the header states: the modality (a yes/no "Is this a CT scan?" or its name, with
    the body part), and the size and field of view when the question asks."""
    info = successful(evidence, "image_info")
    if not info:
        return None
    ev, out = info[0], info[0].output or {}
    modality = out.get("modality")
    claims: list[Claim] = []
    parts: list[str] = []
    if modality not in (None, "OT"):  # OT: the file does not say
        name = out.get("modality_name", modality)
        asserted = attribute_claims(question)
        if asserted is not None and set(asserted) == {"modality"}:
            claimed = asserted["modality"]
            same = _CLAIMED_MODALITY.get(str(modality)) == claimed
            text = (
                f"The image header gives modality {modality} ({name}), so it is "
                f"{'' if same else 'not '}{claimed}."
            )
            claims.append(Claim(text=text, evidence_ids=[ev.id]))
            parts.append("yes" if same else "no")
        elif _MODALITY_Q.search(question) or _BODY_Q.search(question):
            body = out.get("body_part")
            claims.append(
                Claim(
                    text=f"The image header gives modality {modality} ({name}).",
                    evidence_ids=[ev.id],
                )
            )
            if body:
                claims.append(
                    Claim(
                        text=f"The header gives the body part examined as {body}.",
                        evidence_ids=[ev.id],
                    )
                )
            parts.append(f"{name}" + (f" of the {str(body).lower()}" if body else ""))
    if _SIZE_Q.search(question):
        w, h, fov = out.get("width_px"), out.get("height_px"), out.get("field_of_view_mm")
        text = f"{w}x{h} pixels"
        if fov:
            text += f", {fov[0]:.0f}x{fov[1]:.0f} mm"
            claims.append(
                Claim(
                    text=f"The field of view is {fov[0]:.0f}x{fov[1]:.0f} mm.",
                    evidence_ids=[ev.id],
                )
            )
        else:
            text += " (pixel spacing unknown, so no size in mm)"
        claims.append(Claim(text=f"The image is {w}x{h} pixels.", evidence_ids=[ev.id]))
        parts.append(text)
    return Statement(parts=tuple(parts), claims=tuple(claims)) if parts else None


def uint8_percentiles(values: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(values, qs)`` (linear) of a ``uint8`` array, from its histogram: no
    sorted float copy of a large image."""
    counts = np.cumsum(np.bincount(values.ravel(), minlength=256))
    n = int(counts[-1])

    def at(rank: int) -> float:  # the rank-th smallest value (0-based)
        return float(np.searchsorted(counts, rank, side="right"))

    out = []
    for q in qs:
        k = (n - 1) * q / 100.0
        lo, hi = math.floor(k), math.ceil(k)
        out.append(at(lo) + (at(hi) - at(lo)) * (k - lo))
    return tuple(out)


def _always(question: str, image: ImageRecord) -> dict[str, Any]:
    return {}


@tool(name="image_info", suggest=_always, states=_header_statement)
def image_info(args: NoArgs, ctx: ToolContext) -> ImageInfo:
    """Technical facts of the image: modality, body part, size, pixel spacing, intensities."""
    rec = ctx.image
    raw = ctx.raw()
    if raw is not None:
        p1, p50, p99 = (float(v) for v in np.percentile(raw, [1, 50, 99]))
    else:
        p1, p50, p99 = uint8_percentiles(ctx.gray(), (1, 50, 99))
    fov = None
    if rec.spacing_mm:
        fov = (rec.width * rec.spacing_mm[1], rec.height * rec.spacing_mm[0])
    return ImageInfo(
        modality=rec.modality,
        modality_name=MODALITY_NAMES.get(rec.modality.upper(), rec.modality),
        body_part=rec.body_part,
        view_position=rec.view_position,
        format=rec.format,
        width_px=rec.width,
        height_px=rec.height,
        spacing_mm=rec.spacing_mm,
        field_of_view_mm=fov,
        value_unit=rec.value_unit,
        intensity_p1=p1,
        intensity_p50=p50,
        intensity_p99=p99,
        notes=list(rec.notes),
    )


# --- find_regions -------------------------------------------------------------------------


class FindRegionsArgs(BaseModel):
    polarity: Literal["dark", "bright"] = Field(
        default="dark", description="look for regions darker or brighter than Otsu's threshold"
    )
    max_regions: int = Field(default=4, ge=1, le=20)
    min_area_fraction: float = Field(
        default=0.01, gt=0.0, lt=1.0, description="smallest region kept, as a share of the image"
    )
    exclude_border: bool = Field(
        default=True, description="drop regions touching the image border (background, air)"
    )


class RegionStats(BaseModel):
    box_xyxy: Box
    area_px: int
    area_mm2: float | None
    mean_intensity: float
    centroid_xy: tuple[float, float]


class FindRegionsResult(ToolResult):
    threshold: float
    polarity: str
    found: list[RegionStats]

    def summary(self) -> str:
        if not self.found:
            return f"no {self.polarity} regions above the size limit"
        boxes = "; ".join(
            f"[{', '.join(f'{v:.0f}' for v in r.box_xyxy)}] {r.area_px} px" for r in self.found
        )
        head = f"{len(self.found)} {self.polarity} region(s)"
        return f"{head} (Otsu threshold {self.threshold:.0f}): {boxes}"


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a ``uint8`` image (maximises between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = 0.0
    return float(np.argmax(between))


def _dark_regions(question: str, image: ImageRecord) -> dict[str, Any] | None:
    """Grayscale images: candidate regions to look at more closely."""
    return {"polarity": "dark"} if image.channels == 1 else None


@tool(name="find_regions", suggest=_dark_regions)
def find_regions(args: FindRegionsArgs, ctx: ToolContext) -> FindRegionsResult:
    """Candidate regions by intensity (Otsu threshold + connected components), largest first.

    A classical, weight-free instrument: on a chest radiograph the dark regions inside the
    body are typically the lung fields; on CT, air-filled structures. It names no anatomy.
    """
    from scipy import ndimage as ndi

    gray = ctx.gray()
    h, w = gray.shape
    scale = max(1.0, max(h, w) / 512.0)
    small = gray
    if scale > 1.0:
        step = math.ceil(scale)
        small = gray[::step, ::step]
        scale = float(step)
    smooth = ndi.gaussian_filter(small.astype(np.float32), sigma=2.0)
    smooth8 = np.clip(smooth, 0, 255).astype(np.uint8)
    t = otsu_threshold(smooth8)
    mask = smooth8 < t if args.polarity == "dark" else smooth8 > t
    mask = ndi.binary_opening(mask, structure=np.ones((5, 5), dtype=bool))
    labels, n = ndi.label(mask)
    found: list[RegionStats] = []
    regions: list[Region] = []
    if n:
        objects = ndi.find_objects(labels)
        areas = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        means = ndi.mean(small, labels, index=np.arange(1, n + 1))
        order = np.argsort(-areas)
        sh, sw = small.shape
        min_area = args.min_area_fraction * sh * sw
        spacing = ctx.image.spacing_mm
        for idx in order:
            if areas[idx] < min_area or len(found) >= args.max_regions:
                break
            sl = objects[idx]
            if sl is None:
                continue
            ys, xs = sl
            if args.exclude_border and (
                ys.start == 0 or xs.start == 0 or ys.stop == sh or xs.stop == sw
            ):
                continue
            box = (
                xs.start * scale,
                ys.start * scale,
                min(w, xs.stop * scale),
                min(h, ys.stop * scale),
            )
            cy, cx = ndi.center_of_mass(labels == idx + 1)
            area_px = int(areas[idx] * scale * scale)
            found.append(
                RegionStats(
                    box_xyxy=box,
                    area_px=area_px,
                    area_mm2=area_px * spacing[0] * spacing[1] if spacing else None,
                    mean_intensity=float(means[idx]),
                    centroid_xy=(float(cx * scale), float(cy * scale)),
                )
            )
            regions.append(
                Region(id="pending", box_xyxy=box, label=f"{args.polarity} region {len(found)}")
            )
    return FindRegionsResult(threshold=t, polarity=args.polarity, found=found, regions=regions)


# --- crop ---------------------------------------------------------------------------------


class CropArgs(BaseModel):
    box_xyxy: Box = Field(description="XYXY pixels of the region to crop")
    margin: float = Field(
        default=0.15, ge=0.0, le=2.0, description="context added on each side, share of box size"
    )
    zoom_to: int = Field(
        default=512, ge=32, le=2048, description="longer side of the output crop, pixels"
    )
    window: Literal["display", "local", "lung", "mediastinum", "bone", "brain", "abdomen"] = Field(
        default="display",
        description=(
            "display: the image as shown; local: contrast stretched to the 1st-99th "
            "percentile of the modality values inside the crop (CT/MR: the raw values); "
            "a preset: that HU window (CT only)"
        ),
    )

    @model_validator(mode="after")
    def _box(self) -> CropArgs:
        x0, y0, x1, y1 = self.box_xyxy
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"box_xyxy {list(self.box_xyxy)} must have x0 < x1 and y0 < y1")
        return self


class CropResult(ToolResult):
    crop_artifact: str
    crop_box_xyxy: Box
    scale: float = Field(description="output pixels per source pixel")
    window: str = Field(default="display", description="how the crop's values were rendered")
    window_center: float | None = None
    window_width: float | None = None


def margin_box(box: Box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` (XYXY pixels) grown by ``margin`` of its size on each side and clamped to a
    ``width`` x ``height`` image, as XYXY int pixels.

    Raises:
        ValueError: the box lies outside the image or leaves no pixels inside it.
    """
    _check_inside(box, width, height)
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    cx0, cy0, cx1, cy1 = _clamp_box((x0 - mx, y0 - my, x1 + mx, y1 + my), width, height)
    if cx1 - cx0 < 1 or cy1 - cy0 < 1:
        raise ValueError(f"box {list(box)} leaves no pixels inside the {width}x{height} image")
    return cx0, cy0, cx1, cy1


def crop_array(
    image: np.ndarray, box: Box, margin: float, zoom_to: int
) -> tuple[np.ndarray, tuple[int, int, int, int], float]:
    """Crop ``image`` (``(H, W)`` or ``(H, W, C)`` uint8) around ``box`` with ``margin``, clamped
    to the image, resized so its longer side is ``zoom_to`` pixels.

    Returns:
        The crop, the clamped crop box (XYXY int pixels), and the scale factor applied.
    """
    from PIL import Image

    h, w = image.shape[:2]
    cx0, cy0, cx1, cy1 = margin_box(box, margin, w, h)
    patch = image[cy0:cy1, cx0:cx1]
    scale = zoom_to / max(patch.shape[0], patch.shape[1])
    size = (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale)))
    resized = np.asarray(Image.fromarray(patch).resize(size, Image.Resampling.LANCZOS))
    return resized, (cx0, cy0, cx1, cy1), scale


@tool(name="crop")
def crop(args: CropArgs, ctx: ToolContext) -> CropResult:
    """Crop a region with a context margin (clamped to the image) and zoom it for a closer look;
    optionally re-windowed (CT/MR modality values) for the region's own contrast."""
    from medloupe.io.render import percentile_window, window_linear

    source = ctx.pixels()
    center = width = None
    raw = ctx.raw()
    if args.window in WINDOW_PRESETS:
        if raw is None or ctx.image.value_unit != "HU":
            raise ValueError(f"window {args.window!r} is an HU preset; this image has no HU values")
        center, width = WINDOW_PRESETS[args.window]
        source = window_linear(raw, center, width)
    elif args.window == "local":
        values = raw if raw is not None else ctx.gray()
        h, w = values.shape[:2]
        x0, y0, x1, y1 = _clamp_box(args.box_xyxy, w, h)
        inner = values[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else values
        center, width = percentile_window(inner.astype(np.float32), 1.0, 99.0)
        source = window_linear(values, center, width)
    patch, box, scale = crop_array(source, args.box_xyxy, args.margin, args.zoom_to)
    artifact = ctx.store.put_png(patch, kind="crop")
    region = Region(id="pending", box_xyxy=tuple(float(v) for v in box), label="crop")  # type: ignore[arg-type]
    return CropResult(
        crop_artifact=artifact,
        crop_box_xyxy=region.box_xyxy,
        scale=scale,
        window=args.window,
        window_center=center,
        window_width=width,
        regions=[region],
        artifacts=[artifact],
    )


# --- measure ------------------------------------------------------------------------------


class MeasureArgs(BaseModel):
    points: list[tuple[float, float]] | None = Field(
        default=None, description="two (x, y) pixel points: their distance is measured"
    )
    box_xyxy: Box | None = Field(
        default=None, description="a box: its width, height, diagonal and area are measured"
    )
    mask_artifact: str | None = Field(
        default=None,
        description=(
            "a mask artifact (from `segment`): its area, perimeter, largest diameter and tight "
            "box are measured"
        ),
    )

    @model_validator(mode="after")
    def _one(self) -> MeasureArgs:
        given = [v is not None for v in (self.points, self.box_xyxy, self.mask_artifact)]
        if sum(given) != 1:
            raise ValueError(
                "give exactly one of `points` (two points), `box_xyxy` or `mask_artifact`"
            )
        if self.points is not None and len(self.points) != 2:
            raise ValueError(f"`points` needs exactly two (x, y) points, got {len(self.points)}")
        if self.box_xyxy is not None:
            x0, y0, x1, y1 = self.box_xyxy
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"box_xyxy {list(self.box_xyxy)} must have x0 < x1 and y0 < y1")
        return self


class MeasureResult(ToolResult):
    unit: Literal["mm", "px"]
    distance: float | None = None
    width: float | None = None
    height: float | None = None
    diagonal: float | None = None
    area: float | None = Field(default=None, description="mm^2 or px^2")
    perimeter: float | None = None
    max_diameter: float | None = Field(default=None, description="largest distance across a mask")
    warning: str | None = None

    def summary(self) -> str:
        parts = [
            f"{k} {v:.1f} {self.unit}"
            for k, v in (
                ("distance", self.distance),
                ("width", self.width),
                ("height", self.height),
                ("diagonal", self.diagonal),
                ("perimeter", self.perimeter),
                ("largest diameter", self.max_diameter),
            )
            if v is not None
        ]
        if self.area is not None:
            parts.append(f"area {self.area:.1f} {self.unit}^2")
        return ", ".join(parts) + (f" ({self.warning})" if self.warning else "")


def _measure_region(box: Box, reason: str) -> dict[str, Any]:
    return {"box_xyxy": list(box)}


@tool(name="measure", follow_up=_measure_region)
def measure(args: MeasureArgs, ctx: ToolContext) -> MeasureResult:
    """Distance between two points; a box's width, height, diagonal and area; or a mask's area,
    perimeter and largest diameter. mm when the pixel spacing is known, pixels with a warning
    otherwise."""
    rec = ctx.image
    spacing = rec.spacing_mm
    sy, sx = spacing if spacing else (1.0, 1.0)
    unit: Literal["mm", "px"] = "mm" if spacing else "px"
    warning = None if spacing else "pixel spacing unknown: lengths are in pixels, not mm"
    if args.points is not None:
        (ax, ay), (bx, by) = args.points
        for x, y in args.points:
            if not (0 <= x <= rec.width and 0 <= y <= rec.height):
                raise ValueError(
                    f"point ({x}, {y}) lies outside the {rec.width}x{rec.height} image"
                )
        d = math.hypot((bx - ax) * sx, (by - ay) * sy)
        return MeasureResult(unit=unit, distance=d, warning=warning)
    if args.mask_artifact is not None:
        from medloupe.tools.measures import mask_measures

        mask = ctx.store.load(args.mask_artifact)
        if mask.shape[:2] != (rec.height, rec.width):
            raise ValueError(
                f"mask {args.mask_artifact} is {mask.shape[1]}x{mask.shape[0]}, not the "
                f"{rec.width}x{rec.height} image"
            )
        if mask.ndim == 3:
            mask = mask[..., 0]
        m = mask_measures(mask, spacing)
        mm = spacing is not None
        region = Region(
            id="pending",
            box_xyxy=m.box_xyxy,
            label="measured mask",
            mask_artifact=args.mask_artifact,
        )
        return MeasureResult(
            unit=unit,
            width=(m.box_xyxy[2] - m.box_xyxy[0]) * sx,
            height=(m.box_xyxy[3] - m.box_xyxy[1]) * sy,
            area=m.area_mm2 if mm else float(m.area_px),
            perimeter=m.perimeter_mm if mm else m.perimeter_px,
            max_diameter=m.max_diameter_mm if mm else m.max_diameter_px,
            warning=warning,
            regions=[region],
        )
    assert args.box_xyxy is not None
    _check_inside(args.box_xyxy, rec.width, rec.height)
    x0, y0, x1, y1 = args.box_xyxy
    bw, bh = (x1 - x0) * sx, (y1 - y0) * sy
    region = Region(id="pending", box_xyxy=args.box_xyxy, label="measured box")
    return MeasureResult(
        unit=unit,
        width=bw,
        height=bh,
        diagonal=math.hypot(bw, bh),
        area=bw * bh,
        warning=warning,
        regions=[region],
    )


# --- window -------------------------------------------------------------------------------

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    # (centre, width) in HU
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}


class WindowArgs(BaseModel):
    preset: Literal["lung", "mediastinum", "bone", "brain", "abdomen"] | None = None
    center: float | None = None
    width: float | None = Field(default=None, gt=1.0)

    @model_validator(mode="after")
    def _one(self) -> WindowArgs:
        if self.preset is None and (self.center is None or self.width is None):
            raise ValueError("give a `preset` or both `center` and `width`")
        return self


class WindowResult(ToolResult):
    windowed_artifact: str
    center: float
    width: float
    unit: str | None


@tool(name="window", modalities={"CT", "MR"})
def window(args: WindowArgs, ctx: ToolContext) -> WindowResult:
    """Re-render a CT/MR image with a window (presets in HU: lung, mediastinum, bone, brain,
    abdomen; or an explicit centre and width)."""
    from medloupe.io.render import window_linear

    raw = ctx.raw()
    if raw is None:
        raise ValueError(
            "the image has no modality values to window (it is not DICOM/NIfTI CT or MR)"
        )
    if args.preset is not None:
        if ctx.image.value_unit != "HU":
            raise ValueError(f"preset {args.preset!r} is in HU but the image's values are not HU")
        center, width = WINDOW_PRESETS[args.preset]
    else:
        assert args.center is not None and args.width is not None
        center, width = args.center, args.width
    artifact = ctx.store.put_png(window_linear(raw, center, width), kind="image")
    return WindowResult(
        windowed_artifact=artifact,
        center=center,
        width=width,
        unit=ctx.image.value_unit,
        artifacts=[artifact],
    )


def builtin_tools() -> list[Tool]:
    """The tools medloupe itself provides."""
    return [image_info, find_regions, crop, measure, window]
