"""The default path with no VLM: a rule-based planner and an answer composed from evidence.

Nothing here guesses what the image shows, and no tool is named here: the planner asks every
tool what it suggests for the question (:meth:`~medloupe.tools.base.Tool.suggest`) and how to
examine the first look's regions (:meth:`~medloupe.tools.base.Tool.follow_up`); the composer
asks every tool what its evidence states outright (:meth:`~medloupe.tools.base.Tool.states`:
the header's modality and size, a cell count, a grounded box) and abstains, with the reason,
on everything else.
"""

from __future__ import annotations

from medloupe.io.records import ImageRecord
from medloupe.schemas import (
    Claim,
    Draft,
    Evidence,
    GroundedAnswer,
    Plan,
    PlannedCall,
    Provenance,
    Region,
)
from medloupe.text import tokens
from medloupe.tools.base import Statement
from medloupe.tools.registry import ToolRegistry

NO_VLM_NOTE = "no vision-language model configured: the first look is skipped"
MAX_PLANNED_CALLS = 8
MAX_FOLLOW_UPS = 3


def heuristic_plan(question: str, registry: ToolRegistry, image: ImageRecord, draft: Draft) -> Plan:
    """A fixed, honest plan when no VLM plans: each tool whose
    :meth:`~medloupe.tools.base.Tool.suggest` asks for a call (image facts, intensity-based
    regions of grayscale images, ...), then each follow-up of the regions the draft asked to
    re-examine, in registry order; only tools that suit the image and are available."""
    usable = [t for t in registry if t.suits(image.modality) and t.available().ok]
    calls: list[PlannedCall] = []
    for t in usable:
        suggested = t.suggest(question, image)
        many = [suggested] if isinstance(suggested, dict) else suggested or []
        for suggested_args in many:
            if len(calls) < MAX_PLANNED_CALLS:
                calls.append(
                    PlannedCall(
                        tool=t.name,
                        arguments=suggested_args,
                        reason=f"{t.name}: {t.description[:120]}",
                    )
                )
    for roi in draft.regions[:MAX_FOLLOW_UPS]:
        for t in usable:
            arguments = t.follow_up(roi.box_xyxy, roi.reason)
            if arguments is not None:
                calls.append(
                    PlannedCall(
                        tool=t.name,
                        arguments=arguments,
                        reason=f"examine a region of interest: {roi.reason}",
                    )
                )
    return Plan(calls=calls, rationale="rule-based plan (no VLM configured)")


def question_targets(question: str, registry: ToolRegistry, image: ImageRecord) -> list[str]:
    """What the question names that a usable tool can locate (:meth:`Tool.targets
    <medloupe.tools.base.Tool.targets>`), in order, each once: where the second look goes
    first, what a model planner is pointed to, what a model checks is in view."""
    out: list[str] = []
    for t in registry:
        if t.suits(image.modality) and t.available().ok:
            out.extend(x for x in t.targets(question) if x not in out)
    return out


def withheld_reason(question: str, targets: list[str], reason: str | None) -> str | None:
    """A second look's "not in view" ``reason``, kept only when it names what the question
    asks about: one of its ``targets`` (:func:`question_targets`) or, where no tool knows
    one, a word of four letters or more of the question (plurals matched). A reason naming
    neither (a model's noise: random weights fill every field) is dropped (``None``), so the
    answer goes ahead rather than abstaining for nothing."""
    if not reason or not reason.strip():
        return None

    def stems(text: str) -> list[str]:
        return [w.removesuffix("s") for w in tokens(text)]

    said = set(stems(reason))
    names = [stems(t) for t in targets] or [[w] for w in stems(question) if len(w) >= 4]
    return reason if any(n and all(w in said for w in n) for n in names) else None


def statements(question: str, evidence: list[Evidence], registry: ToolRegistry) -> list[Statement]:
    """What the tools' evidence states outright, in registry order; one located answer (the
    first statement with regions) per question."""
    out: list[Statement] = []
    located = False
    for t in registry:
        s = t.states(question, evidence)
        if s is None or (s.regions and located):
            continue
        located = located or bool(s.regions)
        out.append(s)
    return out


def compose_answer(
    question: str,
    image: ImageRecord,
    evidence: list[Evidence],
    registry: ToolRegistry,
    *,
    vlm_answer: str | None = None,
    vlm_problem: str | None = None,
    deferring_model: str | None = None,
) -> GroundedAnswer:
    """Compose a grounded answer from what the tools state outright, or abstain with the
    reason.

    ``vlm_problem`` says why a configured model's own answer was not used (unusable reply,
    claims citing unknown evidence); without it, no model is assumed to be configured.
    ``deferring_model`` names a short-answer model that looked but defers to instruments.
    """
    regions: list[Region] = [
        r for e in evidence if e.status == "ok" for r in e.regions if r.label != "crop"
    ]
    said = statements(question, evidence, registry)
    if said:
        located = [r for s in said for r in s.regions]
        regions = [*located, *(r for r in regions if r not in located)]
        claims: list[Claim] = [c for s in said for c in s.claims]
        explanation = "Composed from the evidence of the image's header and instruments; " + (
            f"{deferring_model} also looked, but what an instrument states outright is kept "
            "over a short-answer model's guess."
            if deferring_model
            else "no VLM interpreted the pixels."
        )
        errors = [e for e in evidence if e.status == "error"]
        if errors:
            explanation += f" {len(errors)} tool call(s) failed (see the trace)."
        return GroundedAnswer(
            question=question,
            short_answer="; ".join(p for s in said for p in s.parts),
            explanation=explanation,
            confidence=min(0.95, *(s.confidence for s in said)),
            claims=claims,
            regions=regions,
        )
    return _abstention(question, evidence, regions, vlm_answer, vlm_problem)


def uninformative_image(question: str, image: ImageRecord) -> GroundedAnswer | None:
    """The abstention for an image that cannot inform an answer (its record's ``quality``
    problems), or ``None`` for a usable image."""
    if not image.quality:
        return None
    return GroundedAnswer(
        question=question,
        short_answer=None,
        abstained=True,
        abstention_reason="The image cannot inform an answer: " + "; ".join(image.quality) + ".",
        explanation="Intake checked the image before any model looked: it carries too little "
        "to answer from. Give the original image (full resolution, valid pixel values).",
        confidence=0.0,
        provenance=Provenance(answer_source="quality-gate"),
    )


def withheld_answer(
    question: str, reason: str, model: str, evidence: list[Evidence]
) -> GroundedAnswer:
    """The abstention when the second look found that the image cannot answer the question
    (``reason``: what it asks about is not in view); the regions the instruments found are
    kept for review."""
    regions = [r for e in evidence if e.status == "ok" for r in e.regions if r.label != "crop"]
    return GroundedAnswer(
        question=question,
        short_answer=None,
        abstained=True,
        abstention_reason=f"{reason} ({model}, second look); no answer is guessed.",
        explanation="The question is about something the image does not show clearly enough "
        "to judge; the regions the instruments proposed are shown for review, not as findings.",
        confidence=0.0,
        regions=regions,
        provenance=Provenance(answer_source="vlm"),
    )


def _abstention(
    question: str,
    evidence: list[Evidence],
    regions: list[Region],
    vlm_answer: str | None,
    vlm_problem: str | None,
) -> GroundedAnswer:
    gathered = (
        ", ".join(sorted({e.tool or e.kind for e in evidence if e.status == "ok"})) or "nothing"
    )
    reason = (
        "No vision-language model is configured and the evidence gathered "
        f"({gathered}) does not answer this question; configure one with --vlm."
    )
    if vlm_problem:
        reason = (
            f"The model's answer was not usable ({vlm_problem[:300]}) and the evidence "
            f"gathered ({gathered}) does not answer this question."
        )
    elif vlm_answer:
        reason = f"The model's answer could not be grounded in the evidence ({vlm_answer!r})."
    citations = [e.citation for e in evidence if e.kind == "passage" and e.citation]
    explanation = "The regions found are shown for review; they are not a finding."
    if citations:
        explanation += (
            f" The {len(citations)} reference passage(s) retrieved for the question are listed "
            "for review; no model read them against the image."
        )
    return GroundedAnswer(
        question=question,
        short_answer=None,
        abstained=True,
        abstention_reason=reason,
        explanation=explanation,
        confidence=0.0,
        regions=regions,
        citations=citations,
    )
