"""Pydantic models shared by the graph, the agents, the tools and the outputs.

Boxes are ``XYXY`` in pixels of the run's image (origin top-left, x to the right, y down,
``x0 < x1``, ``y0 < y1``). Graph state stores these models as plain dicts
(``model_dump(mode="json")``) so checkpoints stay small and portable.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from medloupe.errors import DanglingEvidenceError

DISCLAIMER = (
    "medloupe is a research tool, not a medical device. Its answers are not a diagnosis and "
    "must not be used for clinical decisions without review by a qualified professional."
)

Box = tuple[float, float, float, float]


def _check_box(box: Box) -> Box:
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box {list(box)} is not XYXY with x0 < x1 and y0 < y1")
    return box


class Region(BaseModel):
    """A place in the image that some evidence points at."""

    id: str = Field(description="stable id, unique in the run")
    box_xyxy: Box = Field(description="XYXY pixels of the run's image")
    label: str
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    mask_artifact: str | None = Field(default=None, description="artifact id of a PNG mask")
    tool: str | None = Field(default=None, description="the tool that produced the region")
    evidence_id: str | None = None

    _box = field_validator("box_xyxy")(classmethod(lambda cls, v: _check_box(v)))


class Citation(BaseModel):
    """A passage of a reference text that the answer leans on."""

    id: str
    document: str
    section: str | None = None
    page: str | None = None
    snippet: str
    figure_artifact: str | None = None
    score: float | None = None


class Evidence(BaseModel):
    """One item of evidence: a tool call's result, a retrieved passage or an observation.

    ``id`` is derived from what produced the item (tool name, canonical arguments, image hash;
    or document and passage), so a resumed run gives the same ids as an uninterrupted one.
    """

    id: str
    kind: Literal["tool", "passage", "observation"]
    step: int = 0
    tool: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    status: Literal["ok", "error"] = "ok"
    summary: str = ""
    output: dict[str, Any] | None = None
    regions: list[Region] = Field(default_factory=list)
    artifacts: list[str] = Field(default_factory=list)
    citation: Citation | None = None
    error: str | None = None
    duration_ms: float | None = None


class RegionOfInterest(BaseModel):
    """A region the thinker or rethinker wants to look at more closely."""

    box_xyxy: Box
    reason: str = Field(default="", max_length=300)

    _box = field_validator("box_xyxy")(classmethod(lambda cls, v: _check_box(v)))


class Draft(BaseModel):
    """The first look at the whole image."""

    answer: str | None = Field(
        default=None, max_length=300, description="draft short answer, or null"
    )
    findings: list[Annotated[str, Field(max_length=300)]] = Field(
        default_factory=list, max_length=8
    )
    regions: list[RegionOfInterest] = Field(default_factory=list, max_length=3)
    confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    note: str | None = Field(default=None, max_length=500)


class PlannedCall(BaseModel):
    """One tool call of a plan."""

    tool: str = Field(max_length=100)
    arguments: dict[str, Any] = Field(default_factory=dict)
    reason: str = Field(default="", max_length=300)


class Plan(BaseModel):
    """Tool calls that would confirm, ground or measure the draft. Calls run concurrently."""

    calls: list[PlannedCall] = Field(default_factory=list, max_length=8)
    rationale: str = Field(default="", max_length=500)


class RethinkDecision(BaseModel):
    """What a rethink round concluded."""

    answer: str | None = Field(default=None, max_length=300)
    confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    needs_more_evidence: bool = False
    request: str | None = Field(
        default=None, max_length=300, description="what further evidence would help"
    )
    note: str | None = Field(default=None, max_length=500)
    withheld: str | None = Field(
        default=None,
        max_length=300,
        description="set only when the image cannot answer the question (what it asks about "
        "is not in view): the reason; the answer then abstains with it",
    )


class RethinkRound(BaseModel):
    """One second look: the crops shown and how the answer changed."""

    round: int
    crops: list[str] = Field(default_factory=list, description="crop artifact ids")
    boxes: list[Box] = Field(default_factory=list)
    answer_before: str | None = None
    answer_after: str | None = None
    confidence_before: float = 0.0
    confidence_after: float = 0.0
    needs_more_evidence: bool = False
    request: str | None = None
    note: str | None = None
    withheld: str | None = None


class Claim(BaseModel):
    """A statement in the answer and the evidence ids that support it."""

    text: str = Field(max_length=500)
    evidence_ids: list[str] = Field(min_length=1, max_length=10)


class Provenance(BaseModel):
    """Which components produced the answer."""

    vlm: str | None = Field(default=None, description="backend spec, or null when none was used")
    vlm_default: bool = Field(
        default=False,
        description="true when no VLM was configured and the default (medloupe-mini, shipped "
        "in the package) was used",
    )
    answer_source: Literal["vlm", "evidence-composer", "quality-gate"] = "evidence-composer"
    tools: list[str] = Field(default_factory=list)
    retriever: str | None = None
    medloupe_version: str = ""


class GroundedAnswer(BaseModel):
    """The final answer: every claim tied to evidence, with regions and citations.

    Validate with ``context={"evidence_ids": {...}}`` to reject claims (and regions) that
    cite evidence ids the run does not have.
    """

    question: str
    short_answer: str | None = Field(default=None, description="null when abstaining")
    explanation: str = ""
    confidence: float = Field(ge=0.0, le=1.0)
    abstained: bool = False
    abstention_reason: str | None = None
    claims: list[Claim] = Field(default_factory=list)
    regions: list[Region] = Field(default_factory=list)
    citations: list[Citation] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)
    disclaimer: str = Field(
        default=DISCLAIMER, description="fixed: research tool, not a medical device"
    )

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> GroundedAnswer:
        if self.disclaimer != DISCLAIMER:
            raise ValueError("the disclaimer is fixed and cannot be changed")
        if self.abstained:
            if not self.abstention_reason:
                raise ValueError("an abstention must give abstention_reason")
            if self.short_answer is not None:
                raise ValueError("an abstention has no short_answer")
        elif not self.short_answer:
            raise ValueError("a non-abstaining answer needs a short_answer")
        known = (info.context or {}).get("evidence_ids") if info is not None else None
        if known is not None:
            known = set(known)
            for claim in self.claims:
                missing = [e for e in claim.evidence_ids if e not in known]
                if missing:
                    raise DanglingEvidenceError(
                        f"claim {claim.text!r} cites unknown evidence id(s) {missing}; "
                        f"known ids: {sorted(known)}"
                    )
            for region in self.regions:
                if region.evidence_id is not None and region.evidence_id not in known:
                    raise DanglingEvidenceError(
                        f"region {region.id!r} cites unknown evidence id {region.evidence_id!r}"
                    )
        return self
