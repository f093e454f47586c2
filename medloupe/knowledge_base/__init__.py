"""Knowledge base: the retriever protocol the graph's retrieve node queries, and
:func:`open_knowledge_base`."""

from __future__ import annotations

from medloupe.knowledge_base.protocol import Passage, Retriever
from medloupe.knowledge_base.simple import PassageIndex, open_knowledge_base

__all__ = ["Passage", "PassageIndex", "Retriever", "open_knowledge_base"]
