"""Typed graph state with explicit reducers (the runtime context is in
:mod:`medloupe.graphs.context`).

State values are JSON-serialisable dicts (pydantic models dumped with ``mode="json"``): image
records with artifact ids, boxes, evidence items. Arrays never enter state.
"""

from __future__ import annotations

from typing import Annotated, Any, NotRequired, TypedDict


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


class InputState(TypedDict):
    """What a caller gives: a question and either an ingested image record or a path."""

    question: str
    image: NotRequired[dict[str, Any]]  # ImageRecord dump with artifact ids (preferred)
    image_path: NotRequired[str]  # read at intake when ``image`` is absent
    options: NotRequired[dict[str, Any]]  # medloupe.options.RunOptions, validated at intake


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
    over_budget: NotRequired[bool]  # the time budget ran out (read from the context's clock)
    answer: NotRequired[dict[str, Any]]  # GroundedAnswer
    notes: Annotated[list[str], append]
