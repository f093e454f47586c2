"""Size comparisons ("Which is bigger in this image, liver or spleen?", "Which is the smallest,
rectum, small bowel or bladder?"), read one way for every tool that answers them: which end
is asked for and the options as the question writes them.

Sizes are compared as the structures appear in this image (their extent in this slice or
projection), which is what such questions ask: "Which is bigger in this image, heart or lung?".
"""

from __future__ import annotations

import re
from typing import Literal

Extreme = Literal["largest", "smallest"]

_ASK = re.compile(
    r"\bwhich (?:one |organ |structure )?is (?:the )?"
    r"(?P<word>bigger|biggest|larger|largest|smaller|smallest)\b(?P<rest>[^?]*)",
    re.I,
)
_WHERE = re.compile(r"\b(?:in|on) (?:this|the) (?:image|picture|scan|slice|film)\b", re.I)
_SPLIT = re.compile(r",|\bor\b", re.I)
_ARTICLE = re.compile(r"^(?:the|a|an) ", re.I)


def size_comparison(question: str) -> tuple[Extreme, list[str]] | None:
    """``(extreme, options)`` of a question asking which of the options it names is the
    largest or smallest: "Which is bigger in this image,small bowel or kidney?" ->
    ``("largest", ["small bowel", "kidney"])``; ``None`` for other questions (including
    "What is the largest organ in the picture?", which names no options)."""
    m = _ASK.search(question)
    if not m or not re.search(r"\bor\b", m.group("rest"), re.I):
        return None
    rest = _WHERE.sub(" ", m.group("rest"))
    options: list[str] = []
    for part in _SPLIT.split(rest):
        option = _ARTICLE.sub("", re.sub(r"\s+", " ", part).strip(" .;:")).lower()
        if option and option not in options:
            options.append(option)
    if len(options) < 2:
        return None
    word = m.group("word").lower()
    return ("largest" if word.startswith(("big", "larg")) else "smallest"), options
