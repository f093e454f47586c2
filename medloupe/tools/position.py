"""Relative-position questions ("Is the aorta to the left of the spleen?"), read one way for
every tool that answers them: the two things compared, the relation in the image as shown
(``left``, ``right``, ``above``, ``below``), and the test on two centres.

Left and right are the image's as displayed, never the patient's: benchmarks such as MIRP
rotate and flip slices, and an answer read from an atlas would be wrong on every one of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Relation = Literal["left", "right", "above", "below"]

_REL = (
    r"(?:to|on) the (?:left|right)(?: side)? of|(?:left|right) of|above|below|over|"
    r"under(?:neath)?|beneath|higher than|lower than"
)
_SPLIT = re.compile(
    rf"^\s*(?:is|are) (?P<a>.+?) (?:(?:located|positioned|situated|seen) )?(?P<rel>{_REL}) "
    r"(?P<b>.+?)\s*(?:[?.,;]|\b(?:in|on) (?:this|the)\b|$)",
    re.I,
)
_RELATIONS: dict[str, Relation] = {  # the relation's word -> the relation as shown
    "left": "left",
    "right": "right",
    **dict.fromkeys(("above", "over", "higher"), "above"),
    **dict.fromkeys(("below", "under", "underneath", "beneath", "lower"), "below"),
}
_NAMED_SIDE = re.compile(r"^(?:the )?(?P<t>[a-z][a-z -]*?)$", re.I)
_OF_THE_IMAGE = re.compile(r"\b(image|picture|scan|body|slice)\b", re.I)


def split_relation(question: str) -> tuple[str, Relation, str] | None:
    """``(a, relation, b)`` of any relative-position question, its two sides as written:
    "Is the aorta (red) above the spleen (blue)?" -> ``("the aorta (red)", "above",
    "the spleen (blue)")``; ``None`` for other questions and for a side of the image itself
    ("Is the liver on the left of the image?")."""
    m = _SPLIT.search(question.strip())
    if not m or _OF_THE_IMAGE.search(m.group("b")):
        return None
    word = next(w for w in re.findall(r"[a-z]+", m.group("rel").lower()) if w in _RELATIONS)
    return m.group("a").strip(), _RELATIONS[word], m.group("b").strip().rstrip(",")


def relation_from_question(question: str) -> tuple[str, Relation, str] | None:
    """``(a, relation, b)`` of a relative-position question between two things named in
    words: "Is the aorta to the left of the spleen?" -> ``("aorta", "left", "spleen")``;
    ``None`` for other questions and where a side is not plain words (a marker: "the red
    dot", "the aorta (BZ)")."""
    split = split_relation(question)
    if split is None:
        return None
    a, rel, b = split
    ma, mb = _NAMED_SIDE.match(a), _NAMED_SIDE.match(b)
    if not ma or not mb:
        return None
    return ma.group("t").strip(), rel, mb.group("t").strip()


def centre(box: Sequence[float]) -> tuple[float, float]:
    """The centre ``(x, y)`` of an XYXY box, in its pixels."""
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def holds(relation: Relation, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether centre ``a`` is ``relation`` of centre ``b`` (pixels, ``y`` down)."""
    return {
        "left": a[0] < b[0],
        "right": a[0] > b[0],
        "above": a[1] < b[1],
        "below": a[1] > b[1],
    }[relation]


def relation_words(relation: Relation) -> str:
    """``"to the left of"``, ``"to the right of"``, ``"above"``, ``"below"``."""
    return f"to the {relation} of" if relation in ("left", "right") else relation
