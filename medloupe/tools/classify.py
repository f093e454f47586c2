"""``classify``: a 2D MONAI DenseNet121 multi-label classifier loading a user checkpoint.

A classifier is described by a :class:`ClassifierSpec` (JSON): the checkpoint, its key layout,
the labels, input channels and preprocessing. Point the ``classifier`` setting at the JSON file (or
at a checkpoint with a ``.json`` sidecar of the same stem).

Layouts:

- ``monai``: ``monai.networks.nets.DenseNet121`` state dict as saved.
- ``torchvision``: ``torchvision.models.densenet121`` names (``classifier.*``, ``norm1`` or the
  old ``norm.1``); renamed to MONAI's (``class_layers.out.*``, ``layers.norm1``).
- ``xrv``: TorchXRayVision's DenseNet121 (torchvision names plus an optional ``op_threshs``
  buffer). Its preprocessing: grayscale scaled to [-1024, 1024], centre crop to a square,
  resize to 224. Default labels are TorchXRayVision's 18 ``default_pathologies``; with
  ``op_threshs`` the sigmoid outputs are calibrated as TorchXRayVision's ``op_norm`` does
  (0.5 at each label's operating point). TorchXRayVision's ``.pt`` files are pickled modules;
  save their ``state_dict()`` once (see :func:`load_state`'s error) and load that.

Weights load on first use (``weights_only`` unpickling only).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from medloupe.config import Settings, env_name
from medloupe.device import torch_device
from medloupe.errors import WeightsMissingError
from medloupe.tools.base import Availability, Tool, ToolContext, ToolResult

log = logging.getLogger(__name__)

CLASSIFIER_ENV = env_name("classifier")
XRV_PATHOLOGIES = [
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClassifierSpec(BaseModel):
    """What a classifier checkpoint is and how to feed it."""

    model_config = {"extra": "forbid"}

    checkpoint: str = Field(description="path of the state dict (.pt/.pth/.safetensors)")
    layout: Literal["monai", "torchvision", "xrv"] = "monai"
    labels: list[str] | None = Field(
        default=None, description="output names in order ('' for unused outputs); xrv: default"
    )
    in_channels: int | None = Field(default=None, ge=1, le=4, description="xrv: 1, else 3")
    preprocessing: Literal["xrv", "imagenet", "unit"] | None = Field(
        default=None, description="xrv: [-1024, 1024] gray; imagenet; unit: [0, 1]"
    )
    image_size: int = Field(default=224, ge=32, le=1024)
    modalities: list[str] | None = Field(default=None, description="e.g. ['CR', 'DX']")
    name: str | None = None

    @model_validator(mode="after")
    def _defaults(self) -> ClassifierSpec:
        if self.layout == "xrv":
            self.labels = self.labels or list(XRV_PATHOLOGIES)
            self.in_channels = self.in_channels or 1
            self.preprocessing = self.preprocessing or "xrv"
        if not self.labels:
            raise ValueError(f"the classifier spec needs `labels` for layout {self.layout!r}")
        self.in_channels = self.in_channels or 3
        self.preprocessing = self.preprocessing or "imagenet"
        return self

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> ClassifierSpec:
        """From a JSON spec file, or a checkpoint with a ``.json`` sidecar; a relative
        ``checkpoint`` in the JSON is relative to the JSON file."""
        p = Path(path).expanduser()
        spec_file = p if p.suffix == ".json" else p.with_suffix(".json")
        if not spec_file.is_file():
            raise WeightsMissingError(
                f"classifier spec {spec_file} not found: write a JSON file with checkpoint, "
                "layout (monai|torchvision|xrv) and labels next to the checkpoint"
            )
        data = json.loads(spec_file.read_text(encoding="utf-8"))
        if p.suffix != ".json":
            data.setdefault("checkpoint", str(p))
        ckpt = Path(data.get("checkpoint", "")).expanduser()
        if not ckpt.is_absolute():
            data["checkpoint"] = str(spec_file.parent / ckpt)
        return cls.model_validate(data)


_OLD_DENSE = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(.+)$")


def to_monai_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Rename torchvision / TorchXRayVision DenseNet keys to MONAI's (drops ``op_threshs``)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "op_threshs":
            continue
        m = _OLD_DENSE.match(key)
        new = key
        if m:
            new = f"{m.group(1)}.layers.{m.group(2)}{m.group(3)}.{m.group(4)}"
        elif key.startswith("classifier."):
            new = "class_layers.out." + key[len("classifier.") :]
        out[new] = value
    return out


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only`` unpickling).

    Raises:
        WeightsMissingError: no such file.
        ValueError: the file is a pickled module rather than a state dict, or holds no dict.
    """
    import pickle

    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsMissingError(
            f"classifier checkpoint {p} not found; set {CLASSIFIER_ENV} to the spec JSON "
            "of a checkpoint on this machine"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p)))
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{p} is not a plain state dict (weights_only loading refused it: "
            f"{str(exc).splitlines()[0][:120]}). TorchXRayVision ships pickled modules: "
            'convert once with `python -c "import torch, torchxrayvision as xrv; '
            "m = xrv.models.DenseNet(weights='densenet121-res224-all'); "
            "torch.save(m.state_dict(), 'densenet121-xrv.pt')\"`"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{p} holds a {type(state).__name__}, not a state dict")
    return state


def preprocess(image: np.ndarray, spec: ClassifierSpec) -> np.ndarray:
    """``(1, C, S, S)`` float32 model input from a uint8 ``(H, W)`` or ``(H, W, 3)`` image."""
    from PIL import Image

    size = spec.image_size
    if spec.preprocessing == "xrv" or spec.in_channels == 1:
        gray = image if image.ndim == 2 else np.asarray(Image.fromarray(image).convert("L"))
        h, w = gray.shape
        side = min(h, w)  # XRayCenterCrop
        top, left = (h - side) // 2, (w - side) // 2
        gray = gray[top : top + side, left : left + side]
        resized = np.asarray(
            Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR), np.float32
        )
        if spec.preprocessing == "xrv":
            x = ((2.0 * (resized / 255.0) - 1.0) * 1024.0).astype(np.float32)
        elif spec.preprocessing == "imagenet":
            x = (resized / 255.0 - 0.449) / 0.226
        else:
            x = resized / 255.0
        chans = np.repeat(x[None], spec.in_channels or 1, axis=0)
        return chans[None].astype(np.float32)
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    resized = np.asarray(
        Image.fromarray(rgb[..., :3]).resize((size, size), Image.Resampling.BILINEAR), np.float32
    )
    unit = resized / 255.0
    if spec.preprocessing == "imagenet":
        mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
        unit = ((unit - mean) / std).astype(np.float32)
    return unit.transpose(2, 0, 1)[None].astype(np.float32)


def op_norm(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """TorchXRayVision's calibration: each label's operating point maps to 0.5 (NaN: as is)."""
    out = probs.copy()
    ok = np.isfinite(thresholds)
    low = ok & (probs < thresholds)
    high = ok & ~(probs < thresholds)
    out[low] = probs[low] / (thresholds[low] * 2)
    out[high] = 1.0 - (1.0 - probs[high]) / ((1.0 - thresholds[high]) * 2)
    return out


class DenseNetClassifier:
    """A MONAI DenseNet121 built from a :class:`ClassifierSpec`, loaded on first use."""

    def __init__(self, spec: ClassifierSpec, *, device: str | None = None) -> None:
        self.spec = spec
        self.device = device
        self._model: Any = None
        self._thresholds: np.ndarray | None = None
        self._lock = threading.Lock()

    def load(self) -> Any:
        with self._lock:
            if self._model is None:
                from monai.networks.nets import DenseNet121

                state = load_state(self.spec.checkpoint)
                labels = self.spec.labels or []
                if "op_threshs" in state:
                    th = np.asarray(state["op_threshs"], dtype=np.float64).reshape(-1)
                    if len(th) != len(labels):
                        raise ValueError(
                            f"op_threshs has {len(th)} values but the spec has {len(labels)} labels"
                        )
                    self._thresholds = th
                if self.spec.layout != "monai":
                    state = to_monai_keys(state)
                model = DenseNet121(
                    spatial_dims=2, in_channels=self.spec.in_channels or 3, out_channels=len(labels)
                )
                what = (
                    f"a DenseNet121 with {self.spec.in_channels} input channel(s) and "
                    f"{len(labels)} outputs (layout {self.spec.layout!r})"
                )
                try:
                    result = model.load_state_dict(state, strict=False)
                except RuntimeError as exc:  # shape mismatches
                    raise ValueError(
                        f"{self.spec.checkpoint} does not fit {what}: "
                        f"{str(exc).splitlines()[-1].strip()[:200]}"
                    ) from None
                if result.missing_keys or result.unexpected_keys:
                    raise ValueError(
                        f"{self.spec.checkpoint} does not fit {what}: "
                        f"missing {result.missing_keys[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}"
                    )
                device = torch_device(self.device)
                self._model = model.to(device).eval()
                log.info("loaded classifier %s on %s", self.spec.checkpoint, device)
            return self._model

    def probabilities(self, image: np.ndarray) -> dict[str, float]:
        """Per-label probabilities (sigmoid; calibrated by ``op_threshs`` when present)."""
        import torch

        model = self.load()
        x = torch.from_numpy(preprocess(image, self.spec)).to(next(model.parameters()).device)
        with torch.inference_mode():
            logits = model(x)[0].float().cpu().numpy()
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        if self._thresholds is not None:
            probs = op_norm(probs, self._thresholds)
        labels = self.spec.labels or []
        return {label: float(p) for label, p in zip(labels, probs, strict=True) if label}


class ClassifyArgs(BaseModel):
    model_config = {"extra": "forbid"}

    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="positive above this")
    top_k: int = Field(default=5, ge=1, le=50, description="labels listed in the summary")


class LabelProbability(BaseModel):
    label: str
    probability: float


class ClassifyResult(ToolResult):
    model: str
    labels: list[str] = Field(description="every label the model outputs, in order")
    probabilities: list[LabelProbability] = Field(description="highest first")
    positive: list[str]
    threshold: float

    def summary(self) -> str:
        top = ", ".join(f"{p.label} {p.probability:.2f}" for p in self.probabilities[:5])
        pos = ", ".join(self.positive) or "none"
        return f"{self.model}: above {self.threshold:g}: {pos} (top: {top})"


class ClassifyTool(Tool):
    """Multi-label image classification with a user's DenseNet121 checkpoint.

    Args:
        spec: the classifier (default: from ``Settings.classifier``).
        device: torch device (default CUDA when present).
    """

    name = "classify"
    description = (
        "Multi-label probabilities from a trained DenseNet121 classifier (e.g. chest X-ray "
        "findings, TorchXRayVision layout), with the full label list."
    )
    input_model = ClassifyArgs
    output_model = ClassifyResult
    timeout_s = 120.0

    def __init__(self, spec: ClassifierSpec | None = None, *, device: str | None = None) -> None:
        self._problem: str | None = None
        configured = Settings.from_env().classifier
        if spec is None and configured:
            try:
                spec = ClassifierSpec.from_path(configured)
            except (WeightsMissingError, ValueError) as exc:
                self._problem = f"{CLASSIFIER_ENV}: {exc}"
        self.spec = spec
        self.classifier = DenseNetClassifier(spec, device=device) if spec else None
        if spec is not None and spec.modalities:
            self.modalities = frozenset(spec.modalities)

    def available(self) -> Availability:
        if self._problem:
            return Availability(False, self._problem)
        if self.spec is None:
            return Availability(
                False,
                f"no classifier configured: set {CLASSIFIER_ENV} to a classifier spec JSON "
                "(checkpoint, layout monai|torchvision|xrv, labels)",
            )
        if not Path(self.spec.checkpoint).expanduser().is_file():
            return Availability(False, f"classifier checkpoint {self.spec.checkpoint} not found")
        return Availability(True, f"ready: {self.spec.name or Path(self.spec.checkpoint).name}")

    def run(self, args: BaseModel, ctx: ToolContext) -> ClassifyResult:
        a: Any = args
        assert self.classifier is not None and self.spec is not None
        probs = self.classifier.probabilities(ctx.pixels())
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        return ClassifyResult(
            model=self.spec.name or Path(self.spec.checkpoint).name,
            labels=[lab for lab in self.spec.labels or [] if lab],
            probabilities=[LabelProbability(label=k, probability=v) for k, v in ranked],
            positive=[k for k, v in ranked if v >= a.threshold],
            threshold=a.threshold,
        )
