"""The ``segment`` tool: prompted masks from SAM / MedSAM, or the classical segmenter.

Prompts are XYXY pixel boxes (one mask each) and/or ``(x, y)`` pixel points with labels
(1 foreground, 0 background). Each mask is stored as a PNG artifact (0/255) and measured:
tight box, area (px, and mm² when the pixel spacing is known), perimeter and the largest
diameter (max Feret).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, create_model, model_validator

from medloupe.config import Settings
from medloupe.errors import WeightsMissingError
from medloupe.schemas import Box, Region
from medloupe.tools.base import Availability, Tool, ToolContext, ToolResult
from medloupe.tools.builtin import _check_inside
from medloupe.tools.measures import MaskMeasures, check_point, mask_measures
from medloupe.tools.sam import (
    SAM_MODELS,
    EmbeddingCache,
    PromptedSegmenter,
    SamEngine,
    SamModelSpec,
)

log = logging.getLogger(__name__)

MAX_PROMPT_BOXES = 16
MAX_PROMPT_POINTS = 16
# auto: with box prompts MedSAM first (trained on medical boxes), then the largest SAM present
AUTO_ORDER_BOXES = ("medsam_vit_b", "sam_vit_h", "sam_vit_l", "sam_vit_b")
AUTO_ORDER_POINTS = ("sam_vit_h", "sam_vit_l", "sam_vit_b")


# --- the tool -----------------------------------------------------------------------------


class SegmentedMask(MaskMeasures):
    mask_artifact: str
    score: float = Field(ge=0.0, le=1.0, description="the model's own quality estimate")
    method: str = Field(description="sam_vit_b, medsam_vit_b, classical:box-otsu, ...")
    prompt: str = Field(description="which prompt produced it")


class SegmentResult(ToolResult):
    model: str
    masks: list[SegmentedMask]
    warnings: list[str] = Field(default_factory=list)

    def summary(self) -> str:
        if not self.masks:
            return f"{self.model}: no mask"
        parts = []
        for m in self.masks:
            area = f"{m.area_mm2:.0f} mm^2" if m.area_mm2 is not None else f"{m.area_px} px"
            parts.append(
                f"[{', '.join(f'{v:.0f}' for v in m.box_xyxy)}] {area} (score {m.score:.2f})"
            )
        text = f"{len(self.masks)} mask(s) by {self.model}: " + "; ".join(parts)
        return text + (f" ({'; '.join(self.warnings)})" if self.warnings else "")


class _SegmentArgsBase(BaseModel):
    model_config = {"extra": "forbid"}

    boxes_xyxy: list[Box] = Field(
        default_factory=list,
        max_length=MAX_PROMPT_BOXES,
        description="XYXY pixel boxes; one mask per box",
    )
    points_xy: list[tuple[float, float]] = Field(
        default_factory=list,
        max_length=MAX_PROMPT_POINTS,
        description="(x, y) pixel points, alone or with one box",
    )
    point_labels: list[Literal[0, 1]] | None = Field(
        default=None, description="one per point: 1 foreground (default), 0 background"
    )
    label: str | None = Field(
        default=None, max_length=80, description="what the prompt is meant to outline"
    )

    @model_validator(mode="after")
    def _prompts(self) -> _SegmentArgsBase:
        if not self.boxes_xyxy and not self.points_xy:
            raise ValueError("give at least one box (boxes_xyxy) or point (points_xy)")
        if self.points_xy and len(self.boxes_xyxy) > 1:
            raise ValueError("points can be combined with at most one box")
        if self.point_labels is not None and len(self.point_labels) != len(self.points_xy):
            raise ValueError(
                f"{len(self.points_xy)} points but {len(self.point_labels)} point_labels"
            )
        if self.point_labels is not None and self.points_xy and not any(self.point_labels):
            raise ValueError("at least one point must be foreground (label 1)")
        for b in self.boxes_xyxy:
            if not (b[2] > b[0] and b[3] > b[1]):
                raise ValueError(f"box {list(b)} must have x0 < x1 and y0 < y1")
        return self


def segment_args_model(model_names: list[str]) -> type[_SegmentArgsBase]:
    """The input model of a ``segment`` tool whose ``model`` choices are ``model_names``
    (one class per set of names)."""
    return _segment_args_model(tuple(model_names))


@functools.lru_cache(maxsize=32)
def _segment_args_model(model_names: tuple[str, ...]) -> type[_SegmentArgsBase]:
    choices: Any = Literal[tuple(["auto", "classical", *model_names])]
    return create_model(
        "SegmentArgs",
        __base__=_SegmentArgsBase,
        model=(
            choices,
            Field(
                default="auto",
                description=(
                    "auto: MedSAM/SAM when a checkpoint is on this machine, else classical; "
                    "or name one (a named SAM model whose weights are missing is an error)"
                ),
            ),
        ),
    )


class SegmentTool(Tool):
    """Prompted segmentation (SAM / MedSAM / classical) with mask measures.

    Args:
        models: the SAM registry to offer (default :data:`~medloupe.tools.sam.SAM_MODELS`).
        checkpoints: explicit checkpoint paths by model name.
        device: torch device for SAM models (default CUDA when present).
        cache_items: images whose embeddings are kept (LRU, per tool instance).
        download: let an explicitly named model download its published checkpoint (verified
            SHA-256; never when offline). Default: ``Settings.download_weights``.
    """

    name = "segment"
    description = (
        "Outline a structure from a box and/or points: a mask (PNG artifact) with its tight box, "
        "area (mm^2 when the spacing is known), perimeter and largest diameter. SAM/MedSAM when "
        "a checkpoint is present, otherwise a classical segmenter (named as such)."
    )
    output_model = SegmentResult
    timeout_s = 300.0

    def __init__(
        self,
        models: Mapping[str, SamModelSpec] | None = None,
        *,
        checkpoints: Mapping[str, str | os.PathLike[str]] | None = None,
        device: str | None = None,
        cache_items: int = 8,
        download: bool | None = None,
    ) -> None:
        from medloupe.tools.classical import ClassicalSegmenter

        self.models = dict(SAM_MODELS if models is None else models)
        self.checkpoints = dict(checkpoints or {})
        self.device = device
        self.cache = EmbeddingCache(cache_items)
        self.download = Settings.from_env().download_weights if download is None else download
        self.input_model = segment_args_model(list(self.models))
        self.classical = ClassicalSegmenter()
        self._engines: dict[str, SamEngine] = {}
        self._lock = threading.Lock()

    def engine(self, name: str) -> SamEngine:
        """The (lazily loading) engine of SAM model ``name``."""
        with self._lock:
            if name not in self._engines:
                self._engines[name] = SamEngine(
                    self.models[name],
                    checkpoint=self.checkpoints.get(name),
                    device=self.device,
                    cache=self.cache,
                    download=self.download,
                )
            return self._engines[name]

    def present(self) -> list[str]:
        """SAM-family models whose checkpoints are on this machine (no loading)."""
        out = []
        for name in self.models:
            try:
                if self.engine(name).weights_present():
                    out.append(name)
            except WeightsMissingError as exc:  # a mistyped env var path: say so, skip it
                log.warning("%s", exc)
        return out

    def available(self) -> Availability:
        present = self.present()
        if present:
            return Availability(True, f"ready: {', '.join(present)} and the classical segmenter")
        envs = ", ".join(
            spec.weights.env_var for spec in self.models.values() if spec.weights is not None
        )
        return Availability(
            True,
            "ready with the classical segmenter only: no SAM/MedSAM checkpoint here "
            f"(set {envs} or put checkpoints in the medloupe weights cache)",
        )

    def choose(self, requested: str, with_boxes: bool) -> str:
        if requested != "auto":
            return requested
        present = set(self.present())
        for name in AUTO_ORDER_BOXES if with_boxes else AUTO_ORDER_POINTS:
            if name in present:
                return name
        for name in present:  # models outside the standard registry (plugins, tests)
            if with_boxes or self.models[name].preprocessing == "sam":
                return name
        return "classical"

    def run(self, args: BaseModel, ctx: ToolContext) -> SegmentResult:
        a: Any = args
        rec = ctx.image
        w, h = rec.width, rec.height
        for b in a.boxes_xyxy:
            _check_inside(b, w, h)
        for x, y in a.points_xy:
            check_point(x, y, w, h)
        model = self.choose(a.model, bool(a.boxes_xyxy))
        rgb = ctx.rgb()
        segmenter: PromptedSegmenter = (
            self.classical if model == "classical" else self.engine(model)
        )
        image = segmenter.set_image(rgb)
        preds = image.predict(
            boxes=[list(b) for b in a.boxes_xyxy] or None,
            points=[list(p) for p in a.points_xy] or None,
            point_labels=a.point_labels,
        )
        prompts = [f"box {i + 1}" for i in range(len(a.boxes_xyxy))] if a.boxes_xyxy else ["points"]
        if a.points_xy and a.boxes_xyxy:
            prompts = ["box 1 + points"]
        masks: list[SegmentedMask] = []
        regions: list[Region] = []
        warnings: list[str] = []
        for prompt, pred in zip(prompts, preds, strict=True):
            if not pred.mask.any():
                warnings.append(f"{prompt}: the mask is empty")
                continue
            measures = mask_measures(pred.mask, rec.spacing_mm)
            artifact = ctx.store.put_png(pred.mask.astype(np.uint8) * 255, kind="mask")
            method = pred.method or model
            masks.append(
                SegmentedMask(
                    **measures.model_dump(),
                    mask_artifact=artifact,
                    score=min(1.0, max(0.0, pred.score)),
                    method=method,
                    prompt=prompt,
                )
            )
            regions.append(
                Region(
                    id="pending",
                    box_xyxy=measures.box_xyxy,
                    label=a.label or f"{prompt} mask",
                    score=min(1.0, max(0.0, pred.score)),
                    mask_artifact=artifact,
                )
            )
        if not masks:
            raise ValueError(
                f"every mask from {model} is empty ({', '.join(prompts)}): nothing separates "
                "from its surroundings there; try a tighter box or add a foreground point"
            )
        if rec.spacing_mm is None:
            warnings.append("pixel spacing unknown: areas and lengths are in pixels")
        return SegmentResult(
            model=model,
            masks=masks,
            warnings=warnings,
            regions=regions,
            artifacts=[m.mask_artifact for m in masks],
        )
