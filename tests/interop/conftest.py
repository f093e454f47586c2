from __future__ import annotations

from pathlib import Path

import pytest

from medloupe.testing.tiny_model import build_tiny_qwen2_5_vl


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model `medloupe tiny-vlm` builds (random weights, vLLM-servable)."""
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-vlm"))
