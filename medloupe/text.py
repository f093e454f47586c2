"""Text shared by the graph, the tools, evaluation and medloupe-mini: answer normalisation
(what counts as the same short answer) and the parsing of questions that assert what kind of
image this is ("Is this a CT scan?" claims ``{"modality": "CT"}``)."""

from __future__ import annotations

import re
import string

YES = {"yes", "y", "true", "present", "positive", "correct", "yeah", "yep", "affirmative"}
NO = {"no", "n", "false", "absent", "negative", "incorrect", "nope", "none", "not present"}
NUMBERS = {
    "zero": 0,
    "none": 0,
    "one": 1,
    "single": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation if c not in ".-"})


def normalise(text: str) -> str:
    """Lowercase, punctuation (but decimal points) removed, articles dropped, spaces folded."""
    t = text.lower().translate(_PUNCT)
    t = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", t)
    t = t.replace("-", " ")
    return " ".join(w for w in t.split() if w not in _ARTICLES)


def tokens(text: str) -> list[str]:
    return normalise(text).split()


def canonical(text: str) -> str:
    """The canonical form of a short answer: ``yes``/``no``, a number, ``left``/``right``, or
    the normalised text."""
    t = normalise(text)
    if t in YES:
        return "yes"
    if t in NO:
        return "no"
    n = first_number(t)
    if n is not None and len(t.split()) <= 3:
        return str(n)
    words = set(t.replace("sided", "").split())
    sides = words & {"left", "right"}
    if len(sides) == 1 and len(words) <= 3:
        return sides.pop()
    return t


def first_number(text: str) -> float | int | None:
    """The first number in ``text`` (digits or a number word), or ``None``."""
    for word in normalise(text).split():
        if re.fullmatch(r"\d+", word):
            return int(word)
        if re.fullmatch(r"\d*\.\d+", word):
            return float(word)
        if word in NUMBERS:
            return NUMBERS[word]
    return None


def is_closed(answer_type: object) -> bool:
    """Whether a dataset's ``answer_type`` marks a closed question (case and surrounding
    space ignored: VQA-RAD has ``'CLOSED '``)."""
    return str(answer_type or "").strip().lower() == "closed"


def _set(alternatives: str) -> frozenset[str]:
    return frozenset(alternatives.split("|"))


# phrase -> (attribute, value) that questions claim
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
