"""``detect``: text-prompted, open-vocabulary detection through transformers.

Any checkpoint that ``AutoModelForZeroShotObjectDetection`` loads (OWLv2, OWL-ViT, Grounding
DINO, ...) from a hub id or a local folder. Configure it with the ``detector`` setting (e.g.
``google/owlv2-base-patch16-ensemble`` or ``IDEA-Research/grounding-dino-tiny``) or the tool's
``model`` argument. Weights load on first use; with ``HF_HUB_OFFLINE=1`` only the local cache
is read, and missing weights raise an error naming ``hf download MODEL``.
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, field_validator

from medloupe.config import Settings, env_name
from medloupe.device import torch_device
from medloupe.errors import WeightsMissingError
from medloupe.progress import silence_hub_progress
from medloupe.schemas import Box, Region
from medloupe.tools.base import Availability, Requirements, Tool, ToolContext, ToolResult
from medloupe.tools.weights import offline

log = logging.getLogger(__name__)

DETECTOR_ENV = env_name("detector")


def hub_weights_cached(model_id: str) -> bool:
    """Whether ``model_id`` is a local folder or a hub id whose config is in the HF cache."""
    if Path(model_id).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


class DetectArgs(BaseModel):
    model_config = {"extra": "forbid"}

    labels: list[str] = Field(
        min_length=1, max_length=16, description="what to look for, e.g. ['nodule', 'pacemaker']"
    )
    threshold: float = Field(default=0.2, ge=0.0, le=1.0, description="score floor")
    max_detections: int = Field(default=10, ge=1, le=100)
    box_threshold_text: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Grounding DINO's text threshold"
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        out = [s.strip() for s in v if s.strip()]
        if not out:
            raise ValueError("labels must hold at least one non-blank phrase")
        return out


class Detection(BaseModel):
    label: str = Field(description="the requested label this detection is for")
    text: str = Field(description="the detector's own phrase (Grounding DINO: matched tokens)")
    score: float
    box_xyxy: Box


def match_label(phrase: str, labels: list[str]) -> str:
    """The requested label a detector's phrase stands for: an exact (case- and
    punctuation-insensitive) match, else the label sharing the most words with it, earliest
    first."""

    def words(text: str) -> list[str]:
        return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]

    target = words(phrase)
    for label in labels:
        if words(label) == target:
            return label
    overlap = [len(set(words(label)) & set(target)) for label in labels]
    return labels[max(range(len(labels)), key=lambda i: (overlap[i], -i))]


class DetectResult(ToolResult):
    model: str
    detections: list[Detection]

    def summary(self) -> str:
        if not self.detections:
            return f"{self.model}: nothing above the threshold"
        items = "; ".join(
            f"{d.label} {d.score:.2f} [{', '.join(f'{v:.0f}' for v in d.box_xyxy)}]"
            for d in self.detections[:8]
        )
        return f"{len(self.detections)} detection(s) by {self.model}: {items}"


class DetectTool(Tool):
    """Open-vocabulary detection with a transformers zero-shot detector.

    Args:
        model: hub id or local folder (default ``Settings.detector``).
        device: torch device (default CUDA when present).
    """

    name = "detect"
    description = (
        "Find objects named in text (open-vocabulary detector: OWLv2 / Grounding DINO): boxes "
        "with labels and scores. Scores are the detector's own, not probabilities of disease."
    )
    input_model = DetectArgs
    output_model = DetectResult
    timeout_s = 300.0

    def __init__(self, model: str | None = None, *, device: str | None = None) -> None:
        self.model_id = model or Settings.from_env().detector
        self.device = device
        self.requires = Requirements(weights=(self.model_id,) if self.model_id else ())
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.Lock()

    def available(self) -> Availability:
        if not self.model_id:
            return Availability(
                False,
                f"no detector configured: set {DETECTOR_ENV} to a hub id or folder of a "
                "zero-shot detector (e.g. google/owlv2-base-patch16-ensemble)",
            )
        if hub_weights_cached(self.model_id):
            return Availability(True, f"ready: {self.model_id}")
        if offline():
            return Availability(
                False,
                f"{self.model_id} is not in the local cache and HF_HUB_OFFLINE is set; "
                f"run `hf download {self.model_id}` where there is network",
            )
        return Availability(True, f"{self.model_id} will be downloaded on first use")

    def load(self) -> tuple[Any, Any]:
        """Load processor and model (thread-safe, once).

        Raises:
            WeightsMissingError: the weights are not available here.
        """
        with self._lock:
            if self._model is None:
                if not self.model_id:
                    raise WeightsMissingError(self.available().reason)
                from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

                local = Path(self.model_id).expanduser()
                source = str(local) if local.is_dir() else self.model_id
                only_local = offline() or local.is_dir()
                silence_hub_progress()
                try:
                    processor = AutoProcessor.from_pretrained(source, local_files_only=only_local)
                    model = AutoModelForZeroShotObjectDetection.from_pretrained(
                        source, local_files_only=only_local
                    )
                except OSError as exc:
                    raise WeightsMissingError(
                        f"detector {self.model_id!r} could not be loaded "
                        f"({str(exc).splitlines()[0]}); fetch it with `hf download "
                        f"{self.model_id}` on a machine with network and copy the HF cache, or "
                        f"point {DETECTOR_ENV} at a local folder"
                    ) from None
                device = torch_device(self.device)
                self._model, self._processor = model.to(device).eval(), processor
                log.info("loaded detector %s on %s", self.model_id, device)
            return self._model, self._processor

    def detect(
        self, rgb: np.ndarray, labels: list[str], threshold: float, text_threshold: float = 0.25
    ) -> list[Detection]:
        """Detections on an ``(H, W, 3)`` uint8 RGB image, best first (XYXY pixels)."""
        import torch
        from PIL import Image

        model, processor = self.load()
        h, w = rgb.shape[:2]
        owl = model.config.model_type in ("owlv2", "owlvit")
        # OWL encodes one query per label (padded to one length); Grounding DINO joins the
        # labels into one "a. b." prompt itself
        extra = {"padding": True} if owl else {}
        inputs = processor(images=Image.fromarray(rgb), text=[labels], return_tensors="pt", **extra)
        inputs = inputs.to(model.device)
        with torch.inference_mode():
            outputs = model(**inputs)
        # OWLv2 pads to a square before resizing: its boxes are relative to that square
        side = max(h, w)
        target = (side, side) if model.config.model_type == "owlv2" else (h, w)
        post = processor.post_process_grounded_object_detection
        kwargs: dict[str, Any] = {
            "threshold": threshold,
            "target_sizes": [target],
            "text_labels": [labels],
        }
        params = inspect.signature(post).parameters
        if "input_ids" in params:
            kwargs["input_ids"] = inputs["input_ids"]
        if "text_threshold" in params:
            kwargs["text_threshold"] = text_threshold
        result = post(outputs, **kwargs)[0]
        names = result.get("text_labels") or [labels[int(i)] for i in result["labels"]]
        out = []
        for score, box, name in zip(result["scores"], result["boxes"], names, strict=True):
            x0, y0, x1, y1 = (float(v) for v in box)
            x0, x1 = max(0.0, x0), min(float(w), x1)
            y0, y1 = max(0.0, y0), min(float(h), y1)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            out.append(
                Detection(
                    label=match_label(str(name), labels),
                    text=str(name),
                    score=float(score),
                    box_xyxy=(x0, y0, x1, y1),
                )
            )
        out.sort(key=lambda d: -d.score)
        return out

    def run(self, args: BaseModel, ctx: ToolContext) -> DetectResult:
        a: Any = args
        found = self.detect(ctx.rgb(), a.labels, a.threshold, a.box_threshold_text)
        found = found[: a.max_detections]
        regions = [
            Region(id="pending", box_xyxy=d.box_xyxy, label=d.label, score=min(1.0, d.score))
            for d in found
        ]
        return DetectResult(model=str(self.model_id), detections=found, regions=regions)
