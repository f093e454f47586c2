"""Scoring one answer against one item's ground truth.

- closed: normalised exact match, with yes/no synonyms (present/absent, true/false...),
  number words ("just one" = 1) and sides ("left-sided" = left) folded; a prediction that
  starts with or contains exactly one canonical form ("Yes, there is..." = yes) counts.
- open: normalised exact match, and token recall (share of the truth's words in the answer).
- box (grounding): IoU of the answer's first region with the best ground-truth box; a hit at
  IoU >= 0.5; a pointing hit when the region's centre lies in a ground-truth box.
- count: the first number in the answer; exact match and absolute error.

An abstention scores as not correct (and is counted apart); accuracy "on answered items"
leaves abstentions out.
"""

from __future__ import annotations

from pydantic import BaseModel

from medloupe.evaluation.data import EvalItem
from medloupe.schemas import GroundedAnswer
from medloupe.text import NO, YES, canonical, first_number, normalise, tokens


def closed_match(prediction: str, truth: str) -> bool:
    """Whether a closed answer matches (see the module docstring)."""
    want = canonical(truth)
    got = canonical(prediction)
    if got == want:
        return True
    words = normalise(prediction).split()
    if not words:
        return False
    if want in ("yes", "no"):
        first = words[0]
        if first in YES:
            return want == "yes"
        if first in NO:
            return want == "no"
        return False
    if want.isdigit():
        n = first_number(prediction)
        return n is not None and str(n) == want
    if want in ("left", "right"):
        sides = {w for w in words if w in ("left", "right")}
        return sides == {want}
    return False


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class ItemScore(BaseModel):
    """How one answer scored. ``correct`` is the item's pass/fail under its task's rule."""

    correct: bool
    abstained: bool
    exact: bool | None = None
    token_recall: float | None = None
    iou: float | None = None
    pointing_hit: bool | None = None
    count_error: float | None = None
    predicted_box: tuple[float, float, float, float] | None = None


def score(item: EvalItem, answer: GroundedAnswer | None) -> ItemScore:
    """Score ``answer`` (``None``: the run failed) against ``item``."""
    if (
        answer is None
        or answer.abstained
        or (answer.short_answer is None and item.answer_type != "box")
    ):
        return ItemScore(correct=False, abstained=answer is not None)
    text = answer.short_answer or ""
    if item.answer_type == "box" or item.task == "grounding":
        if not answer.regions or not item.boxes_xyxy:
            return ItemScore(correct=False, abstained=False, iou=0.0, pointing_hit=False)
        box = answer.regions[0].box_xyxy
        best = max(iou(box, truth) for truth in item.boxes_xyxy)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        pointing = any(t[0] <= cx <= t[2] and t[1] <= cy <= t[3] for t in item.boxes_xyxy)
        return ItemScore(
            correct=best >= 0.5,
            abstained=False,
            iou=best,
            pointing_hit=pointing,
            predicted_box=box,
        )
    if item.task == "count":
        n = first_number(text)
        want = first_number(item.answer)
        err = abs(n - want) if n is not None and want is not None else None
        return ItemScore(correct=err == 0, abstained=False, exact=err == 0, count_error=err)
    if item.answer_type == "closed":
        ok = closed_match(text, item.answer)
        return ItemScore(correct=ok, abstained=False, exact=ok)
    truth = tokens(item.answer)
    got = set(tokens(text))
    recall = sum(1 for t in truth if t in got) / len(truth) if truth else 0.0
    exact = normalise(text) == normalise(item.answer)
    return ItemScore(correct=exact, abstained=False, exact=exact, token_recall=recall)
