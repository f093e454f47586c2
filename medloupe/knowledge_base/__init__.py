"""Knowledge base: textbook pages and figures as passages in a FAISS index, with citations.

- :mod:`.loaders`: OpenStax CNXML books, PDF, HTML, Markdown and JSONL pages to passages.
- :mod:`.embedders`: text embeddings (sentence-transformers; offline default MiniLM).
- :mod:`.index`: the KB folder (FAISS + SQLite + manifest), opened and searched.
- :mod:`.build`: building a KB folder and adding to it.
- :mod:`.default`: the default KB built at first use from HPO and ICD-10-CM text.
- :mod:`.protocol`: the :class:`Retriever` protocol the graph's retrieve node queries.
"""

from __future__ import annotations

from pathlib import Path

from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base.build import add_to_kb, build_kb
from medloupe.knowledge_base.index import KnowledgeBase
from medloupe.knowledge_base.protocol import Passage, Retriever

DEFAULT_KB = "default"


def open_knowledge_base(path: str | Path) -> KnowledgeBase:
    """Open a KB folder, or ``"default"`` for the built-in one (built at first use).

    Raises:
        KnowledgeBaseError: not a KB folder (the message says how to build one).
    """
    if str(path) == DEFAULT_KB:
        from medloupe.knowledge_base.default import default_kb

        return default_kb()
    p = Path(path)
    if p.is_file():
        raise KnowledgeBaseError(
            f"{p} is a document, not a knowledge base; build one first: "
            f"`medloupe kb build {p} --out KB`, then pass --kb KB"
        )
    return KnowledgeBase(p)


__all__ = [
    "DEFAULT_KB",
    "KnowledgeBase",
    "Passage",
    "Retriever",
    "add_to_kb",
    "build_kb",
    "open_knowledge_base",
]
