"""``ground``: medloupe-mini's grounder as a tool (target phrase -> boxes with scores)."""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from medloupe.config import env_name
from medloupe.io.records import ImageRecord
from medloupe.mini import model_folder
from medloupe.mini.answerer import MiniAnswerer
from medloupe.mini.grounder import (
    SYNONYMS,
    MiniGrounder,
    UnknownTarget,
    modality_key,
    normalise_target,
)
from medloupe.mini.orientation import NAMES as ORIENTATIONS
from medloupe.schemas import Box, Claim, Evidence, Region
from medloupe.tools.base import (
    Availability,
    Requirements,
    Statement,
    Tool,
    ToolContext,
    ToolResult,
    box_text,
    successful,
)
from medloupe.tools.compare import Extreme, size_comparison
from medloupe.tools.position import (
    Relation,
    centre,
    holds,
    relation_from_question,
    relation_words,
)

_TARGET_PATTERNS = (
    # "This chest X-ray shows pneumonia. Locate it ..."
    re.compile(
        r"\bshows? (?:an? |the )?(?P<t>[a-z][a-z -]*?)\s*[.,;]\s*(?:locate|find|box)\b", re.I
    ),
    # "Locate the liver in this CT image ...", "Find the left kidney."
    re.compile(
        r"\b(?:locate|find|detect|box(?!\s+(?:of|for|around)\b))\s+(?:the |a |an |all )?"
        r"(?P<t>[a-z][a-z -]*?)\s*(?:\b(?:in|on|within) (?:this|the)\b|[.?,;]|\band\b|$)",
        re.I,
    ),
    # "Where is the spleen (located)?"
    re.compile(
        r"\bwhere (?:is|are) (?:the |a |an )?(?P<t>[a-z][a-z -]*?)"
        r"\s*(?:\blocated\b|\b(?:in|on) (?:this|the)\b|[.?,;]|$)",
        re.I,
    ),
    # "the bounding box of the nodule"
    re.compile(
        r"\bbounding box (?:of|for|around) (?:the |a |an )?(?P<t>[a-z][a-z -]*?)"
        r"\s*(?:\b(?:in|on) (?:this|the)\b|[.?,;]|$)",
        re.I,
    ),
)


_BOX_REQUEST = re.compile(r"\b(locate|bounding box|box|outline|mark|draw a box)\b", re.I)


def asks_for_box(question: str) -> bool:
    """Whether a question asks for a box ("Locate the liver ... give its bounding box"), not
    for a position in words ("Where is the spleen, right or lower right?")."""
    return bool(_BOX_REQUEST.search(question))


def target_from_question(question: str) -> str | None:
    """The thing a localisation question asks for ("Locate the liver in this CT image" ->
    ``"liver"``), or ``None``."""
    for pattern in _TARGET_PATTERNS:
        m = pattern.search(question)
        if m and m.group("t").strip() not in ("it", "this", "them"):
            return m.group("t").strip()
    return None


_SIDES = ("left ", "right ")
MAX_SUGGESTED = 3  # targets the rule-based plan grounds for one question
MAX_COMPARED = 6  # ... for a size comparison (every side of each option: "lung, liver or heart")


def named_targets(question: str, labels: Sequence[str]) -> list[str]:
    """The grounder's ``labels`` the question names anywhere, in the order they appear:
    "Does the liver look abnormal?" -> ``["Liver"]``; a sided label also answers to its bare
    name or plural ("Is the lung healthy?", "the kidneys" -> both sides). Longer names win
    over the shorter ones inside them ("liver cancer" is not also "liver")."""
    text = " " + re.sub(r"[^a-z0-9]+", " ", question.lower()) + " "
    for phrase, label in SYNONYMS.items():
        text = text.replace(f" {phrase} ", f" {label} ")
    names: dict[str, list[str]] = {}
    for label in labels:
        low = label.lower()
        names.setdefault(low, []).append(label)
        for side in _SIDES:
            if low.startswith(side):
                names.setdefault(low.removeprefix(side), []).append(label)
    found: list[tuple[int, str]] = []
    taken = [False] * len(text)
    for name in sorted(names, key=len, reverse=True):
        for m in re.finditer(rf" {re.escape(name)}(?:s|es)? ", text):
            if any(taken[m.start() + 1 : m.end() - 1]):
                continue
            taken[m.start() + 1 : m.end() - 1] = [True] * (m.end() - m.start() - 2)
            found.extend((m.start(), label) for label in names[name])
    out: list[str] = []
    for _, label in sorted(found, key=lambda t: t[0]):
        if label not in out:
            out.append(label)
    return out


class GroundArgs(BaseModel):
    model_config = {"extra": "forbid"}

    target: str = Field(
        min_length=1,
        max_length=100,
        description="what to find: an organ, lesion, chest X-ray finding or white blood cell "
        "(e.g. 'liver', 'left kidney', 'nodule', 'white blood cell')",
    )
    modality: Literal["CT", "MRI", "X-Ray", "microscopy"] | None = Field(
        default=None, description="the image's modality (default: from the image header, if any)"
    )
    max_boxes: int = Field(default=3, ge=1, le=10, description="boxes returned at most")


def _read_from_boxes(hits: Sequence[Evidence], answers: int) -> tuple[float, float]:
    """``(every box right, confidence)`` of an answer read from the grounder's boxes in
    ``hits``: the product of their calibrated confidences, and that plus a guess among the
    ``answers`` possible ones when a box is off."""
    right = float(np.prod([float((e.output or {}).get("confidence", 0.0)) for e in hits]))
    return right, right + (1.0 - right) / answers


class ScoredBox(BaseModel):
    box_xyxy: Box
    score: float = Field(ge=0.0, le=1.0, description="heatmap peak inside the box")


class GroundResult(ToolResult):
    target: str
    label: str = Field(description="the trained target the phrase was matched to")
    modality: str | None
    boxes: list[ScoredBox] = Field(description="XYXY pixels, best first")
    confidence: float = Field(
        ge=0.0,
        le=1.0,
        description="chance that the first box has IoU >= 0.5 with the truth (calibrated on "
        "held-out training images)",
    )
    method: str
    orientation: str | None = Field(
        default=None,
        description="how the slice was found displayed (rotated or mirrored) when it was "
        "grounded in the standard view and its boxes mapped back; null: as displayed",
    )
    modality_estimated: float | None = Field(
        default=None,
        description="the modality was not stated (no header, no word in the question) and "
        "was read from the image by medloupe-mini's answerer with this probability",
    )

    def summary(self) -> str:
        turned = f"; slice found {self.orientation}" if self.orientation else ""
        if self.modality_estimated is not None:
            turned += f"; modality read from the image (p {self.modality_estimated:.2f})"
        if not self.boxes:
            return f"{self.label}: nothing found{turned}"
        b = self.boxes[0].box_xyxy
        return (
            f"{self.label} ({self.modality or 'modality unknown'}): box "
            f"[{b[0]:.0f}, {b[1]:.0f}, {b[2]:.0f}, {b[3]:.0f}] (confidence {self.confidence:.2f})"
            + (f", {len(self.boxes) - 1} more" if len(self.boxes) > 1 else "")
            + turned
        )


@functools.lru_cache(maxsize=4)
def _grounder(folder: Path) -> MiniGrounder:
    return MiniGrounder(folder)


@functools.lru_cache(maxsize=4)
def _answerer(folder: Path) -> MiniAnswerer:
    return MiniAnswerer(folder)


# a modality the image states nowhere is read from it when the answerer's modality head gives
# one value at least this share (yes/no questions about the kind of image, answered from the
# same head: 0.96 held out, 0.98 out of fold; see the model card)
MODALITY_READ_AT = 0.9
MODALITY_READS_KEPT = 64  # images whose read is remembered (the planner grounds several targets)


class GroundTool(Tool):
    """medloupe-mini's grounder behind the tool protocol.

    Args:
        folder: a trained medloupe-mini folder with ``grounder.json`` / ``grounder.pt``
            (default: ``Settings.mini``, else the copy shipped in the package).
    """

    name = "ground"
    description = (
        "Find an organ, lesion, chest X-ray finding or white blood cell named in words and "
        "return its boxes (medloupe-mini's grounder, trained on SLAKE, NIH ChestX-ray14 and "
        "BCCD train images)."
    )
    input_model = GroundArgs
    output_model = GroundResult
    requires = Requirements(weights=("medloupe-mini grounder.pt",), device="cpu")
    timeout_s = 120.0

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = model_folder(folder)
        # display artifact id (content-addressed) -> read_modality's answer for that image
        self._reads: OrderedDict[str, tuple[str | None, float | None]] = OrderedDict()
        self._reads_lock = threading.Lock()

    @property
    def grounder(self) -> MiniGrounder:
        return _grounder(self.folder)

    def available(self) -> Availability:
        if not (self.folder / "grounder.json").is_file():
            return Availability(
                False,
                f"no medloupe-mini grounder in {self.folder} (grounder.json missing): train one "
                f"with `medloupe train mini --data ../shared/datasets --out DIR` and set "
                f"{env_name('mini')}=DIR",
            )
        return Availability(True, f"ready: {len(self.grounder.labels)} targets")

    def read_modality(self, rgb: np.ndarray) -> tuple[str | None, float | None]:
        """The grounder's modality name for ``rgb`` (``(H, W, 3)`` uint8 RGB) as the folder's
        answerer reads it from the pixels, with its probability, when that is at least
        :data:`MODALITY_READ_AT` (else ``(None, p)``; ``(None, None)`` without an answerer)."""
        if not (self.folder / "answerer.json").is_file():
            return None, None
        read = _answerer(self.folder).attribute(rgb, "modality")
        if read is None:
            return None, None
        value, share = read
        return (modality_key(value) if share >= MODALITY_READ_AT else None), share

    def _read_once(self, key: str | None, rgb: np.ndarray) -> tuple[str | None, float | None]:
        """:meth:`read_modality` of the image whose display artifact is ``key``, read once
        however many targets are grounded in it (``None``: no id, read every time)."""
        if key is not None:
            with self._reads_lock:
                if key in self._reads:
                    self._reads.move_to_end(key)
                    return self._reads[key]
        read = self.read_modality(rgb)
        if key is not None:
            with self._reads_lock:
                self._reads[key] = read
                while len(self._reads) > MODALITY_READS_KEPT:
                    self._reads.popitem(last=False)
        return read

    def targets(self, question: str) -> list[str]:
        """The trained targets the question names (:func:`named_targets`); a "locate the X"
        question's X first."""
        if not self.available().ok:
            return []
        asked = target_from_question(question)
        first = self.grounder.known(asked) if asked else None
        named = named_targets(question, self.grounder.labels)
        return [first, *(t for t in named if t != first)] if first else named

    def compared(self, question: str) -> tuple[Extreme, list[tuple[str, list[str]]]] | None:
        """The end a size comparison asks for and its options (:func:`size_comparison`), each
        with the trained targets it names (a bare sided name is both sides: "lung" -> both
        lungs); ``None`` for other questions and unless every option names one."""
        asked = size_comparison(question)
        if asked is None or not self.available().ok:
            return None
        options = [(o, named_targets(o, self.grounder.labels)) for o in asked[1]]
        return (asked[0], options) if all(labels for _, labels in options) else None

    def suggest(self, question: str, image: ImageRecord) -> list[dict[str, Any]] | None:
        """Ground what the question names (at most :data:`MAX_SUGGESTED` targets): a
        "locate" question's target, an organ whose look or size is asked, both sides of a
        relative-position question; every option of a size comparison (at most
        :data:`MAX_COMPARED`)."""
        compared = self.compared(question)
        if compared is not None:
            targets = list(dict.fromkeys(t for _, labels in compared[1] for t in labels))
            targets = targets[:MAX_COMPARED]
        else:
            targets = self.targets(question)[:MAX_SUGGESTED]
        if not targets:
            return None
        modality = modality_key(question) or modality_key(image.modality)
        extra = {"modality": modality} if modality else {}
        return [{"target": t, **extra} for t in targets]

    def states(self, question: str, evidence: list[Evidence]) -> Statement | None:
        """The box of what a "locate the X" question asks a box for ("where is the spleen,
        right or lower right?" asks for words: the box stays evidence, not the answer); the
        answer of a relative-position question both of whose targets were grounded, and of a
        size comparison all of whose options were."""
        relation = relation_from_question(question)
        if relation is not None:
            return self._relative(relation, evidence)
        compared = self.compared(question)
        if compared is not None:
            return self._compare(*compared, evidence)
        target = target_from_question(question)
        if target is None or not asks_for_box(question):
            return None
        want = normalise_target(target)
        for e in successful(evidence, self.name):
            out = e.output or {}
            names = {
                normalise_target(str(out.get("target", ""))),
                str(out.get("label", "")).lower(),
            }
            if want not in names or not e.regions:
                continue
            box = box_text(e.regions[0].box_xyxy)
            confidence = float(out.get("confidence", 0.0))
            claim = Claim(
                text=(
                    f"medloupe-mini's grounder boxed the {str(out.get('label')).lower()} at "
                    f"{box} (XYXY pixels); calibrated chance that the box overlaps the truth "
                    f"with IoU >= 0.5: {confidence:.2f}."
                ),
                evidence_ids=[e.id],
            )
            return Statement(
                parts=(f"{out.get('label')}: {box}",),
                claims=(claim,),
                regions=tuple(e.regions),
                confidence=confidence,
            )
        return None

    def _relative(
        self, relation: tuple[str, Relation, str], evidence: list[Evidence]
    ) -> Statement | None:
        """Yes or no from the centres of the two targets' best boxes, in the image as shown
        (no atlas: a rotated or flipped slice is read as displayed). ``None`` unless each
        side names exactly one trained target and both were found."""
        a, rel, b = relation
        labels = self.grounder.labels
        found: list[tuple[str, Evidence]] = []
        for phrase in (a, b):
            named = named_targets(phrase, labels)
            if len(named) != 1:
                return None
            hit = self._found(named[0], evidence)
            if hit is None:
                return None
            found.append((named[0], hit))
        (la, ea), (lb, eb) = found
        (ax, ay), (bx, by) = centre(ea.regions[0].box_xyxy), centre(eb.regions[0].box_xyxy)
        yes = holds(rel, (ax, ay), (bx, by))
        both, confidence = _read_from_boxes([ea, eb], 2)
        where = relation_words(rel)
        claim = Claim(
            text=(
                f"In the image as shown, the centre of the {la.lower()}'s box "
                f"({ax:.0f}, {ay:.0f}) is {'' if yes else 'not '}{where} the centre of the "
                f"{lb.lower()}'s box ({bx:.0f}, {by:.0f}) (medloupe-mini's grounder; both boxes "
                f"right with calibrated chance {both:.2f})."
            ),
            evidence_ids=[ea.id, eb.id],
        )
        return Statement(
            parts=("yes" if yes else "no",),
            claims=(claim,),
            regions=(ea.regions[0], eb.regions[0]),
            confidence=confidence,
        )

    def _found(self, label: str, evidence: list[Evidence]) -> Evidence | None:
        """The first successful call of this tool that boxed ``label``."""
        return next(
            (
                e
                for e in successful(evidence, self.name)
                if str((e.output or {}).get("label")) == label and e.regions
            ),
            None,
        )

    def _compare(
        self, extreme: Extreme, options: list[tuple[str, list[str]]], evidence: list[Evidence]
    ) -> Statement | None:
        """The option (:meth:`compared`) whose boxes cover the most (or least) of the image,
        as the question names it; a sided organ named bare ("lung") adds both sides' boxes.
        ``None`` unless every option's targets were grounded."""
        used: list[Evidence] = []
        areas: list[tuple[str, float]] = []
        for option, labels in options:
            area = 0.0
            for label in labels:
                hit = self._found(label, evidence)
                if hit is None:
                    return None
                x0, y0, x1, y1 = hit.regions[0].box_xyxy
                area += (x1 - x0) * (y1 - y0)
                used.append(hit)
            areas.append((option, area))
        pick = (max if extreme == "largest" else min)(areas, key=lambda a: a[1])[0]
        right, confidence = _read_from_boxes(used, len(areas))
        sizes = ", ".join(f"the {o} {a:,.0f}" for o, a in areas)
        claim = Claim(
            text=(
                f"In this image the boxes of medloupe-mini's grounder cover {sizes} pixels "
                f"(both sides added for an organ named without one): the {pick} is the "
                f"{extreme}. Every box right with calibrated chance {right:.2f}."
            ),
            evidence_ids=list(dict.fromkeys(e.id for e in used)),
        )
        return Statement(
            parts=(pick,),
            claims=(claim,),
            regions=tuple(e.regions[0] for e in used),
            confidence=confidence,
        )

    def run(self, args: BaseModel, ctx: ToolContext) -> GroundResult:
        a: Any = args
        rgb = ctx.rgb()
        modality = a.modality or modality_key(ctx.image.modality)
        estimated = None
        if modality is None:
            modality, estimated = self._read_once(ctx.image.display_artifact, rgb)
        try:
            found = self.grounder.ground(
                rgb, a.target, modality, a.max_boxes, refine=ctx.second_look
            )
        except UnknownTarget as exc:
            raise ValueError(str(exc)) from None
        boxes = [ScoredBox(box_xyxy=b, score=min(1.0, s)) for b, s in found.boxes]
        return GroundResult(
            target=a.target,
            label=found.label,
            modality=found.modality,
            boxes=boxes,
            confidence=found.confidence,
            method="medloupe-mini grounder (heatmap head on EfficientNet-Lite0 features"
            + ("; first box refined by a zoomed second pass)" if found.refined else ")"),
            orientation=(
                f"{ORIENTATIONS[found.orientation]} (p {found.orientation_probability:.2f})"
                if found.orientation
                else None
            ),
            modality_estimated=estimated if modality is not None else None,
            regions=[
                Region(id="pending", box_xyxy=b.box_xyxy, label=f"{found.label} {i + 1}")
                for i, b in enumerate(boxes)
            ],
        )
