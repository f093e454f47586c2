"""The VLM-driven agents: thinker, planner, rethinker and answerer.

Each builds messages from a versioned prompt (:mod:`medloupe.agents.prompts`) and the same
facts as a typed :class:`~medloupe.agents.protocol.RoleRequest`, asks the backend to play the
role (:meth:`~medloupe.agents.protocol.VLMBackend.play`) with a JSON schema, validates the
reply, and returns it with the :class:`~medloupe.agents.messages.Generation` so the caller can
record usage and latency.

Each prompt renders at a compaction level (:data:`~medloupe.agents.protocol.PROMPT_LEVELS`):
0 gives everything (40 evidence lines, the tools' full JSON schemas), 1 and 2 fewer and
shorter evidence lines and the tools as one-line signatures. A role starts at the level its
backend's :class:`~medloupe.agents.protocol.PromptBudget` says fits the server's context and
goes one level down whenever the server refuses the prompt as too long.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from medloupe.agents import prompts
from medloupe.agents.messages import ChatMessage, Generation, ImagePart, TextPart
from medloupe.agents.protocol import PROMPT_LEVELS, RoleRequest, VLMBackend
from medloupe.agents.structured import parse_reply
from medloupe.artifacts import ArtifactStore
from medloupe.errors import (
    ContextLengthError,
    ModelReplyError,
    ToolArgumentsError,
    UnknownToolError,
)
from medloupe.io.records import ImageRecord
from medloupe.schemas import Claim, Draft, Evidence, Plan, RethinkDecision
from medloupe.tools.builtin import MODALITY_NAMES
from medloupe.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

# evidence lines and characters per line in prompts, by compaction level
DIGEST_SIZES = ((40, 400), (12, 200), (4, 120))
REPLY_TOKENS = 512  # max_tokens of a role's reply (VLMBackend.generate's default)


def evidence_digest(evidence: list[Evidence], level: int = 0) -> str:
    """One line per evidence item (id, source, status, summary), for prompts; fewer and
    shorter lines at higher compaction levels."""
    limit, width = DIGEST_SIZES[min(level, len(DIGEST_SIZES) - 1)]
    lines = []
    for e in evidence[:limit]:
        src = e.tool or (e.citation.document if e.citation else e.kind)
        lines.append(f"- {e.id} [{src}, {e.status}]: {e.summary or e.error or ''}"[:width])
    if len(evidence) > limit:
        lines.append(f"- ... and {len(evidence) - limit} more")
    return "\n".join(lines) or "(none)"


def _type_name(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return "|".join(_type_name(s) for s in schema["anyOf"] if s.get("type") != "null")
    if schema.get("type") == "array" and "prefixItems" in schema:
        return f"[{len(schema['prefixItems'])} numbers]"
    return str(schema.get("type", "value"))


def tool_signature(entry: dict[str, Any], *, describe: bool = True) -> str:
    """One line for a catalogue entry: ``name(arg: type, optional?: type) - summary``."""
    schema = entry.get("input_schema") or {}
    required = set(schema.get("required") or [])
    args = ", ".join(
        f"{name}{'' if name in required else '?'}: {_type_name(s)}"
        for name, s in (schema.get("properties") or {}).items()
    )
    line = f"{entry['name']}({args})"
    if describe and entry.get("description"):
        summary = str(entry["description"]).split(". ")[0].split("\n")[0]
        line += f" - {summary[:100]}"
    return line


async def _ask(
    vlm: VLMBackend,
    store: ArtifactStore,
    texts: Callable[[int], str],
    images: list[str],
    schema: type[BaseModel],
    request: RoleRequest,
    history: list[ChatMessage] | None = None,
) -> tuple[Any, Generation, list[ChatMessage]]:
    """Ask the backend to play ``request.role`` with the prompt ``texts(level)`` at the
    level the backend's prompt budget picks, one level shorter after each refusal as too
    long for the context (the last level's refusal is raised)."""
    budget = vlm.prompt_budget
    before = sum(len(p.text) for m in history or [] for p in m.content if isinstance(p, TextPart))
    sizes = [before + len(texts(lv)) for lv in range(PROMPT_LEVELS)]
    level = budget.start_level(request.role, sizes, vlm.profile.context_tokens, REPLY_TOKENS)
    request = request.model_copy(update={"images": list(images)})
    while True:
        content: list[TextPart | ImagePart] = [ImagePart(artifact=a) for a in images]
        content.append(TextPart(text=texts(level)))
        messages = [*(history or []), ChatMessage(role="user", content=content)]
        try:
            gen = await vlm.play(request, messages, store=store, schema=schema)
        except ContextLengthError as exc:
            budget.overflowed(request.role, level)
            if level + 1 >= PROMPT_LEVELS:
                raise
            log.warning("%s: %s; shortening the %s prompt", vlm.spec, exc, request.role)
            level += 1
            continue
        except ModelReplyError as exc:  # the server answered: its prompt size still counts
            if exc.usage is not None:
                budget.observe(
                    request.role, sizes[level], exc.usage.prompt_tokens // max(1, exc.attempts)
                )
            raise
        budget.observe(request.role, sizes[level], gen.usage.prompt_tokens // max(1, gen.attempts))
        break
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
        lambda level: text,
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
    targets: Sequence[str] = (),
    max_repairs: int = 2,
) -> tuple[Plan, list[Generation], list[str]]:
    """Turn question, draft and the tool catalogue into a validated plan; ``targets`` (what
    the question names that a tool can locate) are suggested to the model.

    An invalid plan (unknown tool, bad arguments) goes back to the model with the validation
    messages, at most ``max_repairs`` times; calls still invalid after that are dropped and
    reported in the returned problems.
    """
    assert image.display_artifact is not None
    catalogue = registry.catalogue(image.modality)

    def plan_text(level: int) -> str:
        if level == 0:
            form = "JSON schemas of their arguments"
            listed = json.dumps(
                [
                    {
                        "name": c["name"],
                        "description": c["description"],
                        "arguments": c["input_schema"],
                    }
                    for c in catalogue
                ]
            )
        else:
            form = "name(argument: type, optional?: type)"
            listed = "\n".join(tool_signature(c, describe=level < 2) for c in catalogue)
        return prompts.render(
            "plan",
            question=question,
            draft_answer=draft.answer,
            draft_confidence=draft.confidence,
            draft_regions=json.dumps(
                [r.model_dump(mode="json") for r in draft.regions]
                if level == 0
                else [r.box_xyxy for r in draft.regions]
            ),
            evidence=evidence_digest(evidence, level),
            catalogue_form=form,
            catalogue=listed,
            targets=", ".join(targets) or "none a tool knows",
        )

    texts: Callable[[int], str] = plan_text
    available = {c["name"] for c in catalogue}
    gens: list[Generation] = []
    history: list[ChatMessage] | None = None
    images = [image.display_artifact]
    problems: list[str] = []
    result = Plan()
    request = RoleRequest(
        role="plan", question=question, answer=draft.answer, targets=list(targets)
    )
    for attempt in range(max_repairs + 1):
        result, gen, history = await _ask(vlm, store, texts, images, Plan, request, history)
        gens.append(gen)
        problems = _plan_problems(result, registry, available)
        if not problems:
            return result, gens, []
        if attempt < max_repairs:
            history = [*history, ChatMessage.text("assistant", gen.text)]
            repair = prompts.render("plan_repair", problems="; ".join(problems))
            texts = functools.partial(_fixed, repair)
            images = []
    valid = [c for c in result.calls if not _plan_problems(Plan(calls=[c]), registry, available)]
    return Plan(calls=valid, rationale=result.rationale), gens, problems


def _fixed(text: str, level: int) -> str:
    return text


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
    *,
    targets: Sequence[str] = (),
    image: str | None = None,
) -> tuple[RethinkDecision, Generation]:
    """Second look: the whole image with boxes drawn, the zoomed crops, the passages;
    ``targets`` are what the question names that a tool located, ``image`` the whole image
    as the first look saw it (for a model that reads the request as data)."""

    def text(level: int) -> str:
        return prompts.render(
            "rethink",
            question=question,
            answer=answer,
            confidence=confidence,
            evidence=evidence_digest(evidence, level),
            passages=evidence_digest(passages, level),
            targets=", ".join(targets) or "none",
        )

    request = RoleRequest(
        role="rethink",
        question=question,
        answer=answer,
        confidence=confidence,
        targets=list(targets),
        image=image,
    )
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
    image_artifact: str | None = None,
    *,
    targets: Sequence[str] = (),
) -> tuple[AnswerDraft, Generation]:
    """The final answer with claims citing evidence ids, with the whole image beside the
    evidence (``image_artifact``: an image-only server needs one in every request);
    ``targets``: what the question names that a tool can locate."""

    def text(level: int) -> str:
        return prompts.render(
            "answer",
            question=question,
            answer=current,
            confidence=confidence,
            evidence=evidence_digest(evidence, level),
        )

    request = RoleRequest(
        role="answer",
        question=question,
        answer=current,
        confidence=confidence,
        evidence_ids=[e.id for e in evidence],
        observation_ids=[e.id for e in evidence if e.kind == "observation"],
        targets=list(targets),
    )
    images = [image_artifact] if image_artifact else []
    draft, gen, _ = await _ask(vlm, store, text, images, AnswerDraft, request)
    return draft, gen
