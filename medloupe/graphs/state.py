"""Typed graph state with explicit reducers (the runtime context is in
:mod:`medloupe.graphs.context`).

State values are JSON-serialisable dicts (pydantic models dumped with ``mode="json"``): image
records with artifact ids, boxes, evidence items. Arrays never enter state.

The TypedDicts come from ``typing_extensions`` so that pydantic can build their JSON schemas on
Python 3.11 (LangGraph's server serves them: Studio's input form).
"""

from __future__ import annotations

from typing import Annotated, Any, NotRequired

from typing_extensions import TypedDict


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
    """What a caller gives: a question and either an image path or an ingested image record.

    A new input on a thread that answered a question starts a new question: intake clears
    the previous one's evidence, passages, rethink rounds, notes and answer.
    """

    question: str
    image_path: NotRequired[str]  # PNG/JPEG/DICOM/NIfTI file, read at intake
    image: NotRequired[dict[str, Any]]  # ImageRecord dump with artifact ids (medloupe's runner)
    options: NotRequired[dict[str, Any]]  # medloupe.options.RunOptions, validated at intake


class OutputState(TypedDict):
    """What a run returns: the grounded answer and the run's notes (degradations)."""

    answer: NotRequired[dict[str, Any]]  # medloupe.schemas.GroundedAnswer
    notes: NotRequired[list[str]]


class State(InputState):
    """Full state. Reducers: evidence and passages merge by id; rounds and notes append."""

    started_at: NotRequired[float]
    image_source: NotRequired[str]  # the image_path ``image`` was read from
    draft: NotRequired[dict[str, Any]]  # Draft
    plan: NotRequired[dict[str, Any]]  # Plan (the current round's)
    step: NotRequired[int]  # completed plan-act rounds
    evidence: Annotated[list[dict[str, Any]], merge_by_id]
    passages: Annotated[list[dict[str, Any]], merge_by_id]
    rethinks: Annotated[list[dict[str, Any]], append]
    current_answer: NotRequired[str | None]
    current_confidence: NotRequired[float]
    needs_more: NotRequired[bool]
    targets: NotRequired[list[str]]  # what the question names that a tool can locate
    withheld: NotRequired[str | None]  # why the second look says the image cannot answer
    over_budget: NotRequired[bool]  # the time budget ran out (read from the context's clock)
    answer: NotRequired[dict[str, Any] | None]  # GroundedAnswer (None: not answered yet)
    notes: Annotated[list[str], append]
