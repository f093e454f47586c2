"""Yes/no questions in medloupe-mini: two experts and a gate that weighs them per image.

Measured on held-out training images (5 folds by image, before this module existed): a head on
image features + question embedding beat the question alone on SLAKE's yes/no questions (0.75
vs 0.67) but not on VQA-RAD's (0.59 vs 0.63), whose questions ask about subtle pathology that
frozen ImageNet features do not show. So a yes/no question gets

- the *image expert*: MLP over ``[image features (1280), question embedding (384)]``;
- the *question expert*: MLP over the question embedding alone;
- a *gate*: logistic regression over both experts' logits, each multiplied by
  ``[1, z]``, and ``z`` itself, where ``z`` is the first :data:`GATE_DIMS` principal components
  of the image features. It is fitted on out-of-fold predictions of the experts, so it learns on
  which kinds of image the image expert is worth trusting. Its output is the probability of
  "yes" (calibrated by construction: a logistic fit on held-out predictions).

Chosen by nested cross-validation on the training images (5 outer x 5 inner folds, 2,856
yes/no questions): image expert 80 epochs, question expert 40, four components, a logistic gate
on logits (held-out accuracy VQA-RAD 0.617, SLAKE 0.789, against 0.543 / 0.782 for the image
expert, 0.638 / 0.675 for the question expert, and 0.561 / 0.760 for the yes-or-no argmax of
the answerer's own head, which answered yes/no questions before; a mixture of calibrated
probabilities and 8-32 components did no better).

Tensors live in ``yesno.pt``; dimensions and held-out accuracies in ``answerer.json``'s
``"yesno"`` entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HIDDEN = 256
EPOCHS = {"image": 80, "question": 40}
GATE_DIMS = 4
FOLDS = 5
GATE_C = 1.0  # inverse L2 strength of the gate, as in scikit-learn's LogisticRegression


def build_expert(in_dim: int, hidden: int = HIDDEN) -> Any:
    """MLP ``in_dim -> hidden -> 1`` (ReLU, dropout 0.3): the logit of "yes"."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 1)
    )


def _inputs(image_features: np.ndarray, question_embeddings: np.ndarray) -> tuple[Any, Any]:
    """The image expert's ``(N, 1664)`` and the question expert's ``(N, 384)`` float32 inputs."""
    import torch

    both = np.concatenate([image_features, question_embeddings], 1).astype(np.float32)
    return torch.from_numpy(both), torch.from_numpy(question_embeddings.astype(np.float32))


def _load_expert(weights: dict[str, Any]) -> Any:
    """An expert from its state dict (dimensions read from the first layer)."""
    first = weights["0.weight"]
    net = build_expert(int(first.shape[1]), int(first.shape[0]))
    net.load_state_dict(weights)
    return net.eval()


def gate_features(image_logit: np.ndarray, question_logit: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``(N, 2 * (1 + k) + k)`` gate inputs from both experts' logits ``(N,)`` and the image's
    principal components ``(N, k)``."""
    g = np.concatenate([np.ones((len(z), 1)), z], axis=1)
    return np.concatenate(
        [image_logit[:, None] * g, question_logit[:, None] * g, z], axis=1
    ).astype(np.float32)


def _train_expert(x: Any, y: Any, epochs: int, seed: int) -> Any:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_expert(int(x.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        order = rng.permutation(len(y))
        for start in range(0, len(order), 64):
            b = torch.from_numpy(order[start : start + 64])
            loss = F.binary_cross_entropy_with_logits(net(x[b])[:, 0], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _logits(net: Any, x: Any) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return net(x)[:, 0].numpy().astype(np.float64)


def _fit_gate(features: np.ndarray, y: np.ndarray, c: float = GATE_C) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (LBFGS): weights ``(D,)`` and bias."""
    import torch
    from torch.nn import functional as F

    x = torch.from_numpy(features.astype(np.float64))
    t = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, t, reduction="sum")
        loss = loss + 0.5 / c * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach()[0])


class Principal:
    """The first ``k`` principal components of image features, scaled to unit variance."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, scale: np.ndarray) -> None:
        self.mean, self.components, self.scale = mean, components, scale

    @classmethod
    def fit(cls, features: np.ndarray, k: int = GATE_DIMS) -> Principal:
        mean = features.mean(0)
        _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
        components = vt[:k]
        z = (features - mean) @ components.T
        return cls(mean, components, z.std(0) + 1e-6)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) @ self.components.T) / self.scale


def train_yesno(
    image_features: np.ndarray,
    question_embeddings: np.ndarray,
    answers_yes: np.ndarray,
    folds: np.ndarray,
    *,
    seed: int = 0,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Train both experts and the gate on yes/no questions.

    Args:
        image_features: ``(N, 1280)`` pooled image features, one row per question.
        question_embeddings: ``(N, 384)`` MiniLM question embeddings.
        answers_yes: ``(N,)`` bool, whether the answer is "yes".
        folds: ``(N,)`` int in ``[0, FOLDS)``, the fold of each question's image (questions on
            one image share a fold), for the out-of-fold predictions the gate learns from.

    Returns:
        The tensors to save (``torch.save``-able dict of float32 tensors).
    """
    import torch

    xi, xq = _inputs(image_features, question_embeddings)
    y = torch.from_numpy(answers_yes.astype(np.float32))
    oof_i = np.zeros(len(y))
    oof_q = np.zeros(len(y))
    steps = FOLDS + 1
    for f in range(FOLDS):
        tr = torch.from_numpy(np.flatnonzero(folds != f))
        te = torch.from_numpy(np.flatnonzero(folds == f))
        oof_i[te.numpy()] = _logits(_train_expert(xi[tr], y[tr], EPOCHS["image"], seed + f), xi[te])
        oof_q[te.numpy()] = _logits(
            _train_expert(xq[tr], y[tr], EPOCHS["question"], seed + f), xq[te]
        )
        if on_progress:
            on_progress("yes/no experts", f + 1, steps)
    principal = Principal.fit(image_features)
    w, b = _fit_gate(gate_features(oof_i, oof_q, principal(image_features)), answers_yes)
    image_expert = _train_expert(xi, y, EPOCHS["image"], seed)
    question_expert = _train_expert(xq, y, EPOCHS["question"], seed)
    if on_progress:
        on_progress("yes/no experts", steps, steps)
    state = {f"image.{k}": v for k, v in image_expert.state_dict().items()}
    state |= {f"question.{k}": v for k, v in question_expert.state_dict().items()}
    state |= {
        "pca.mean": torch.from_numpy(principal.mean.astype(np.float32)),
        "pca.components": torch.from_numpy(principal.components.astype(np.float32)),
        "pca.scale": torch.from_numpy(principal.scale.astype(np.float32)),
        "gate.weight": torch.from_numpy(w.astype(np.float32)),
        "gate.bias": torch.tensor([b], dtype=torch.float32),
    }
    return state


class YesNo:
    """The trained experts and gate (from :func:`train_yesno`'s tensors)."""

    def __init__(self, state: dict[str, Any]) -> None:
        def sub(prefix: str) -> dict[str, Any]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        self.image_expert = _load_expert(sub("image."))
        self.question_expert = _load_expert(sub("question."))
        self.principal = Principal(
            state["pca.mean"].numpy().astype(np.float64),
            state["pca.components"].numpy().astype(np.float64),
            state["pca.scale"].numpy().astype(np.float64),
        )
        self.weight = state["gate.weight"].numpy().astype(np.float64)
        self.bias = float(state["gate.bias"][0])

    def probabilities(
        self, image_features: np.ndarray, question_embeddings: np.ndarray
    ) -> dict[str, np.ndarray]:
        """P(yes) ``(N,)`` from ``(N, 1280)`` image features and ``(N, 384)`` question
        embeddings: ``"gated"`` (the answer), and each expert's own (``"image"``,
        ``"question"``) for reports."""
        xi, xq = _inputs(image_features, question_embeddings)
        li, lq = _logits(self.image_expert, xi), _logits(self.question_expert, xq)
        z = self.principal(image_features.astype(np.float64))
        gated = gate_features(li, lq, z).astype(np.float64) @ self.weight + self.bias

        def sigmoid(v: np.ndarray) -> np.ndarray:
            return 1.0 / (1.0 + np.exp(-v))

        return {"gated": sigmoid(gated), "image": sigmoid(li), "question": sigmoid(lq)}


def accuracy_by_source(
    probabilities: np.ndarray, answers_yes: np.ndarray, sources: Sequence[str]
) -> dict[str, float]:
    """Accuracy of ``probabilities >= 0.5`` per source."""
    src = np.asarray(sources)
    return {
        s: float(np.mean((probabilities[src == s] >= 0.5) == answers_yes[src == s]))
        for s in sorted(set(sources))
    }
