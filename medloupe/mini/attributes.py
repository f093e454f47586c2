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

The body region is the exception: the head learned its open question from SLAKE's images, and
answered it for VQA-RAD's no better than 0.76 (34 of 45 dev images). Both
datasets state every image's region (VQA-RAD ``image_organ``, SLAKE ``location``), so a
softmax regression over the pooled image features, trained on those labels
(:class:`AttributeClassifier`), answers it instead: out of fold on the training images
(``benchmarks/bench_mini_attributes.py``) VQA-RAD 0.981 against the head's 0.822, SLAKE 0.951
against 0.958; on dev images 44/45 and 61/61 (the head: 34/45, 58/61).

A question qualifies only when every word after its subject is an attribute value or a
filler word ("Is this image taken in the axial plane?"); any other word ("Is this CT scan
enhanced by IV contrast?", "Is this a PA film?") leaves it to the experts. Presence of an
organ ("Does the picture contain lung?") is not a body-region claim and is never read as one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def most_probable(shares: Mapping[str, float]) -> str:
    """The value ``shares`` gives the most probability."""
    return max(shares, key=shares.__getitem__)


@dataclass(frozen=True)
class AttributeAnswer:
    """P(yes) for a question's claims and what it rests on (for the trace)."""

    p_yes: float
    basis: str


def answer_claims(
    claims: Mapping[str, str], shares: Callable[[str], Mapping[str, float] | None]
) -> AttributeAnswer | None:
    """P(yes) for ``claims`` (from :func:`attribute_claims`).

    Args:
        claims: attribute -> claimed value.
        shares: attribute -> each value's probability for the image (:func:`value_shares` of
            the head's answer to that attribute's :data:`PROBES` question, or an
            :class:`AttributeClassifier`'s), ``None`` when there is none; a value missing from
            it is one that cannot be told.

    Returns:
        The product over claims of each claimed value's share, or ``None`` when a claimed
        value cannot be told (the question is then left to the yes/no experts).
    """
    p_yes = 1.0
    said = []
    for attribute, value in claims.items():
        got = shares(attribute)
        if got is None or value not in got:
            return None
        best = most_probable(got)
        p_yes *= got[value]
        said.append(f"{attribute} {best} ({got[best]:.2f}), claimed {value}")
    return AttributeAnswer(p_yes, "read the image's attributes: " + "; ".join(said))


def value_shares(
    attribute: str, probs: np.ndarray, index: Mapping[str, int]
) -> dict[str, float] | None:
    """Each value of ``attribute``'s share of the head's probability ``probs`` (over the
    answers ``index`` maps to positions) given to any of its values, for the values the head
    has a trained answer for; ``None`` when it gives them none."""
    mass = {
        v: float(sum(probs[index[a]] for a in answers if a in index))
        for v, answers in ANSWERS[attribute].items()
        if any(a in index for a in answers)
    }
    total = float(sum(probs[index[a]] for a in _ALL[attribute] if a in index))
    if total <= 0.0:
        return None
    return {v: m / total for v, m in mass.items()}


# attribute -> the inverse L2 strength of its classifier (5-fold CV by training image over
# 0.01 / 0.1 / 1: VQA-RAD 0.985 / 0.985 / 0.981, SLAKE 0.949 / 0.956 / 0.958)
CLASSIFIER_C = {"region": 0.1}


class AttributeClassifier:
    """Softmax regression ``(1280,) -> values`` over standardised pooled image features: one
    image attribute the training datasets state for every image."""

    def __init__(
        self,
        values: Sequence[str],
        mean: np.ndarray,
        scale: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
    ) -> None:
        self.values = list(values)
        self.mean, self.scale, self.weight, self.bias = mean, scale, weight, bias

    @classmethod
    def fit(cls, features: np.ndarray, labels: Sequence[str], c: float) -> AttributeClassifier:
        """Fit on ``(N, 1280)`` features and their ``N`` values (L2 strength ``1/c``, LBFGS)."""
        import torch
        from torch.nn import functional as F

        values = sorted(set(labels))
        mean = features.mean(0).astype(np.float64)
        scale = features.std(0).astype(np.float64) + 1e-6
        x = torch.from_numpy((features - mean) / scale)
        y = torch.tensor([values.index(v) for v in labels])
        w = torch.zeros(x.shape[1], len(values), dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(values), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

        def closure() -> Any:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y, reduction="sum") + 0.5 / c * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(values, mean, scale, w.detach().numpy(), b.detach().numpy())

    def shares(self, features: np.ndarray) -> dict[str, float]:
        """Each value's probability for one image's ``(1280,)`` pooled features."""
        logits = ((features - self.mean) / self.scale) @ self.weight + self.bias
        p = np.exp(logits - logits.max())
        return dict(zip(self.values, (p / p.sum()).tolist(), strict=True))

    def state(self, attribute: str) -> dict[str, Any]:
        """Tensors to save under ``attribute`` (``torch.save``-able)."""
        import torch

        return {
            f"{attribute}.{k}": torch.from_numpy(np.asarray(v, np.float32))
            for k, v in (
                ("mean", self.mean),
                ("scale", self.scale),
                ("weight", self.weight),
                ("bias", self.bias),
            )
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], attribute: str, values: Sequence[str]
    ) -> AttributeClassifier:
        def get(k: str) -> np.ndarray:
            return np.asarray(state[f"{attribute}.{k}"].numpy(), np.float64)

        return cls(values, get("mean"), get("scale"), get("weight"), get("bias"))
