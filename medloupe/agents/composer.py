"""The default path with no VLM: a rule-based planner and an answer composed from evidence.

Nothing here guesses what the image shows. The composer answers only what the evidence states
outright (modality, body part, size and spacing, measurements) and abstains, with the reason,
on everything else.
"""

from __future__ import annotations

import re

from medloupe.io.records import ImageRecord
from medloupe.mini.attributes import attribute_claims
from medloupe.schemas import (
    Box,
    Claim,
    Draft,
    Evidence,
    GroundedAnswer,
    Plan,
    PlannedCall,
    Region,
)
from medloupe.tools.registry import ToolRegistry

NO_VLM_NOTE = "no vision-language model configured: the first look is skipped"

# questions about the modality itself; a question that merely names one ("Locate the liver
# in this CT image") is not one of them
_MODALITY_Q = re.compile(
    r"\b(modality|imaging (technique|method|type)|what (kind|type) of (image|scan|imaging)|"
    r"how was (this|the) image (taken|acquired)|"
    r"(is|was) (this|the image) (an? )?(x-?ray|ct|mri|ultrasound|radiograph)"
    # ... but not "is this radiograph under-exposed?": the modality must end the question
    r"(?=\s*(\?|$|\.|or\b|(image|scan|study|film)\b)))",
    re.I,
)
_BODY_Q = re.compile(
    r"\b(body part|which organ system|what part of the body|region of the body|anatomy)\b", re.I
)
_COUNT_WBC_Q = re.compile(r"\bhow many\b.*\b(white (blood )?cells?|leu[ck]ocytes?|wbcs?)\b", re.I)
_LOCATE_WBC_Q = re.compile(
    r"\b(locate|where|find|bounding box)\b.*\b(white (blood )?cells?|leu[ck]ocytes?|wbcs?)\b",
    re.I,
)
# DICOM modality codes -> the modality values yes/no questions claim (medloupe.mini.attributes)
_CLAIMED_MODALITY = {
    "CT": "CT",
    "MR": "MRI",
    **dict.fromkeys(("CR", "DX", "DR", "RG", "MG", "RF", "XA", "PX", "IO"), "X-ray"),
}
# exact-match rate of count_cells(wbc) on the BCCD validation split (BENCHMARKS.md)
WBC_COUNT_CONFIDENCE = 0.9
_SIZE_Q = re.compile(
    r"\b(size|dimensions?|field of view|pixel spacing|resolution|how large|how big)\b", re.I
)


def heuristic_plan(question: str, registry: ToolRegistry, image: ImageRecord, draft: Draft) -> Plan:
    """A fixed, honest plan when no VLM plans: image facts, then intensity-based regions
    (grayscale images), then a measurement of each region the draft asked to re-examine,
    then each tool whose :meth:`~medloupe.tools.base.Tool.suggest` asks for a call."""
    calls: list[PlannedCall] = []

    def add(tool: str, arguments: dict[str, object], reason: str) -> None:
        if (
            tool in registry
            and registry.get(tool).suits(image.modality)
            and registry.get(tool).available().ok
        ):
            calls.append(PlannedCall(tool=tool, arguments=arguments, reason=reason))

    add("image_info", {}, "technical facts of the image (modality, body part, size, spacing)")
    if image.channels == 1:
        add("find_regions", {"polarity": "dark"}, "candidate regions to look at more closely")
    if image.channels == 3 and (_COUNT_WBC_Q.search(question) or _LOCATE_WBC_Q.search(question)):
        add(
            "count_cells",
            {"cell_type": "wbc"},
            "find the white blood cells the question asks about",
        )
    for roi in draft.regions[:3]:
        add(
            "measure",
            {"box_xyxy": list(roi.box_xyxy)},
            f"size of a region of interest: {roi.reason}",
        )
    planned = {c.tool for c in calls}
    for t in registry:
        if t.name in planned or len(calls) >= 8:
            continue
        arguments = t.suggest(question, image)
        if arguments is not None:
            add(t.name, arguments, f"the {t.name} tool applies to this question")
    return Plan(calls=calls, rationale="rule-based plan (no VLM configured)")


def _ok(evidence: list[Evidence], tool: str) -> list[Evidence]:
    return [e for e in evidence if e.tool == tool and e.status == "ok"]


def _box_text(box: Box) -> str:
    """``[x0, y0, x1, y1]`` in whole pixels, as answers and claims print boxes."""
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def _grounded(question: str, evidence: list[Evidence]) -> Evidence | None:
    """The ``ground`` evidence that boxes what a question asks a box for, if any ("where is
    the spleen, right or lower right?" asks for words: the box stays evidence, not the
    answer)."""
    from medloupe.mini.grounder import normalise_target
    from medloupe.mini.tool import asks_for_box, target_from_question

    target = target_from_question(question)
    if target is None or not asks_for_box(question):
        return None
    want = normalise_target(target)
    for e in _ok(evidence, "ground"):
        out = e.output or {}
        names = {normalise_target(str(out.get("target", ""))), str(out.get("label", "")).lower()}
        if want in names and e.regions:
            return e
    return None


def compose_answer(
    question: str,
    image: ImageRecord,
    evidence: list[Evidence],
    *,
    vlm_answer: str | None = None,
    vlm_problem: str | None = None,
    deferring_model: str | None = None,
) -> GroundedAnswer:
    """Compose a grounded answer from evidence alone, or abstain with the reason.

    ``vlm_problem`` says why a configured model's own answer was not used (unusable reply,
    claims citing unknown evidence); without it, no model is assumed to be configured.
    ``deferring_model`` names a short-answer model that looked but defers to instruments.

    Answers modality / body-part and size questions from ``image_info`` evidence, white-cell
    counts and boxes from ``count_cells``, and "locate the X" questions from ``ground``;
    everything else is an abstention that says what was gathered and what would be needed.
    """
    info = _ok(evidence, "image_info")
    regions: list[Region] = [
        r for e in evidence if e.status == "ok" for r in e.regions if r.label != "crop"
    ]
    claims: list[Claim] = []
    parts: list[str] = []
    header_modality = (info[0].output or {}).get("modality", image.modality) if info else None
    header_known = bool(info) and header_modality not in (None, "OT")  # OT: the file does not say
    asserted = attribute_claims(question)
    # "Is this a CT scan?": yes or no from the header
    if header_known and asserted is not None and set(asserted) == {"modality"}:
        out = info[0].output or {}
        name = out.get("modality_name", header_modality)
        claimed = asserted["modality"]
        same = _CLAIMED_MODALITY.get(str(header_modality)) == claimed
        claims.append(
            Claim(
                text=(
                    f"The image header gives modality {header_modality} ({name}), so it is "
                    f"{'' if same else 'not '}{claimed}."
                ),
                evidence_ids=[info[0].id],
            )
        )
        parts.append("yes" if same else "no")
    elif header_known and (_MODALITY_Q.search(question) or _BODY_Q.search(question)):
        out = info[0].output or {}
        modality = header_modality
        name = out.get("modality_name", modality)
        body = out.get("body_part")
        answer = f"{name}" + (f" of the {str(body).lower()}" if body else "")
        claims.append(
            Claim(
                text=f"The image header gives modality {modality} ({name}).",
                evidence_ids=[info[0].id],
            )
        )
        if body:
            claims.append(
                Claim(
                    text=f"The header gives the body part examined as {body}.",
                    evidence_ids=[info[0].id],
                )
            )
        parts.append(answer)
    if info and _SIZE_Q.search(question):
        out = info[0].output or {}
        w, h = out.get("width_px"), out.get("height_px")
        fov = out.get("field_of_view_mm")
        text = f"{w}x{h} pixels"
        if fov:
            text += f", {fov[0]:.0f}x{fov[1]:.0f} mm"
            claims.append(
                Claim(
                    text=f"The field of view is {fov[0]:.0f}x{fov[1]:.0f} mm.",
                    evidence_ids=[info[0].id],
                )
            )
        else:
            text += " (pixel spacing unknown, so no size in mm)"
        claims.append(Claim(text=f"The image is {w}x{h} pixels.", evidence_ids=[info[0].id]))
        parts.append(text)
    confidence = 0.95
    counts = [e for e in _ok(evidence, "count_cells") if (e.output or {}).get("cell_type") == "wbc"]
    if counts and _COUNT_WBC_Q.search(question):
        out = counts[0].output or {}
        n = int(out.get("count", 0))
        claims.append(
            Claim(
                text=(
                    f"A classical stain-threshold counter ({out.get('method')}) found {n} white "
                    f"blood cell{'s' if n != 1 else ''}."
                ),
                evidence_ids=[counts[0].id],
            )
        )
        parts.append(str(n))
        confidence = min(confidence, WBC_COUNT_CONFIDENCE)
    if counts and _LOCATE_WBC_Q.search(question) and counts[0].regions:
        cells = counts[0].regions  # largest first
        boxes = "; ".join(_box_text(r.box_xyxy) for r in cells)
        claims.append(
            Claim(
                text=(
                    f"A classical stain-threshold detector boxed {len(cells)} white blood "
                    f"cell{'s' if len(cells) != 1 else ''} (XYXY pixels): {boxes}."
                ),
                evidence_ids=[counts[0].id],
            )
        )
        parts.append(boxes)
        # the located cells lead the answer's regions (the first is the answer's box)
        regions = [*cells, *(r for r in regions if r.id not in {c.id for c in cells})]
        confidence = min(confidence, WBC_COUNT_CONFIDENCE)
    grounded = _grounded(question, evidence)
    if grounded is not None and not (counts and _LOCATE_WBC_Q.search(question)):
        out = grounded.output or {}
        top = grounded.regions[0]
        box = _box_text(top.box_xyxy)
        claims.append(
            Claim(
                text=(
                    f"medloupe-mini's grounder boxed the {str(out.get('label')).lower()} at "
                    f"{box} (XYXY pixels); calibrated chance that the box overlaps the truth "
                    f"with IoU >= 0.5: {float(out.get('confidence', 0.0)):.2f}."
                ),
                evidence_ids=[grounded.id],
            )
        )
        parts.append(f"{out.get('label')}: {box}")
        regions = [*grounded.regions, *(r for r in regions if r not in grounded.regions)]
        confidence = min(confidence, float(out.get("confidence", 0.0)))
    errors = [e for e in evidence if e.status == "error"]
    if parts:
        explanation = "Composed from the evidence of the image's header and instruments; " + (
            f"{deferring_model} also looked, but what an instrument states outright is kept "
            "over a short-answer model's guess."
            if deferring_model
            else "no VLM interpreted the pixels."
        )
        if errors:
            explanation += f" {len(errors)} tool call(s) failed (see the trace)."
        return GroundedAnswer(
            question=question,
            short_answer="; ".join(parts),
            explanation=explanation,
            confidence=confidence,
            claims=claims,
            regions=regions,
        )
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
