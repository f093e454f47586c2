"""The ``search_knowledge`` tool: the planner's way to look something up in the book.

It is bound to the run's retriever (:class:`KnowledgeSearchTool`), so it is registered by
whoever builds the run context with a knowledge base (:func:`registry_with_retriever`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from medloupe.artifacts import ArtifactStore
from medloupe.knowledge_base.protocol import Passage, Retriever
from medloupe.schemas import Box
from medloupe.tools.base import Tool, ToolContext, ToolResult
from medloupe.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

CROP_MARGIN = 0.15


class SearchKnowledgeArgs(BaseModel):
    """Look up reference text (and figures) about a finding, optionally like a region."""

    model_config = {"extra": "forbid"}

    query: str = Field(min_length=1, max_length=500, description="what to look up, in words")
    box_xyxy: Box | None = Field(
        default=None,
        description="XYXY pixels of a region of the run's image: its crop also queries the "
        "figures by similarity",
    )
    k: int = Field(default=5, ge=1, le=10, description="how many passages")


class PassageHit(BaseModel):
    """One passage found, with where it stands in its source."""

    citation_id: str
    document: str
    section: str | None = None
    page: str | None = None
    kind: str = "text"
    snippet: str
    score: float
    figure_artifact: str | None = Field(
        default=None, description="artifact id of the passage's figure, copied into the run"
    )


class SearchKnowledgeResult(ToolResult):
    passages: list[PassageHit] = Field(default_factory=list)

    def summary(self) -> str:
        if not self.passages:
            return "no passage found"
        parts = [
            f"{p.document}{' - ' + p.section if p.section else ''} ({p.score:.2f})"
            for p in self.passages
        ]
        return ("found: " + "; ".join(parts))[:500]


def crop_for_query(rgb: np.ndarray, box: Box, margin: float = CROP_MARGIN) -> np.ndarray:
    """The ``(h, w, 3)`` uint8 crop of ``box`` (XYXY pixels) with a relative ``margin``."""
    from medloupe.tools.builtin import margin_box

    xa, ya, xb, yb = margin_box(box, margin, rgb.shape[1], rgb.shape[0])
    return np.ascontiguousarray(rgb[ya:yb, xa:xb])


def figure_artifact(store: ArtifactStore, passage: Passage) -> str | None:
    """Copy a passage's figure into the run's artifact store; its artifact id, or None."""
    if not passage.figure_path:
        return None
    try:
        data = Path(passage.figure_path).read_bytes()
        return store.put_png_bytes(data, kind="figure")
    except (OSError, ValueError) as exc:
        log.warning("figure of %s could not be copied into the run: %s", passage.id, exc)
        return None


class KnowledgeSearchTool(Tool):
    """``search_knowledge``: passages of the run's knowledge base for a query (and a region)."""

    name = "search_knowledge"
    input_model = SearchKnowledgeArgs
    output_model = SearchKnowledgeResult
    timeout_s = 60.0

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever
        self.description = (
            f"Search the reference knowledge base ({retriever.name}) for passages and figures "
            "about a finding; give a region's box to also match figures that look like it."
        )

    async def run(self, args: SearchKnowledgeArgs, ctx: ToolContext) -> SearchKnowledgeResult:  # type: ignore[override]
        crop = crop_for_query(ctx.rgb(), args.box_xyxy) if args.box_xyxy else None
        passages = await self.retriever.search(args.query, image=crop, k=args.k)
        hits = []
        artifacts = []
        for p in passages:
            fig = figure_artifact(ctx.store, p)
            if fig:
                artifacts.append(fig)
            hits.append(
                PassageHit(
                    citation_id=f"cit-{p.id}",
                    document=p.document,
                    section=p.section,
                    page=p.page,
                    kind=p.kind,
                    snippet=p.text[:500],
                    score=p.score,
                    figure_artifact=fig,
                )
            )
        return SearchKnowledgeResult(passages=hits, artifacts=artifacts)


def registry_with_retriever(registry: ToolRegistry, retriever: Retriever | None) -> ToolRegistry:
    """Register ``search_knowledge`` bound to ``retriever`` (if any) and return ``registry``."""
    if retriever is not None and KnowledgeSearchTool.name not in registry:
        registry.register(KnowledgeSearchTool(retriever))
    return registry
