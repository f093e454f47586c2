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

from medloupe.evaluation.scoring import normalise

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
_PHRASES: dict[tuple[str, ...], tuple[str, str]] = {}
for _attribute, _value, _words in (
    ("modality", "CT", "ct|cat scan|ct scan|computed tomography|computed tomography scan"),
    ("modality", "MRI", "mri|mr|magnetic resonance|magnetic resonance imaging|mri scan|mr scan"),
    (
        "modality",
        "X-ray",
        "x ray|xray|radiograph|plain film|plain radiograph|cxr|plain film x ray|"
        "plain film xray|x ray film",
    ),
    ("plane", "axial", "axial|transverse|transaxial"),
    ("plane", "coronal", "coronal"),
    ("plane", "sagittal", "sagittal|saggital|sagital|mid sagittal|midsagittal|mid saggital"),
    ("weighting", "T1", "t1|t1 weighted|t1w"),
    ("weighting", "T2", "t2|t2 weighted|t2w"),
    ("region", "head", "brain|head|skull|cranium"),
    ("region", "chest", "chest|thorax|thoracic|lungs|lung|chest cavity"),
    ("region", "abdomen", "abdomen|abdominal|abdominal cavity"),
    ("region", "pelvis", "pelvis|pelvic|pelvic cavity"),
    ("region", "neck", "neck"),
):
    for _phrase in _words.split("|"):
        _PHRASES[tuple(_phrase.split())] = (_attribute, _value)
_LONGEST = max(len(k) for k in _PHRASES)
# what the question is about, after "is"/"was"/"does" (articles are already dropped)
_SUBJECTS = sorted(
    (
        tuple(subject.split())
        for subject in _set(
            "this|image|this image|picture|this picture|film|this film|scan|this scan|study|"
            "this study|image above|above image|this radiograph"
        )
    ),
    key=len,
    reverse=True,
)
_FILLER = _set(
    "of|in|with|by|via|using|on|as|from|through|at|taken|obtained|done|acquired|performed|"
    "shown|oriented|captured|made|imaged|image|images|scan|film|picture|study|slice|"
    "section|view|cut|plane|exam|examination|type|kind"
)
_SHOW = _set("show|shows|depict|display|demonstrate|visualize|visualise")
# organs that name a region but also show outside it (lung bases on abdominal slices)
_ORGANS = frozenset({("lung",), ("lungs",)})


def attribute_claims(question: str) -> dict[str, str] | None:
    """The attribute values a yes/no question asserts, e.g. ``{"modality": "CT"}`` for "Is
    this a CT scan?" or ``{"region": "chest", "modality": "X-ray"}`` for "Is this a chest
    x-ray?"; ``None`` when the question asks anything else (or claims two values of one
    attribute)."""
    words = normalise(question).split()
    if not words or words[0] not in ("is", "was", "does", "do"):
        return None
    rest = words[1:]
    for subject in _SUBJECTS:
        if tuple(rest[: len(subject)]) == subject:
            rest = rest[len(subject) :]
            break
    else:
        return None
    shows = words[0] in ("does", "do")
    if shows:  # "Does this image show the brain?"
        while rest and rest[0] in ("image", "picture", "scan", "film", "study"):
            rest = rest[1:]
        if not rest or rest[0] not in _SHOW:
            return None
        rest = rest[1:]
    found: dict[str, str] = {}
    i = 0
    while i < len(rest):
        for n in range(min(_LONGEST, len(rest) - i), 0, -1):
            hit = _PHRASES.get(tuple(rest[i : i + n]))
            if hit is None:
                continue
            attribute, value = hit
            if shows and (attribute != "region" or tuple(rest[i : i + n]) in _ORGANS):
                return None  # "does it show the lungs" asks about an organ, not the region
            if found.get(attribute, value) != value:
                return None
            found[attribute] = value
            i += n
            break
        else:
            if rest[i] not in _FILLER:
                return None
            i += 1
    return found or None


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
        probs = probabilities(attribute)
        mass = {
            v: float(sum(probs[index[a]] for a in answers if a in index))
            for v, answers in ANSWERS[attribute].items()
        }
        total = float(sum(probs[index[a]] for a in _ALL[attribute] if a in index))
        if total <= 0.0:
            return None
        share = mass[value] / total
        best = max(mass, key=lambda v: mass[v])
        p_yes *= share
        said.append(f"{attribute} {best} ({mass[best] / total:.2f}), claimed {value}")
    return AttributeAnswer(p_yes, "asked the open question: " + "; ".join(said))
