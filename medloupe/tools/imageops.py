"""Image operations as tools: zoom, CLAHE contrast, overlay drawing.

All coordinates are pixels of the run's image (``(x, y)`` points, XYXY boxes). Outputs are
PNG artifacts of the run; the source image is never modified.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field, model_validator

from medloupe.schemas import Box, Region
from medloupe.tools.base import Tool, ToolContext, ToolResult, tool
from medloupe.tools.builtin import _check_inside, _clamp_box, crop_array

# --- zoom ---------------------------------------------------------------------------------


class ZoomArgs(BaseModel):
    model_config = {"extra": "forbid"}

    center_xy: tuple[float, float] = Field(description="(x, y) pixel point to zoom into")
    factor: float = Field(
        default=2.0, ge=1.0, le=16.0, description="magnification: 2 shows half the width"
    )
    output_size: int = Field(default=512, ge=64, le=2048, description="longer output side, px")


class ZoomResult(ToolResult):
    zoom_artifact: str
    view_box_xyxy: Box = Field(description="the part of the image shown (clamped to it)")
    scale: float = Field(description="output pixels per source pixel")


@tool(name="zoom")
def zoom(args: ZoomArgs, ctx: ToolContext) -> ZoomResult:
    """Magnify the image around a point (the view keeps the image's aspect and is shifted to
    stay inside the image)."""
    rec = ctx.image
    cx, cy = args.center_xy
    if not (0 <= cx <= rec.width and 0 <= cy <= rec.height):
        raise ValueError(f"center ({cx:g}, {cy:g}) lies outside the {rec.width}x{rec.height} image")
    vw, vh = rec.width / args.factor, rec.height / args.factor
    x0 = min(max(0.0, cx - vw / 2), rec.width - vw)
    y0 = min(max(0.0, cy - vh / 2), rec.height - vh)
    box = (x0, y0, x0 + vw, y0 + vh)
    patch, (bx0, by0, bx1, by1), scale = crop_array(ctx.pixels(), box, 0.0, args.output_size)
    artifact = ctx.store.put_png(patch, kind="crop")
    view = (float(bx0), float(by0), float(bx1), float(by1))
    return ZoomResult(
        zoom_artifact=artifact,
        view_box_xyxy=view,
        scale=scale,
        artifacts=[artifact],
        regions=[Region(id="pending", box_xyxy=view, label=f"zoom x{args.factor:g}")],
    )


# --- contrast (CLAHE) ----------------------------------------------------------------------


class ContrastArgs(BaseModel):
    model_config = {"extra": "forbid"}

    clip_limit: float = Field(
        default=2.0, gt=0.0, le=40.0, description="CLAHE clip limit (higher: more contrast)"
    )
    tiles: int = Field(default=8, ge=1, le=64, description="tiles per side of the CLAHE grid")
    box_xyxy: Box | None = Field(default=None, description="enhance only this region (crop)")


class ContrastResult(ToolResult):
    enhanced_artifact: str
    clip_limit: float
    tiles: int


@tool(name="contrast")
def contrast(args: ContrastArgs, ctx: ToolContext) -> ContrastResult:
    """Contrast-limited adaptive histogram equalisation (CLAHE) of the image or of a region;
    colour images are equalised on lightness only."""
    import cv2

    px = ctx.pixels()
    box = None
    if args.box_xyxy is not None:
        h, w = px.shape[:2]
        _check_inside(args.box_xyxy, w, h)
        x0, y0, x1, y1 = _clamp_box(args.box_xyxy, w, h)
        px = px[y0:y1, x0:x1]
        box = (float(x0), float(y0), float(x1), float(y1))
    clahe = cv2.createCLAHE(clipLimit=args.clip_limit, tileGridSize=(args.tiles, args.tiles))
    if px.ndim == 2:
        out = clahe.apply(np.ascontiguousarray(px))
    else:
        lab = cv2.cvtColor(np.ascontiguousarray(px[..., :3]), cv2.COLOR_RGB2LAB)
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
        out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    artifact = ctx.store.put_png(out, kind="image")
    regions = [Region(id="pending", box_xyxy=box, label="contrast")] if box else []
    return ContrastResult(
        enhanced_artifact=artifact,
        clip_limit=args.clip_limit,
        tiles=args.tiles,
        artifacts=[artifact],
        regions=regions,
    )


# --- overlay ------------------------------------------------------------------------------


class OverlayArgs(BaseModel):
    model_config = {"extra": "forbid"}

    boxes_xyxy: list[Box] = Field(default_factory=list, max_length=32)
    mask_artifacts: list[str] = Field(default_factory=list, max_length=32)
    labels: list[str] = Field(
        default_factory=list, description="one per box, then one per mask (optional)"
    )

    @model_validator(mode="after")
    def _some(self) -> OverlayArgs:
        if not self.boxes_xyxy and not self.mask_artifacts:
            raise ValueError("give boxes_xyxy and/or mask_artifacts to draw")
        return self


class OverlayResult(ToolResult):
    overlay_artifact: str
    drawn: int


@tool(name="overlay")
def overlay(args: OverlayArgs, ctx: ToolContext) -> OverlayResult:
    """Draw boxes and tinted masks (numbered) over the image, for review or a second look."""
    from medloupe.overlay import draw_overlay
    from medloupe.tools.measures import mask_measures

    rgb = ctx.rgb()
    h, w = rgb.shape[:2]
    regions: list[Region] = []
    masks: dict[str, np.ndarray] = {}
    labels = list(args.labels)
    for i, b in enumerate(args.boxes_xyxy):
        _check_inside(b, w, h)
        label = labels[i] if i < len(labels) else f"box {i + 1}"
        regions.append(Region(id=f"b{i}", box_xyxy=b, label=label))
    for j, art in enumerate(args.mask_artifacts):
        mask = ctx.store.load(art)
        mask = mask[..., 0] if mask.ndim == 3 else mask
        if mask.shape != (h, w):
            raise ValueError(f"mask {art} is {mask.shape[1]}x{mask.shape[0]}, not {w}x{h}")
        k = len(args.boxes_xyxy) + j
        label = labels[k] if k < len(labels) else f"mask {j + 1}"
        m = mask_measures(mask, None)
        regions.append(Region(id=f"m{j}", box_xyxy=m.box_xyxy, label=label, mask_artifact=art))
        masks[f"m{j}"] = mask > 0
    drawn = draw_overlay(rgb, regions, masks)
    artifact = ctx.store.put_png(drawn, kind="overlay")
    out_regions = [r.model_copy(update={"id": "pending"}) for r in regions]
    return OverlayResult(
        overlay_artifact=artifact,
        drawn=len(regions),
        artifacts=[artifact],
        regions=out_regions,
    )


def image_op_tools() -> list[Tool]:
    """zoom, contrast and overlay."""
    return [zoom, contrast, overlay]
