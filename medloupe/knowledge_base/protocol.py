"""The retriever protocol.

A retriever answers a text query (optionally with an image crop) with passages that keep
their position in the source for citation. Implementations (FAISS textbook index, ...)
plug into the graph through the run context.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, Field


class Passage(BaseModel):
    """A retrieved passage."""

    id: str = Field(description="stable id of the passage in its knowledge base")
    document: str
    section: str | None = None
    page: str | None = None
    kind: str = Field(default="text", description='"text" or "figure"')
    text: str
    score: float
    figure_path: str | None = None


@runtime_checkable
class Retriever(Protocol):
    """What the graph needs of a knowledge base."""

    @property
    def name(self) -> str:
        """Identifies the knowledge base in traces and provenance."""
        ...

    async def search(
        self, query: str, *, image: np.ndarray | None = None, k: int = 5
    ) -> list[Passage]:
        """Top ``k`` passages for ``query`` (and the ``(H, W, 3)`` uint8 ``image`` crop, if any)."""
        ...

    def close(self) -> None:
        """Release the index and its files."""
        ...
