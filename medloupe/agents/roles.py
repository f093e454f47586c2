"""The VLM-driven agents: thinker, planner, rethinker and answerer.

Each builds messages from a versioned prompt (:mod:`medloupe.agents.prompts`) and the same
facts as a typed :class:`~medloupe.agents.protocol.RoleRequest`, asks the backend to play the
role (:meth:`~medloupe.agents.protocol.VLMBackend.play`) with a JSON schema, validates the
reply, and returns it with the :class:`~medloupe.agents.messages.Generation` so the caller can
record usage and latency.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from medloupe.agents import prompts
from medloupe.agents.messages import ChatMessage, Generation, ImagePart, TextPart
from medloupe.agents.protocol import RoleRequest, VLMBackend
from medloupe.agents.structured import parse_reply
from medloupe.artifacts import ArtifactStore
from medloupe.errors import ModelReplyError, ToolArgumentsError, UnknownToolError
from medloupe.io.records import ImageRecord
from medloupe.schemas import Claim, Draft, Evidence, Plan, RethinkDecision
from medloupe.tools.builtin import MODALITY_NAMES
from medloupe.tools.registry import ToolRegistry


def evidence_digest(evidence: list[Evidence], limit: int = 40) -> str:
    """One line per evidence item (id, source, status, summary), for prompts."""
    lines = []
    for e in evidence[:limit]:
        src = e.tool or (e.citation.document if e.citation else e.kind)
        lines.append(f"- {e.id} [{src}, {e.status}]: {e.summary or e.error or ''}"[:400])
    return "\n".join(lines) or "(none)"


async def _ask(
    vlm: VLMBackend,
    store: ArtifactStore,
    text: str,
    images: list[str],
    schema: type[BaseModel],
    request: RoleRequest,
    history: list[ChatMessage] | None = None,
) -> tuple[Any, Generation, list[ChatMessage]]:
    content: list[TextPart | ImagePart] = [ImagePart(artifact=a) for a in images]
    content.append(TextPart(text=text))
    messages = [*(history or []), ChatMessage(role="user", content=content)]
    request = request.model_copy(update={"images": list(images)})
    gen = await vlm.play(request, messages, store=store, schema=schema)
    parsed = gen.parsed
    if not isinstance(parsed, schema):
        try:
            parsed = parse_reply(gen.text, schema)
        except ValueError as exc:
            raise ModelReplyError(
                f"{vlm.spec}: reply does not match {schema.__name__}: {exc}",
                usage=gen.usage,
                latency_ms=gen.latency_ms,
            ) from None
    return parsed, gen, messages


async def think(
    vlm: VLMBackend, store: ArtifactStore, image: ImageRecord, question: str
) -> tuple[Draft, Generation]:
    """First look at the whole image: draft answer, findings, regions to re-examine."""
    assert image.display_artifact is not None
    text = prompts.render(
        "think",
        question=question,
        width=image.width,
        height=image.height,
        modality_name=MODALITY_NAMES.get(image.modality, image.modality),
        body_part=f" of the {image.body_part.lower()}" if image.body_part else "",
    )
    draft, gen, _ = await _ask(
        vlm,
        store,
        text,
        [image.display_artifact],
        Draft,
        RoleRequest(role="think", question=question),
    )
    return draft, gen


async def plan(
    vlm: VLMBackend,
    store: ArtifactStore,
    registry: ToolRegistry,
    image: ImageRecord,
    question: str,
    draft: Draft,
    evidence: list[Evidence],
    *,
    max_repairs: int = 2,
) -> tuple[Plan, list[Generation], list[str]]:
    """Turn question, draft and the tool catalogue into a validated plan.

    An invalid plan (unknown tool, bad arguments) goes back to the model with the validation
    messages, at most ``max_repairs`` times; calls still invalid after that are dropped and
    reported in the returned problems.
    """
    assert image.display_artifact is not None
    catalogue = registry.catalogue(image.modality)
    text = prompts.render(
        "plan",
        question=question,
        draft_answer=draft.answer,
        draft_confidence=draft.confidence,
        draft_regions=json.dumps([r.model_dump(mode="json") for r in draft.regions]),
        evidence=evidence_digest(evidence),
        catalogue=json.dumps(
            [
                {"name": c["name"], "description": c["description"], "arguments": c["input_schema"]}
                for c in catalogue
            ]
        ),
    )
    available = {c["name"] for c in catalogue}
    gens: list[Generation] = []
    history: list[ChatMessage] | None = None
    images = [image.display_artifact]
    problems: list[str] = []
    result = Plan()
    request = RoleRequest(role="plan", question=question, answer=draft.answer)
    for attempt in range(max_repairs + 1):
        result, gen, history = await _ask(vlm, store, text, images, Plan, request, history)
        gens.append(gen)
        problems = _plan_problems(result, registry, available)
        if not problems:
            return result, gens, []
        if attempt < max_repairs:
            history = [*history, ChatMessage.text("assistant", gen.text)]
            text = prompts.render("plan_repair", problems="; ".join(problems))
            images = []
    valid = [c for c in result.calls if not _plan_problems(Plan(calls=[c]), registry, available)]
    return Plan(calls=valid, rationale=result.rationale), gens, problems


def _plan_problems(p: Plan, registry: ToolRegistry, available: set[str]) -> list[str]:
    problems = []
    for call in p.calls:
        try:
            registry.validate(call.tool, call.arguments)
        except (UnknownToolError, ToolArgumentsError) as exc:
            problems.append(str(exc))
            continue
        if call.tool not in available:
            problems.append(f"tool {call.tool!r} is not available for this image")
    return problems


async def rethink(
    vlm: VLMBackend,
    store: ArtifactStore,
    question: str,
    overview_artifact: str,
    crops: list[str],
    answer: str | None,
    confidence: float,
    evidence: list[Evidence],
    passages: list[Evidence],
) -> tuple[RethinkDecision, Generation]:
    """Second look: the whole image with boxes drawn, the zoomed crops, the passages."""
    text = prompts.render(
        "rethink",
        question=question,
        answer=answer,
        confidence=confidence,
        evidence=evidence_digest(evidence),
        passages=evidence_digest(passages),
    )
    request = RoleRequest(role="rethink", question=question, answer=answer, confidence=confidence)
    decision, gen, _ = await _ask(
        vlm, store, text, [overview_artifact, *crops], RethinkDecision, request
    )
    return decision, gen


class AnswerDraft(BaseModel):
    """What the answerer model returns; the graph adds regions, citations and timings."""

    short_answer: str | None = Field(default=None, max_length=300)
    explanation: str = Field(default="", max_length=1500)
    confidence: float = Field(ge=0.0, le=1.0)
    abstained: bool = False
    abstention_reason: str | None = Field(default=None, max_length=300)
    claims: list[Claim] = Field(default_factory=list, max_length=8)


async def answer(
    vlm: VLMBackend,
    store: ArtifactStore,
    question: str,
    current: str | None,
    confidence: float,
    evidence: list[Evidence],
) -> tuple[AnswerDraft, Generation]:
    """The final answer with claims citing evidence ids."""
    text = prompts.render(
        "answer",
        question=question,
        answer=current,
        confidence=confidence,
        evidence=evidence_digest(evidence),
    )
    request = RoleRequest(
        role="answer",
        question=question,
        answer=current,
        confidence=confidence,
        evidence_ids=[e.id for e in evidence],
        observation_ids=[e.id for e in evidence if e.kind == "observation"],
    )
    draft, gen, _ = await _ask(vlm, store, text, [], AnswerDraft, request)
    return draft, gen
