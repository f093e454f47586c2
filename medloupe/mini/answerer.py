"""medloupe-mini's answerer: frozen EfficientNet-Lite0 image features + the bundled MiniLM
question embedding -> a small MLP over the training answers, temperature-calibrated.

At inference a closed question is answered from the options it allows: yes/no for a
yes/no question (with a "yes" logit offset fitted on held-out training images), or the options
it names ("apex or base?"); an open question from the whole answer vocabulary.
Checkpoint: ``answerer.pt`` (tensors only) + ``answerer.json`` (vocabulary, temperature, yes
offset, dimensions, data and held-out metrics).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.evaluation.scoring import canonical, normalise

_YESNO_START = re.compile(
    r"^\s*(is|are|does|do|did|was|were|can|could|has|have|had|will|would|should|shall|may|"
    r"might|must)\b",
    re.I,
)
# "A or B" anywhere in the question, up to three words each side ("a contrast or non contrast
# CT", "more in the apex or base of the lung"); "or not" is a yes/no question
_OPTIONS = re.compile(
    r"\b((?:[\w-]+ ){0,2}[\w-]+)\s+or\s+(?!not\b)([\w-]+(?: [\w-]+){0,2})\s*[?.]?", re.I
)


def _side(words: list[str], vocab: set[str] | None, from_end: bool) -> str:
    """The option one side of "or" names: the longest run of words next to "or" that is a
    trained answer, else the single word next to "or"."""
    for n in range(len(words), 0, -1):
        phrase = " ".join(words[-n:] if from_end else words[:n])
        if vocab is not None and canonical(phrase) in vocab:
            return canonical(phrase)
    return canonical(words[-1] if from_end else words[0])


def question_options(question: str, vocab: set[str] | None = None) -> list[str] | None:
    """The answers a closed question allows: the two options it names ("... apex or base of
    the lung?"; with ``vocab``, multi-word options the model knows are kept whole, e.g. "non
    contrast"), ``["yes", "no"]`` for a yes/no question, or ``None`` (open)."""
    m = _OPTIONS.search(question)
    if m:
        left = _side(m.group(1).split(), vocab, from_end=True)
        right = _side(m.group(2).split(), vocab, from_end=False)
        if left != right:
            return [left, right]
    if _YESNO_START.match(question):
        return ["yes", "no"]
    return None


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


class MiniAnswerer:
    """Loads a trained answerer folder on first use (thread-safe)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Any, dict[str, Any]] | None = None

    def load(self) -> None:
        """Load the weights now (they load on first use otherwise)."""
        self._load()

    def _load(self) -> tuple[Any, Any, Any, dict[str, Any]]:
        with self._lock:
            if self._loaded is None:
                import torch

                from medloupe.knowledge_base.embedders import TextEmbedder
                from medloupe.mini.backbone import build_backbone

                meta = json.loads((self.folder / "answerer.json").read_text(encoding="utf-8"))
                head = build_head(meta["in_dim"], meta["hidden"], len(meta["vocab"]))
                state = torch.load(
                    self.folder / "answerer.pt", map_location="cpu", weights_only=True
                )
                head.load_state_dict(state)
                self._loaded = (build_backbone(), head.eval(), TextEmbedder(), meta)
            return self._loaded

    @property
    def meta(self) -> dict[str, Any]:
        return self._load()[3]

    def predict(self, rgb: np.ndarray, question: str) -> Prediction:
        """Answer ``question`` about ``rgb`` (``(H, W, 3)`` uint8)."""
        import torch

        from medloupe.mini.backbone import preprocess

        backbone, head, text, meta = self._load()
        with torch.inference_mode():
            img = backbone.features(torch.from_numpy(preprocess(rgb))[None])[0].numpy()
        q = text.encode([question])[0]
        logits = head_logits(head, img, q) / float(meta["temperature"])
        vocab: list[str] = meta["vocab"]
        options = question_options(question, set(vocab))
        allowed = np.ones(len(vocab), bool)
        if options:
            allowed = np.array([v in options for v in vocab])
            if not allowed.any():  # named options the model never saw: say the first
                return Prediction(options[0], 1.0 / len(options), options)
        if options == ["yes", "no"] and "yes" in vocab:
            logits = logits.copy()
            logits[vocab.index("yes")] += float(meta.get("yes_bias", 0.0))
        masked = np.where(allowed, logits, -np.inf)
        probs = np.exp(masked - masked.max())
        probs /= probs.sum()
        k = int(np.argmax(probs))
        confidence = float(probs[k])
        if options:  # named options the model never saw share the mass it cannot place
            confidence *= int(allowed.sum()) / len(options)
        return Prediction(vocab[k], confidence, options)


def head_logits(
    head: Any, image_features: np.ndarray, question_embedding: np.ndarray
) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.concatenate([image_features, question_embedding]).astype(np.float32))
    with torch.inference_mode():
        return head(x[None])[0].numpy().astype(np.float64)


def normalised_answer(text: str) -> str:
    return canonical(normalise(text))
