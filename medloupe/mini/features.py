"""Frozen EfficientNet-Lite0 features of image files, shared by the answerer's and the
grounder's training."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Progress = Callable[[str, int, int], None]


def image_features(
    paths: Sequence[str | np.ndarray],
    *,
    pyramid: bool = False,
    stage: str = "images",
    on_progress: Progress | None = None,
) -> np.ndarray:
    """EfficientNet-Lite0 features of image files (or of ``(H, W, 3)`` uint8 RGB arrays), 16
    at a time: ``(len(paths), 1280)`` float32 pooled features, or with ``pyramid``
    ``(len(paths), 472, 28, 28)`` float16 pyramid maps (the grounder's input)."""
    import torch
    from PIL import Image

    from medloupe.knowledge_base.backbone import (
        FEATURE_DIM,
        PYRAMID_DIM,
        build_backbone,
        preprocess,
    )
    from medloupe.mini.grounder import GRID

    net = build_backbone()
    encode = net.pyramid if pyramid else net.features
    shape = (PYRAMID_DIM, GRID, GRID) if pyramid else (FEATURE_DIM,)
    out = np.zeros((len(paths), *shape), np.float16 if pyramid else np.float32)
    batch = 16
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        x = np.stack(
            [
                preprocess(
                    p if isinstance(p, np.ndarray) else np.asarray(Image.open(p).convert("RGB"))
                )
                for p in chunk
            ]
        )
        with torch.inference_mode():
            out[start : start + len(chunk)] = encode(torch.from_numpy(x)).numpy()
        if on_progress:
            on_progress(stage, start + len(chunk), len(paths))
    return out
