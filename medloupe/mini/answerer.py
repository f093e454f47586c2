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
_OPTIONS = re.compile(r"\b([\w-]+(?: [\w-]+)?)\s+or\s+([\w-]+(?: [\w-]+)?)\s*\??\s*$", re.I)


def question_options(question: str) -> list[str] | None:
    """The answers a closed question allows: the two options it names ("... apex or base?"),
    ``["yes", "no"]`` for a yes/no question, or ``None`` (open)."""
    m = _OPTIONS.search(question)
    if m:
        left = m.group(1).split()[-1]
        right = m.group(2).split()[0]
        return [canonical(left), canonical(right)]
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
        options = question_options(question)
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
        return Prediction(vocab[k], float(probs[k]), options)


def head_logits(
    head: Any, image_features: np.ndarray, question_embedding: np.ndarray
) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.concatenate([image_features, question_embedding]).astype(np.float32))
    with torch.inference_mode():
        return head(x[None])[0].numpy().astype(np.float64)


def normalised_answer(text: str) -> str:
    return canonical(normalise(text))
