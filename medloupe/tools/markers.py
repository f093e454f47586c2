"""``find_markers``: where the coloured dots and the letter or number labels a question names
sit on the image, and the relative-position answer read from them.

Benchmarks of spatial reasoning (MIRP's marker questions: "Is the aorta (red) above the
spleen (blue)?", "Are the letters BZ to the left of the letters AA?", "Is the number 45 to the
right of the number 40?") and readers' annotations mark structures with such markers. A
coloured dot is a connected blob of saturated pixels of its hue on an otherwise grey image; a
label is a line of burned-in text that OCR (RapidOCR) reads as exactly that label.

Only what the question itself names is looked for and reported: a label is echoed only when
OCR read exactly the characters the question gave, so no other burned-in text (a name, a
date) can reach an answer, a trace or a prompt through this tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from medloupe.io.records import ImageRecord
from medloupe.schemas import Box, Claim, Evidence, Region
from medloupe.tools.base import (
    Availability,
    Statement,
    Tool,
    ToolContext,
    ToolResult,
    successful,
)
from medloupe.tools.ocr import OcrEngine, TextLine
from medloupe.tools.position import Relation, centre, holds, relation_words, split_relation

#: hue ranges in degrees (``lo <= h < hi``; red wraps around 0)
HUES: dict[str, tuple[tuple[float, float], ...]] = {
    "red": ((0.0, 15.0), (340.0, 360.0)),
    "orange": ((15.0, 40.0),),
    "yellow": ((40.0, 70.0),),
    "green": ((70.0, 165.0),),
    "cyan": ((165.0, 200.0),),
    "blue": ((200.0, 255.0),),
    "purple": ((255.0, 290.0),),
    "magenta": ((290.0, 340.0),),
    "pink": ((290.0, 340.0),),
}
MIN_SATURATION = 0.5  # (max - min) / max of the RGB values
MIN_VALUE = 0.3  # max of the RGB values, of 1
MIN_DOT_PIXELS = 6
MAX_LABEL_CHARS = 6
MIN_OCR_SCORE = 0.5
ZOOM = 2  # a label OCR misses is looked for again in the image enlarged this many times
MAX_ZOOM_SIDE = 1024  # ... when the image is at most this large
MARKER_CONFIDENCE = 0.95  # both found, each once: the comparison is exact (the composer caps here)
AMBIGUOUS_CONFIDENCE = 0.6  # a marker seen more than once: the largest blob or best line

_COLOUR = "|".join(HUES)
_SIDE_MARKERS = (
    re.compile(rf"\((?P<colour>{_COLOUR})\)", re.I),  # "the aorta (red)"
    re.compile(rf"\b(?P<colour>{_COLOUR})\s+(?:dot|marker|point|spot|circle)s?\b", re.I),
    re.compile(rf"\bletters?\s+(?P<label>[A-Za-z]{{1,{MAX_LABEL_CHARS}}})\b"),  # "letters BZ"
    re.compile(rf"\bnumbers?\s+(?P<label>\d{{1,{MAX_LABEL_CHARS}}})\b", re.I),  # "number 45"
    re.compile(rf"\((?P<label>[A-Za-z0-9]{{1,{MAX_LABEL_CHARS}}})\)"),  # "the spleen (1)"
)


@dataclass(frozen=True)
class Marker:
    """A marker a question names: a dot's colour or a label's characters."""

    kind: Literal["colour", "label"]
    value: str

    @property
    def name(self) -> str:
        return f"the {self.value} dot" if self.kind == "colour" else f"the label {self.value}"


def marker_in(side: str) -> Marker | None:
    """The marker one side of a relative-position question names ("the aorta (red)" -> the
    red dot; "the letters BZ" -> the label ``BZ``; "the number 45" -> ``45``), or ``None``."""
    for pattern in _SIDE_MARKERS:
        m = pattern.search(side)
        if m:
            if m.groupdict().get("colour"):
                return Marker("colour", m.group("colour").lower())
            return Marker("label", m.group("label").upper())
    return None


def marker_relation(question: str) -> tuple[Marker, Relation, Marker] | None:
    """``(marker a, relation, marker b)`` of a relative-position question whose two sides
    each name a marker, the relation one of ``left``, ``right``, ``above``, ``below`` in the
    image as shown; ``None`` otherwise."""
    split = split_relation(question)
    if split is None:
        return None
    a, rel, b = split
    ma, mb = marker_in(a), marker_in(b)
    if ma is None or mb is None or ma == mb:
        return None
    return ma, rel, mb


def hue_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees, ``[0, 360)``), saturation and value (``[0, 1]``) of ``(H, W, 3)`` uint8
    RGB, each ``(H, W)`` float32."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(axis=2), x.min(axis=2)
    d = mx - mn
    safe = np.where(d > 0, d, 1.0)
    hue = np.where(
        mx == r,
        ((g - b) / safe) % 6.0,
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(d > 0, hue * 60.0, 0.0)
    sat = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    return hue.astype(np.float32), sat.astype(np.float32), mx.astype(np.float32)


def find_dots(
    rgb: np.ndarray,
    colour: str,
    *,
    hsv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[tuple[Box, int]]:
    """Blobs of ``colour`` (a :data:`HUES` name) in ``(H, W, 3)`` uint8 RGB: ``(XYXY pixel box,
    pixel count)``, largest first, each of at least :data:`MIN_DOT_PIXELS` pixels. ``hsv``:
    :func:`hue_saturation_value` of ``rgb`` when already computed (several colours, one image)."""
    from scipy import ndimage as ndi

    hue, sat, val = hsv if hsv is not None else hue_saturation_value(rgb)
    mask = np.zeros(hue.shape, bool)
    for lo, hi in HUES[colour]:
        mask |= (hue >= lo) & (hue < hi)
    mask &= (sat >= MIN_SATURATION) & (val >= MIN_VALUE)
    labels, n = ndi.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    out: list[tuple[Box, int]] = []
    for k, sl in enumerate(ndi.find_objects(labels)):
        if sl is None or sizes[k] < MIN_DOT_PIXELS:
            continue
        ys, xs = sl
        out.append(
            ((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)), int(sizes[k]))
        )
    out.sort(key=lambda t: -t[1])
    return out


_AS_LETTER = str.maketrans("0125864", "OIZSBGA")  # OCR's usual confusions, each way
_AS_DIGIT = str.maketrans("OQDILZSBG", "001112586")


def _compact(text: str, like: str) -> str:
    """``text`` upper-cased, letters and digits only, with OCR's look-alike characters read
    as the kind ``like`` is (all digits: ``O`` -> ``0``, ``l`` -> ``1``; all letters: ``0`` ->
    ``O``, ``1`` or ``l`` -> ``I``)."""
    if like.isdigit() or like.isalpha():  # a lower-case l or a bar is OCR's I or 1
        text = text.replace("l", "1" if like.isdigit() else "I").replace("|", "I")
    out = re.sub(r"[^A-Za-z0-9]", "", text).upper()
    if like.isdigit():
        return out.translate(_AS_DIGIT)
    return out.translate(_AS_LETTER) if like.isalpha() else out


def find_labels(lines: list[TextLine], label: str) -> list[tuple[Box, float]]:
    """The boxes (XYXY pixels) of ``label`` among OCR ``lines``: a line that reads exactly
    ``label``, or a word of a line that does (its box the word's share of the line's width);
    best score first."""
    want = _compact(label, label)
    out: list[tuple[Box, float]] = []
    for line in lines:
        text = str(line.text)
        x0, y0, x1, y1 = line.box_xyxy
        if _compact(text, label) == want:
            out.append(((x0, y0, x1, y1), float(line.score)))
            continue
        chars = len(text)
        for m in re.finditer(r"\S+", text):
            if chars and _compact(m.group(), label) == want:
                w = (x1 - x0) / chars
                out.append(((x0 + m.start() * w, y0, x0 + m.end() * w, y1), float(line.score)))
    out.sort(key=lambda t: -t[1])
    return _distinct(out)


def _distinct(hits: list[tuple[Box, float]]) -> list[tuple[Box, float]]:
    """``hits`` without the ones overlapping a better one (the same label read twice)."""
    kept: list[tuple[Box, float]] = []
    for box, score in hits:
        cx, cy = centre(box)
        if not any(k[0] <= cx <= k[2] and k[1] <= cy <= k[3] for k, _ in kept):
            kept.append((box, score))
    return kept


def read_lines(engine: OcrEngine, rgb: np.ndarray, *, zoomed: bool) -> list[TextLine]:
    """OCR lines of ``rgb`` (``(H, W, 3)`` uint8 RGB), or with ``zoomed`` of the image
    enlarged :data:`ZOOM` times (small labels a detector misses at 1x), boxes in the image's
    own pixels."""
    if not zoomed:
        return engine.read(rgb, min_score=MIN_OCR_SCORE)
    from PIL import Image

    h, w = rgb.shape[:2]
    big = np.asarray(Image.fromarray(rgb).resize((w * ZOOM, h * ZOOM), Image.Resampling.LANCZOS))
    out = []
    for line in engine.read(big, min_score=MIN_OCR_SCORE):
        x0, y0, x1, y1 = line.box_xyxy
        out.append(TextLine(line.text, line.score, (x0 / ZOOM, y0 / ZOOM, x1 / ZOOM, y1 / ZOOM)))
    return out


def locate_markers(
    rgb: np.ndarray, wanted: list[Marker], engine: OcrEngine
) -> dict[Marker, list[tuple[Box, float]]]:
    """Where each marker of ``wanted`` is in ``rgb`` (``(H, W, 3)`` uint8 RGB): its matches
    (XYXY pixel box, score: a dot's pixel count, a label's OCR score), best first; labels
    OCR misses at 1x are looked for again :data:`ZOOM` times enlarged.

    Raises:
        medloupe.errors.ToolUnavailableError: a label is asked for and OCR is not installed
            (:meth:`OcrEngine.read` says what to install).
    """
    colours = [m for m in wanted if m.kind == "colour"]
    hsv = hue_saturation_value(rgb) if colours else None
    hits_of: dict[Marker, list[tuple[Box, float]]] = {
        m: [(b, float(n)) for b, n in find_dots(rgb, m.value, hsv=hsv)] for m in colours
    }
    labels = [m for m in wanted if m.kind == "label"]
    if labels:
        lines = read_lines(engine, rgb, zoomed=False)
        hits_of.update({m: find_labels(lines, m.value) for m in labels})
        if any(not hits_of[m] for m in labels) and max(rgb.shape[:2]) <= MAX_ZOOM_SIDE:
            lines += read_lines(engine, rgb, zoomed=True)
            hits_of.update({m: find_labels(lines, m.value) for m in labels})
    return hits_of


class FindMarkersArgs(BaseModel):
    model_config = {"extra": "forbid"}

    markers: list[str] = Field(
        min_length=1,
        max_length=6,
        description=f"what to find: dot colours ({', '.join(HUES)}) or labels of at most "
        f"{MAX_LABEL_CHARS} letters or digits written on the image (e.g. ['red', 'blue'], "
        "['BZ', 'AA'], ['45', '40'])",
    )


class FoundMarker(BaseModel):
    marker: str = Field(description="the marker as asked: a colour or a label")
    kind: Literal["colour", "label"]
    box_xyxy: Box | None = Field(description="XYXY pixels of the best match; null: not found")
    matches: int = Field(ge=0, description="how many places matched (1: unambiguous)")


class FindMarkersResult(ToolResult):
    markers: list[FoundMarker]

    def summary(self) -> str:
        parts = []
        for m in self.markers:
            if m.box_xyxy is None:
                parts.append(f"{m.marker}: not found")
            else:
                x, y = centre(m.box_xyxy)
                more = f" ({m.matches} matches, the best)" if m.matches > 1 else ""
                parts.append(f"{m.marker}: centre ({x:.0f}, {y:.0f}){more}")
        return "; ".join(parts)


def _as_marker(text: str) -> Marker:
    word = text.strip()
    if word.lower() in HUES:
        return Marker("colour", word.lower())
    if not re.fullmatch(rf"[A-Za-z0-9]{{1,{MAX_LABEL_CHARS}}}", word):
        raise ValueError(
            f"marker {text!r} is neither a dot colour ({', '.join(HUES)}) nor a label of at "
            f"most {MAX_LABEL_CHARS} letters or digits"
        )
    return Marker("label", word.upper())


class FindMarkersTool(Tool):
    """Coloured dots (by hue) and letter or number labels (by OCR) the question names."""

    name = "find_markers"
    description = (
        "Find the coloured dots and the letter or number labels drawn on the image that the "
        "question names (e.g. the red and blue dots, the labels BZ and AA) and return each "
        "one's box: the markers of a relative-position question."
    )
    input_model = FindMarkersArgs
    output_model = FindMarkersResult
    timeout_s = 120.0

    def __init__(self, engine: OcrEngine | None = None) -> None:
        self.engine = engine or OcrEngine()

    def available(self) -> Availability:
        ocr = self.engine.installed()
        if ocr.ok:
            return Availability(True, "ready (dots by hue; labels by RapidOCR)")
        return Availability(True, f"dots only: labels need OCR ({ocr.reason})")

    def suggest(self, question: str, image: ImageRecord) -> dict[str, Any] | None:
        """Find both markers of a relative-position question that names markers."""
        relation = marker_relation(question)
        if relation is None:
            return None
        a, _, b = relation
        return {"markers": [a.value, b.value]}

    def targets(self, question: str) -> list[str]:
        """The two markers of a marker question, named as their regions are ("the red dot",
        "the label BZ"): the second look zooms there."""
        relation = marker_relation(question)
        return [] if relation is None else [relation[0].name, relation[2].name]

    def run(self, args: BaseModel, ctx: ToolContext) -> FindMarkersResult:
        a: Any = args
        wanted = [_as_marker(m) for m in a.markers]
        rgb = ctx.rgb()
        found: list[FoundMarker] = []
        regions: list[Region] = []
        hits_of = locate_markers(rgb, wanted, self.engine)
        for marker in wanted:
            hits = hits_of[marker]
            box = hits[0][0] if hits else None
            found.append(
                FoundMarker(marker=marker.value, kind=marker.kind, box_xyxy=box, matches=len(hits))
            )
            if box is not None:
                regions.append(Region(id="pending", box_xyxy=box, label=marker.name))
        return FindMarkersResult(markers=found, regions=regions)

    def states(self, question: str, evidence: list[Evidence]) -> Statement | None:
        """Yes or no from the centres of the question's two markers, in the image as shown;
        ``None`` unless both were found."""
        relation = marker_relation(question)
        if relation is None:
            return None
        a, rel, b = relation
        for e in reversed(successful(evidence, self.name)):
            got = {  # run() reports each marker as parsed: colours lower, labels upper case
                (m.get("kind"), m.get("marker")): m
                for m in (e.output or {}).get("markers", [])
                if m.get("box_xyxy") is not None
            }
            ma, mb = got.get((a.kind, a.value)), got.get((b.kind, b.value))
            if ma is None or mb is None:
                continue
            ca, cb = centre(ma["box_xyxy"]), centre(mb["box_xyxy"])
            yes = holds(rel, ca, cb)
            unique = ma.get("matches") == 1 and mb.get("matches") == 1
            claim = Claim(
                text=(
                    f"In the image as shown, {a.name} (centre ({ca[0]:.0f}, {ca[1]:.0f})) is "
                    f"{'' if yes else 'not '}{relation_words(rel)} {b.name} (centre "
                    f"({cb[0]:.0f}, {cb[1]:.0f}))"
                    + ("." if unique else "; a marker matched more than once: the best was used.")
                ),
                evidence_ids=[e.id],
            )
            by_name = {r.label: r for r in e.regions}
            regions = tuple(r for r in (by_name.get(a.name), by_name.get(b.name)) if r)
            return Statement(
                parts=("yes" if yes else "no",),
                claims=(claim,),
                regions=regions,
                confidence=MARKER_CONFIDENCE if unique else AMBIGUOUS_CONFIDENCE,
            )
        return None
