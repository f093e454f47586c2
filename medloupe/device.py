"""The one device policy: a requested torch device, else CUDA when present, else the CPU.

torch is imported when a device is chosen (a model is about to load), never at import.
"""

from __future__ import annotations


def torch_device(requested: str | None = None) -> str:
    """``requested`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``) when given, else ``"cuda"`` when
    torch sees a GPU, else ``"cpu"``."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
