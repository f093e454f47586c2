"""Typed graph state with explicit reducers, and the runtime context.

State values are JSON-serialisable dicts (pydantic models dumped with ``mode="json"``): image
records with artifact ids, boxes, evidence items. Arrays never enter state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, NotRequired, TypedDict

from medloupe.agents.protocol import VLMBackend
from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings
from medloupe.knowledge_base.protocol import Retriever
from medloupe.tools.registry import ToolRegistry
from medloupe.trace import TraceRecorder


def merge_by_id(
    left: list[dict[str, Any]] | None, right: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Reducer: append items, replacing any with the same ``id`` (order of first appearance)."""
    out = {item["id"]: item for item in (left or [])}
    for item in right or []:
        out[item["id"]] = item
    return list(out.values())


def append(left: list[Any] | None, right: list[Any] | None) -> list[Any]:
    """Reducer: concatenate."""
    return [*(left or []), *(right or [])]


class RunOptions(TypedDict, total=False):
    """Options of one run."""

    max_steps: int  # plan-act-rethink rounds at most (default 2)
    time_budget_s: float  # wall-clock budget for further rounds (default 300)
    confidence_threshold: float  # stop rethinking at this confidence (default 0.8)
    review_plan: bool  # pause after plan for a reviewer
    rethink: bool  # look again at cropped regions (default True; False: an ablation)
    frame: int
    slice_index: int
    axis: int
    modality: str


class InputState(TypedDict):
    """What a caller gives: a question and either an ingested image record or a path."""

    question: str
    image: NotRequired[dict[str, Any]]  # ImageRecord dump with artifact ids (preferred)
    image_path: NotRequired[str]  # read at intake when ``image`` is absent
    options: NotRequired[RunOptions]


class State(InputState):
    """Full state. Reducers: evidence and passages merge by id; rounds and notes append."""

    started_at: NotRequired[float]
    draft: NotRequired[dict[str, Any]]  # Draft
    plan: NotRequired[dict[str, Any]]  # Plan (the current round's)
    step: NotRequired[int]  # completed plan-act rounds
    evidence: Annotated[list[dict[str, Any]], merge_by_id]
    passages: Annotated[list[dict[str, Any]], merge_by_id]
    rethinks: Annotated[list[dict[str, Any]], append]
    current_answer: NotRequired[str | None]
    current_confidence: NotRequired[float]
    needs_more: NotRequired[bool]
    answer: NotRequired[dict[str, Any]]  # GroundedAnswer
    notes: Annotated[list[str], append]


@dataclass
class RunContext:
    """Dependencies of one run, given to every node through LangGraph's runtime context.

    Attributes:
        store: artifact store of the run directory.
        trace: the run's trace recorder.
        registry: tools available to the planner and act node.
        vlm: the vision-language backend, or ``None`` for the evidence-only path.
        vlm_default: ``vlm`` is the default (no VLM was configured), said in the provenance.
        retriever: the knowledge base, or ``None``.
        settings: process settings (tool timeout, pixel limit).
    """

    store: ArtifactStore
    trace: TraceRecorder
    registry: ToolRegistry
    vlm: VLMBackend | None = None
    vlm_default: bool = False
    retriever: Retriever | None = None
    settings: Settings = field(default_factory=Settings.from_env)
    max_plan_repairs: int = 2
    clock: Any = field(default=time.time, repr=False)
