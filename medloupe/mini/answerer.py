"""medloupe-mini's answerer: frozen EfficientNet-Lite0 image features + the bundled MiniLM
question embedding -> a small MLP over the training answers, temperature-calibrated.

At inference a yes/no question that only asserts what kind of image this is ("Is this a CT
scan?") is answered by asking the head the open question (:mod:`medloupe.mini.attributes`),
another yes/no question goes to :mod:`medloupe.mini.yesno` (an image expert and a question
expert weighed per image by a gate); a question naming its options ("apex or base?")
is answered from those options, an open question from the whole answer vocabulary.
Checkpoint: ``answerer.pt``, ``yesno.pt`` and ``attributes.pt`` (tensors only) +
``answerer.json`` (vocabulary, temperature, dimensions, the attribute classifiers' values, data
and held-out metrics).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.mini.attributes import (
    PROBES,
    AttributeClassifier,
    answer_claims,
    most_probable,
    value_shares,
)
from medloupe.mini.yesno import YesNo
from medloupe.text import attribute_claims, canonical, normalise

FORMAT = "medloupe-mini-answerer/2"

_YESNO_START = re.compile(
    r"^\s*(is|are|does|do|did|was|were|can|could|has|have|had|will|would|should|shall|may|"
    r"might|must|any|anything)\b",
    re.I,
)


def asks_yes_or_no(question: str) -> bool:
    """Whether a question opens the way yes/no questions do ("Is ...", "Does ...", "Any ...")."""
    return bool(_YESNO_START.match(question))


# "A or B": the first "or" that does not close a yes/no question ("enhancing or not?")
_OR = re.compile(r"\bor\b(?!\s+not\b)", re.I)
# yes/no questions that name options and may still be answered yes or no: existence ("Is
# there epidural or subdural hematoma?" -> no); "Is this a contrast or non contrast CT?" is not
_EXISTENCE = re.compile(r"^(?:(?:is |are )+there|any|anything|can you)\b|\bevidence\b")
_NEGATING = {"non", "not", "no", "un"}
# words that share the right option's tail: "more or less dense", "with or without contrast"
_SHARING = {"more", "less", "with", "one"}


def _both_known(pairs: list[tuple[str, str]], vocab: set[str] | None) -> tuple[str, str]:
    """Of candidate spellings of two options (most specific first), the first pair ``vocab``
    holds both of, else the first it holds either of, else the last pair (canonical)."""
    forms = [(canonical(a), canonical(b)) for a, b in pairs]
    for need in (2, 1):
        for a, b in forms:
            if vocab is not None and (a in vocab) + (b in vocab) >= need:
                return a, b
    return forms[-1]


def _side(words: list[str], vocab: set[str] | None, from_end: bool) -> str:
    """The option one side of "or" names: the longest run of words next to "or" that is a
    trained answer, else the single word next to "or" ("non contrast" after "or" is kept
    whole)."""
    for n in range(len(words), 0, -1):
        phrase = " ".join(words[-n:] if from_end else words[:n])
        if vocab is not None and canonical(phrase) in vocab:
            return canonical(phrase)
    if not from_end and len(words) > 1 and words[0] in _NEGATING:
        return canonical(" ".join(words[:2]))
    return canonical(words[-1] if from_end else words[0])


def _pair(left: list[str], right: list[str], vocab: set[str] | None) -> tuple[str, str]:
    """The two options around "or" from the (normalised) words before and after it."""
    tail = left[-1]
    # the right option negates the left: "contrast or no contrast", "ct or non contrast ct"
    if right[0] in _NEGATING and tail in right[1:3]:
        k = right.index(tail, 1)
        if len(left) >= k:
            return canonical(" ".join(left[-k:])), canonical(" ".join(right[: k + 1]))
    if tail in right[1:3]:  # a shared tail: "t1 weighted or t2 weighted"
        k = right.index(tail, 1)
        if len(left) > k:
            mine, core = left[-1 - k : -1], right[:k]
            return _both_known(
                [
                    (" ".join([*mine, tail]), " ".join([*core, tail])),
                    ("".join([*mine, tail]), "".join([*core, tail])),
                    (" ".join(mine), " ".join(core)),
                ],
                vocab,
            )
    if len(right) > 1:  # the left option shares the right one's tail: "more or less dense"
        first, second = canonical(f"{tail} {right[1]}"), canonical(" ".join(right[:2]))
        if first != second and (
            tail in _SHARING or (vocab is not None and first in vocab and second in vocab)
        ):
            return first, second
    return _side(left, vocab, from_end=True), _side(right, vocab, from_end=False)


def question_options(question: str, vocab: set[str] | None = None) -> list[str] | None:
    """The answers a closed question allows: the options it names ("... apex or base of the
    lung?", "Which is biggest, lung, liver or heart?"; with ``vocab``, multi-word options the
    model knows are kept whole, e.g. "small bowel"), ``["yes", "no"]`` for a yes/no question,
    both for a question asking whether one of the options exists ("Is there epidural or
    subdural hematoma?" may be answered "no"), or ``None`` (open)."""
    yes_no = ["yes", "no"] if asks_yes_or_no(question) else []
    m = _OR.search(question)
    if m:
        segments = question[: m.start()].split(",")
        left = normalise(segments[-1]).split()[-4:]
        right = normalise(re.split(r"[,?;]|\bor\b", question[m.end() :], flags=re.I)[0]).split()
        if left and right:
            listed = [canonical(s) for s in segments[1:-1] if 0 < len(normalise(s).split()) <= 3]
            options = list(dict.fromkeys([*listed, *_pair(left, right[:4], vocab)]))
            # options that fold to one answer ("right or lower right?") leave that answer
            if options and all(options):
                if yes_no and not _EXISTENCE.search(normalise(question)):
                    return options
                return [*options, *(o for o in yes_no if o not in options)]
    return yes_no or None


def plain_yes_no(question: str, answer: str) -> bool:
    """Whether a training question is a yes/no question naming no options and answered yes or
    no: what the yes/no experts (:mod:`medloupe.mini.yesno`) learn from."""
    return answer in ("yes", "no") and question_options(question) == ["yes", "no"]


def build_head(in_dim: int, hidden: int, classes: int, dropout: float = 0.3) -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, classes),
    )


@dataclass
class Prediction:
    answer: str
    confidence: float
    options: list[str] | None
    basis: str | None = None  # how a yes/no answer was reached, when not by the experts


class MiniAnswerer:
    """Loads a trained answerer folder on first use (thread-safe)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None

    def load(self) -> None:
        """Load the weights now (they load on first use otherwise)."""
        self._load()

    def _load(self) -> _Loaded:
        with self._lock:
            if self._loaded is None:
                import torch

                from medloupe.knowledge_base.backbone import build_backbone
                from medloupe.knowledge_base.embedders import TextEmbedder

                meta = json.loads((self.folder / "answerer.json").read_text(encoding="utf-8"))
                if meta.get("format") != FORMAT:
                    raise ValueError(
                        f"{self.folder} holds a {meta.get('format')!r} answerer; this medloupe "
                        f"reads {FORMAT!r} (it answers yes/no questions with a gated pair of "
                        "experts): retrain it with `medloupe train mini --out "
                        f"{self.folder}`, or use the shipped model (`--vlm mini:`)"
                    )
                head = build_head(meta["in_dim"], meta["hidden"], len(meta["vocab"]))
                state = torch.load(
                    self.folder / "answerer.pt", map_location="cpu", weights_only=True
                )
                head.load_state_dict(state)
                yesno = YesNo(
                    torch.load(self.folder / "yesno.pt", map_location="cpu", weights_only=True)
                )
                classifiers: dict[str, AttributeClassifier] = {}
                if meta.get("attributes"):  # declared by answerer.json; older folders: the head
                    tensors = torch.load(
                        self.folder / "attributes.pt", map_location="cpu", weights_only=True
                    )
                    classifiers = {
                        a: AttributeClassifier.from_state(tensors, a, spec["values"])
                        for a, spec in meta["attributes"].items()
                    }
                text = TextEmbedder()
                probes = dict(zip(PROBES, text.encode(list(PROBES.values())), strict=True))
                self._loaded = _Loaded(
                    build_backbone(), head.eval(), yesno, text, meta, probes, classifiers
                )
            return self._loaded

    @property
    def meta(self) -> dict[str, Any]:
        return self._load().meta

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the answerer's question encoder reads it."""
        return int(self._load().text.count_tokens(text))

    def image_features(self, rgb: np.ndarray) -> np.ndarray:
        """The ``(1280,)`` pooled backbone features of ``rgb`` (``(H, W, 3)`` uint8 RGB)."""
        import torch

        from medloupe.knowledge_base.backbone import preprocess

        m = self._load()
        with torch.inference_mode():
            return m.backbone.features(torch.from_numpy(preprocess(rgb))[None])[0].numpy()

    def predict(self, rgb: np.ndarray, question: str) -> Prediction:
        """Answer ``question`` about ``rgb`` (``(H, W, 3)`` uint8)."""
        return self.predict_features(self.image_features(rgb), question)

    def attribute(self, rgb: np.ndarray, attribute: str) -> tuple[str, float] | None:
        """The most probable value of an image attribute of ``rgb`` (``(H, W, 3)`` uint8 RGB;
        ``attribute`` a key of :data:`~medloupe.mini.attributes.PROBES`: modality, plane,
        weighting, region) with its probability (:meth:`attribute_shares`); ``None`` when
        none can be told."""
        shares = self.attribute_shares(self.image_features(rgb), attribute)
        if not shares:
            return None
        best = most_probable(shares)
        return best, shares[best]

    def attribute_shares(
        self, image_features: np.ndarray, attribute: str, *, classifier: bool = True
    ) -> dict[str, float] | None:
        """Each value of an image attribute and its probability, from the image's ``(1280,)``
        pooled features: the attribute's classifier where the folder has one (the body
        region), else the head asked the attribute's open question (each value's share of
        the probability it gives them all; ``None`` when it gives them none).
        ``classifier=False`` asks the head even where there is a classifier (ablations)."""
        m = self._load()
        if classifier and attribute in m.classifiers:
            return m.classifiers[attribute].shares(image_features)
        logits = head_logits(m.head, image_features, m.probes[attribute])
        probs = softmax(logits / float(m.meta["temperature"]))
        return value_shares(attribute, probs, {a: i for i, a in enumerate(m.meta["vocab"])})

    def predict_features(
        self,
        image_features: np.ndarray,
        question: str,
        question_embedding: np.ndarray | None = None,
        *,
        attributes: bool = True,
    ) -> Prediction:
        """Answer ``question`` from the image's ``(1280,)`` pooled backbone features (and the
        question's ``(384,)`` MiniLM embedding when already computed). ``attributes=False``
        sends every yes/no question to the gated experts (for ablations)."""
        m = self._load()
        img = image_features
        q = m.text.encode([question])[0] if question_embedding is None else question_embedding
        vocab: list[str] = m.meta["vocab"]
        options = question_options(question, set(vocab))
        temperature = float(m.meta["temperature"])
        if options == ["yes", "no"]:
            claims = attribute_claims(question) if attributes else None
            by_claims = (
                answer_claims(claims, lambda a: self.attribute_shares(img, a)) if claims else None
            )
            if by_claims is not None:
                p_yes, basis = by_claims.p_yes, by_claims.basis
            else:
                p_yes = float(m.yesno.probabilities(img[None], q[None])["gated"][0])
                basis = None
            answer = "yes" if p_yes >= 0.5 else "no"
            return Prediction(answer, max(p_yes, 1.0 - p_yes), options, basis)
        logits = head_logits(m.head, img, q) / temperature
        return choose(logits, vocab, options)


@dataclass
class _Loaded:
    backbone: Any
    head: Any
    yesno: YesNo
    text: Any
    meta: dict[str, Any]
    probes: dict[str, np.ndarray]  # attribute -> its open question's embedding
    classifiers: dict[str, AttributeClassifier]  # attribute -> its classifier, where trained


def choose(logits: np.ndarray, vocab: list[str], options: list[str] | None) -> Prediction:
    """The most probable answer among those ``options`` allows (all of ``vocab`` when
    ``None``), from temperature-scaled ``logits`` over ``vocab``."""
    allowed = np.ones(len(vocab), bool)
    if options:
        allowed = np.array([v in options for v in vocab])
        if not allowed.any():  # named options the model never saw: say the first
            return Prediction(options[0], 1.0 / len(options), options)
    probs = softmax(np.where(allowed, logits, -np.inf))
    k = int(np.argmax(probs))
    confidence = float(probs[k])
    if options:  # named options the model never saw share the mass it cannot place
        confidence *= int(allowed.sum()) / len(options)
    return Prediction(vocab[k], confidence, options)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits (``-inf`` entries get 0)."""
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


def head_logits(
    head: Any, image_features: np.ndarray, question_embedding: np.ndarray
) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.concatenate([image_features, question_embedding]).astype(np.float32))
    with torch.inference_mode():
        return head(x[None])[0].numpy().astype(np.float64)


def normalised_answer(text: str) -> str:
    return canonical(normalise(text))
