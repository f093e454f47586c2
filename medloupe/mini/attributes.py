"""Yes/no questions that assert what kind of image this is, answered by asking the open question.

"Is this a CT scan?", "Is this an axial image?", "Is this a study of the chest?", "Is this a
T2 weighted MRI?" each claim a value of an image *attribute* (modality, scanning plane, MR
weighting, body region). The yes/no experts (:mod:`medloupe.mini.yesno`) see such questions
rarely and in many phrasings, while the answerer's head is asked the open form ("What modality
is used to take this image?") hundreds of times in training and answers it almost always
correctly. So a question that is nothing but such claims is answered by asking the head each
attribute's open question and reading the probability of the claimed value:

``P(yes) = prod over claims of P(value) / P(any value of that attribute)``

(the head's temperature-scaled probabilities, summed over the trained answers that mean each
value). Out of fold (5 folds by training image) this answered 294 such training questions
0.98 correctly (SLAKE 0.984 of 256, VQA-RAD 0.974 of 38) against 0.68 for the gated experts
(``benchmarks/bench_mini_attributes.py``).

A question qualifies only when every word after its subject is an attribute value or a
filler word ("Is this image taken in the axial plane?"); any other word ("Is this CT scan
enhanced by IV contrast?", "Is this a PA film?") leaves it to the experts. Presence of an
organ ("Does the picture contain lung?") is not a body-region claim and is never read as one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

# the open question asked of the head for each attribute (the training splits' own phrasing)
PROBES: dict[str, str] = {
    "modality": "What modality is used to take this image?",
    "plane": "What is the scanning plane of this image?",
    "weighting": "What is the mr weighting in this image?",
    "region": "Which part of the body does this image belong to?",
}


def _set(alternatives: str) -> frozenset[str]:
    return frozenset(alternatives.split("|"))


# attribute -> value -> the trained answers (canonical) that mean it
ANSWERS: dict[str, dict[str, frozenset[str]]] = {
    "modality": {
        "CT": _set("ct"),
        "MRI": _set("mri|dwi|flair|mr flair|mri flair|mr t2 weighted|t1|t2|t2 weighted"),
        "X-ray": _set("x ray|chest x ray|pa xray"),
    },
    "plane": {
        "axial": _set("axial|transverse plane"),
        "coronal": _set("coronal|coronal plane"),
        "sagittal": _set("sagittal|sagittal plane"),
    },
    "weighting": {"T1": _set("t1"), "T2": _set("t2|t2 weighted|mr t2 weighted")},
    "region": {
        "head": _set("head|brain"),
        "chest": _set("chest"),
        "abdomen": _set("abdomen|abdomen and pelvis"),
        "pelvis": _set("pelvic cavity|abdomen and pelvis"),
        "neck": _set("neck"),
    },
}
# attribute -> every answer that means one of its values
_ALL = {attr: frozenset().union(*values.values()) for attr, values in ANSWERS.items()}


@dataclass(frozen=True)
class AttributeAnswer:
    """P(yes) for a question's claims and what it rests on (for the trace)."""

    p_yes: float
    basis: str


def answer_claims(
    claims: Mapping[str, str],
    probabilities: Callable[[str], np.ndarray],
    vocab: list[str],
) -> AttributeAnswer | None:
    """P(yes) for ``claims`` (from :func:`attribute_claims`).

    Args:
        claims: attribute -> claimed value.
        probabilities: attribute -> the head's probabilities ``(len(vocab),)`` for that
            attribute's :data:`PROBES` question about the image.
        vocab: the head's answers.

    Returns:
        The product over claims of each value's share of its attribute's answers, or ``None``
        when the head knows no answer for a claimed value or gives its attribute no mass (the
        question is then left to the yes/no experts).
    """
    index = {a: i for i, a in enumerate(vocab)}
    p_yes = 1.0
    said = []
    for attribute, value in claims.items():
        if not any(a in index for a in ANSWERS[attribute][value]):
            return None
        shares = value_shares(attribute, probabilities(attribute), index)
        if shares is None:
            return None
        best = max(shares, key=lambda v: shares[v])
        p_yes *= shares[value]
        said.append(f"{attribute} {best} ({shares[best]:.2f}), claimed {value}")
    return AttributeAnswer(p_yes, "asked the open question: " + "; ".join(said))


def value_shares(
    attribute: str, probs: np.ndarray, index: Mapping[str, int]
) -> dict[str, float] | None:
    """Each value of ``attribute``'s share of the head's probability ``probs`` (over the
    answers ``index`` maps to positions) given to any of its values; ``None`` when it gives
    them none."""
    mass = {
        v: float(sum(probs[index[a]] for a in answers if a in index))
        for v, answers in ANSWERS[attribute].items()
    }
    total = float(sum(probs[index[a]] for a in _ALL[attribute] if a in index))
    if total <= 0.0:
        return None
    return {v: m / total for v, m in mass.items()}
