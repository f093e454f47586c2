"""Segment-Anything and MedSAM behind a two-phase, thread-safe API with an embedding cache.

The public surface is small::

    from medloupe.tools.sam import SAM_MODELS, SamEngine

    engine = SamEngine(SAM_MODELS["sam_vit_b"])          # nothing loads yet
    image = engine.set_image(rgb)                          # (H, W, 3) uint8 RGB; encoder runs
    masks = image.predict(boxes=[(x0, y0, x1, y1)])        # XYXY pixels of ``rgb``

``SAM_MODELS`` is the registry: a dict of :class:`SamModelSpec`, each naming the
segment-anything builder arguments, the checkpoint (:class:`~medloupe.tools.weights.WeightFile`)
and the preprocessing (``"sam"``: longest side to 1024, ImageNet normalisation, padding;
``"medsam"``: MedSAM's own, a 1024x1024 resize and min-max scaling to [0, 1], box prompts in
that frame, sigmoid > 0.5 on the low-resolution logits).

``set_image`` runs the image encoder once per (model, image): embeddings live in a bounded
LRU cache keyed by the image's SHA-256, so further prompts on the same image skip the
encoder. Concurrent ``set_image`` calls on one engine are safe; the encoder runs one image at
a time and a second caller waiting for the same image reuses the first one's embedding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from medloupe.device import torch_device
from medloupe.tools.weights import WeightFile

log = logging.getLogger(__name__)

Preprocessing = Literal["sam", "medsam"]
DEFAULT_CACHE_ITEMS = 8


@dataclass(frozen=True)
class SamModelSpec:
    """One entry of the SAM registry.

    Attributes:
        name: registry key (also the tool's ``model`` argument).
        encoder_embed_dim, encoder_depth, encoder_num_heads, encoder_global_attn_indexes:
            arguments of segment-anything's ``_build_sam`` (the builder behind
            ``build_sam_vit_b/l/h``).
        weights: the checkpoint file (``None``: random weights, for tests and timing only).
        preprocessing: ``"sam"`` or ``"medsam"`` (see the module docstring).
    """

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    weights: WeightFile | None
    preprocessing: Preprocessing = "sam"


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_VIT_B = (768, 12, 12, (2, 5, 8, 11))  # embed dim, depth, heads, global attention blocks


def _meta_sam(
    name: str, arch: tuple[int, int, int, tuple[int, ...]], filename: str, sha256: str
) -> SamModelSpec:
    return SamModelSpec(
        name,
        *arch,
        weights=WeightFile(
            filename=filename,
            name=name,
            url=_SAM_URL + filename,
            sha256=sha256,
        ),
    )


SAM_MODELS: dict[str, SamModelSpec] = {
    "sam_vit_b": _meta_sam(
        "sam_vit_b",
        _VIT_B,
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "sam_vit_l": _meta_sam(
        "sam_vit_l",
        (1024, 24, 16, (5, 11, 17, 23)),
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "sam_vit_h": _meta_sam(
        "sam_vit_h",
        (1280, 32, 16, (7, 15, 23, 31)),
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "medsam_vit_b": SamModelSpec(
        "medsam_vit_b",
        *_VIT_B,
        weights=WeightFile(
            filename="medsam_vit_b.pth",
            name="medsam_vit_b",
            how_to_get=(
                "download medsam_vit_b.pth from the MedSAM project "
                "(https://github.com/bowang-lab/MedSAM#model-checkpoints)"
            ),
        ),
        preprocessing="medsam",
    ),
}


def build_sam_model(spec: SamModelSpec, checkpoint: str | os.PathLike[str] | None = None) -> Any:
    """A segment-anything ``Sam`` module built from ``spec`` (float32, CPU, eval mode), with the
    state dict of ``checkpoint`` loaded when given (``weights_only`` unpickling).

    Raises:
        ValueError: the checkpoint does not fit the architecture (names the first keys).
    """
    import torch
    from segment_anything.build_sam import _build_sam

    sam = _build_sam(
        encoder_embed_dim=spec.encoder_embed_dim,
        encoder_depth=spec.encoder_depth,
        encoder_num_heads=spec.encoder_num_heads,
        encoder_global_attn_indexes=list(spec.encoder_global_attn_indexes),
        checkpoint=None,
    )
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            result = sam.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(
                f"{checkpoint} does not fit {spec.name}: {str(exc).splitlines()[-1].strip()[:200]} "
                "(is it a checkpoint of another model?)"
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{checkpoint} does not fit {spec.name}: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]} (is it a checkpoint of another model?)"
            )
    return sam.eval()


@dataclass
class MaskPrediction:
    """One predicted mask.

    Attributes:
        mask: ``(H, W)`` bool, in pixels of the image given to ``set_image``.
        score: the model's own quality estimate in [0, 1] (SAM's predicted IoU; for the
            classical segmenter, a contrast-based confidence).
        method: how it was made, when the segmenter has several ways (classical ones).
    """

    mask: np.ndarray
    score: float
    method: str | None = None


class PromptedImage(Protocol):
    """Phase 2 of a prompted segmenter: an image ready for prompts."""

    @property
    def size(self) -> tuple[int, int]: ...

    def predict(
        self,
        boxes: Sequence[Sequence[float]] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
    ) -> list[MaskPrediction]: ...


class PromptedSegmenter(Protocol):
    """Phase 1: ``set_image`` takes ``(H, W, 3)`` uint8 RGB and returns a
    :class:`PromptedImage` (SAM/MedSAM engines and the classical segmenter)."""

    def set_image(self, image: np.ndarray) -> PromptedImage: ...


@dataclass
class _Embedding:
    features: Any  # torch.Tensor (1, 256, 64, 64)
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def normalise_prompts(
    boxes: Sequence[Sequence[float]] | None,
    points: Sequence[Sequence[float]] | None,
    point_labels: Sequence[int] | None,
) -> tuple[list[tuple[float, ...]], list[tuple[float, float]], list[int]]:
    """Boxes, points and point labels (default 1) as lists, checked for a prompted segmenter.

    Raises:
        ValueError: no prompt, labels not one per point, or points with several boxes.
    """
    box_list = [tuple(float(v) for v in b) for b in boxes or []]
    pts = [(float(p[0]), float(p[1])) for p in points or []]
    labels = [int(v) for v in point_labels] if point_labels is not None else [1] * len(pts)
    if not box_list and not pts:
        raise ValueError("give at least one box or point prompt")
    if len(labels) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(labels)} point labels")
    if pts and len(box_list) > 1:
        raise ValueError("points can be combined with at most one box")
    return box_list, pts, labels


def image_digest(image: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes (the cache key of an image)."""
    h = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


class EmbeddingCache:
    """A bounded, thread-safe LRU of image embeddings keyed by (model name, image digest)."""

    def __init__(self, max_items: int = DEFAULT_CACHE_ITEMS) -> None:
        if max_items < 1:
            raise ValueError("the embedding cache needs room for at least one image")
        self.max_items = max_items
        self._items: OrderedDict[tuple[str, str], _Embedding] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str]) -> _Embedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple[str, str], item: _Embedding) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"set_image expects an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}"
        )
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image of {image.shape[1]}x{image.shape[0]} pixels is too small")


class SamEngine:
    """A SAM-family model, loaded on first use, with its embedding cache.

    Args:
        spec: the registry entry.
        checkpoint: explicit checkpoint path (else ``spec.weights`` is resolved: environment
            variable, cache, download if ``download``).
        device: ``"cuda"``, ``"cpu"``...; default CUDA when torch sees a GPU.
        cache: an :class:`EmbeddingCache` (shared between engines if you like; keys carry the
            model name).
        download: allow a verified download of missing weights (never when offline).
    """

    def __init__(
        self,
        spec: SamModelSpec,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | None = None,
        cache: EmbeddingCache | None = None,
        download: bool = False,
    ) -> None:
        self.spec = spec
        self.checkpoint = checkpoint
        self.device_name = device
        self.cache = cache if cache is not None else EmbeddingCache()
        self.download = download
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self.encoder_runs = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def weights_present(self) -> bool:
        """Whether a checkpoint is on this machine (no loading, no download)."""
        if self.spec.weights is None:
            return True
        return self.spec.weights.local(self.checkpoint) is not None

    def load(self) -> Any:
        """Load the model now (thread-safe; a no-op once loaded). Returns the ``Sam`` module.

        Raises:
            WeightsMissingError: no checkpoint here and none may be downloaded.
        """
        with self._load_lock:
            if self._model is None:
                path = (
                    self.spec.weights.resolve(self.checkpoint, download=self.download)
                    if self.spec.weights is not None
                    else self.checkpoint
                )
                device = torch_device(self.device_name)
                model = build_sam_model(self.spec, path).to(device)
                log.info("loaded %s from %s on %s", self.spec.name, path or "random init", device)
                self._model = model
            return self._model

    # --- phase 1 ---------------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> SamImage:
        """Encode ``image`` (or fetch its cached embedding) for prompting.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.

        Returns:
            A :class:`SamImage` whose ``predict`` takes prompts in XYXY pixels of ``image``.
        """
        _check_image(image)
        key = (self.spec.name, image_digest(image))
        item = self.cache.get(key)
        if item is None:
            model = self.load()
            with self._encode_lock:
                item = self.cache.get(key)  # another thread may have encoded it meanwhile
                if item is None:
                    item = self._encode(model, image)
                    self.encoder_runs += 1
                    self.cache.put(key, item)
        return SamImage(self, item)

    def _encode(self, model: Any, image: np.ndarray) -> _Embedding:
        import torch

        h, w = image.shape[:2]
        size = model.image_encoder.img_size
        with torch.inference_mode():
            if self.spec.preprocessing == "medsam":
                from PIL import Image

                resized = np.asarray(
                    Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
                ).astype(np.float32)
                lo, hi = float(resized.min()), float(resized.max())
                scaled = (resized - lo) / max(hi - lo, 1e-8)
                x = torch.from_numpy(scaled).permute(2, 0, 1)[None].to(model.device)
                features = model.image_encoder(x)
                input_size = (size, size)
            else:
                from segment_anything.utils.transforms import ResizeLongestSide

                resized = ResizeLongestSide(size).apply_image(image)
                x = torch.as_tensor(resized, device=model.device).permute(2, 0, 1)[None]
                input_size = (int(x.shape[-2]), int(x.shape[-1]))
                features = model.image_encoder(model.preprocess(x.float()))
        return _Embedding(features=features, original_size=(h, w), input_size=input_size)


@dataclass
class SamImage:
    """An encoded image: phase 2 of the API. Thread-safe (holds no mutable prompt state)."""

    engine: SamEngine
    embedding: _Embedding = field(repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the image given to ``set_image``."""
        return self.embedding.original_size

    def predict(
        self,
        boxes: Sequence[Sequence[float]] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
    ) -> list[MaskPrediction]:
        """Masks for prompts in pixels of the original image.

        Args:
            boxes: XYXY pixel boxes; one mask per box.
            points: ``(x, y)`` pixel points, combined with at most one box.
            point_labels: one per point: 1 foreground, 0 background (default all 1).

        Returns:
            One :class:`MaskPrediction` per box, or one for a points-only prompt (the best of
            SAM's three candidates by predicted IoU).
        """
        import torch

        model = self.engine.load()
        box_list, point_list, label_list = normalise_prompts(boxes, points, point_labels)
        boxes_arr = np.asarray(box_list, dtype=np.float32).reshape(-1, 4) if box_list else None
        pts = np.asarray(point_list, dtype=np.float32).reshape(-1, 2) if point_list else None
        labels = np.asarray(label_list, dtype=np.int64)
        h, w = self.embedding.original_size
        ih, iw = self.embedding.input_size
        # both preprocessings map x by iw / w and y by ih / h (ResizeLongestSide.apply_coords)
        scale = np.array([iw / w, ih / h], dtype=np.float32)
        n = len(boxes_arr) if boxes_arr is not None else 1
        dev = model.device
        point_arg = None
        if pts is not None:
            coords = torch.as_tensor(pts * scale, device=dev)[None].expand(n, -1, -1)
            lab = torch.as_tensor(labels, device=dev)[None].expand(n, -1)
            point_arg = (coords, lab)
        box_arg = None
        if boxes_arr is not None:
            box_arg = torch.as_tensor(boxes_arr * np.tile(scale, 2), device=dev)
        multimask = boxes_arr is None and pts is not None and len(pts) == 1
        with torch.inference_mode():
            sparse, dense = model.prompt_encoder(points=point_arg, boxes=box_arg, masks=None)
            low_res, iou = model.mask_decoder(
                image_embeddings=self.embedding.features,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            if multimask:
                best = iou.argmax(dim=1)
                idx = torch.arange(low_res.shape[0], device=dev)
                low_res, iou = low_res[idx, best][:, None], iou[idx, best][:, None]
            if self.engine.spec.preprocessing == "medsam":
                prob = torch.sigmoid(low_res)
                prob = torch.nn.functional.interpolate(
                    prob, size=(h, w), mode="bilinear", align_corners=False
                )
                masks = prob > 0.5
            else:
                masks = model.postprocess_masks(low_res, (ih, iw), (h, w)) > model.mask_threshold
        masks_np = masks[:, 0].cpu().numpy()
        scores = iou[:, 0].float().clamp(0, 1).cpu().numpy()
        return [
            MaskPrediction(mask=m, score=float(s)) for m, s in zip(masks_np, scores, strict=True)
        ]
