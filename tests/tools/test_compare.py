"""Size comparisons: how a question names them, and the ground tool's answer from its boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medloupe.artifacts import ArtifactStore
from medloupe.io import load_image
from medloupe.mini.tool import GroundTool
from medloupe.runner import ingest_image
from medloupe.schemas import Evidence, Region
from medloupe.tools.compare import size_comparison


@pytest.mark.parametrize(
    ("question", "asked"),
    [
        ("Which is bigger in this image,small bowel or kidney?", ("largest", ["small bowel", "kidney"])),
        ("Which is the biggest in this image, lung, liver or heart?",
         ("largest", ["lung", "liver", "heart"])),
        ("Which is smaller in this image,liver or right kidney?", ("smallest", ["liver", "right kidney"])),
        ("Which is the smallest in this image, rectum, small bowel or bladder?",
         ("smallest", ["rectum", "small bowel", "bladder"])),
        ("Which organ is the largest, the liver or the spleen?", ("largest", ["liver", "spleen"])),
        ("Which is bigger, left kidney or spleen ?", ("largest", ["left kidney", "spleen"])),
        ("What is the largest organ in the picture?", None),  # names no options
        ("Is the liver bigger than the spleen?", None),
        ("Which is larger?", None),
    ],
)  # fmt: skip
def test_size_comparison(question: str, asked: tuple[str, list[str]] | None) -> None:
    assert size_comparison(question) == asked


def _boxed(label: str, box: tuple[float, float, float, float], confidence: float) -> Evidence:
    return Evidence(
        id=f"ev-ground-{label.replace(' ', '-').lower()}",
        kind="tool",
        tool="ground",
        output={"label": label, "confidence": confidence},
        regions=[Region(id=f"r-{label}", box_xyxy=box, label=f"{label} 1")],
    )


def test_the_ground_tool_compares_the_options_boxes(tmp_path: Path) -> None:
    """Orchestration only (hand-made evidence, the shipped grounder's labels): the answer is
    the option as the question names it; a bare sided organ adds both sides; an option
    without a box leaves the question to the model."""
    tool = GroundTool()
    evidence = [
        _boxed("Left Lung", (0, 0, 40, 100), 0.8),  # 4,000 px
        _boxed("Right Lung", (60, 0, 100, 100), 0.8),  # 4,000 px
        _boxed("Heart", (30, 20, 90, 90), 0.9),  # 4,200 px
        _boxed("Liver", (0, 60, 70, 100), 0.5),  # 2,800 px
    ]
    question = "Which is the biggest in this image, lung, liver or heart?"
    png = tmp_path / "slice.png"
    Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (100, 1))).save(png)
    record = ingest_image(load_image(png), ArtifactStore(tmp_path / "s"))
    assert tool.suggest(question, record) == [
        {"target": t} for t in ("Left Lung", "Right Lung", "Liver", "Heart")
    ]
    said = tool.states(question, evidence)
    assert said is not None and said.parts == ("lung",)
    (claim,) = said.claims
    assert "the lung 8,000, the liver 2,800, the heart 4,200 pixels" in claim.text
    assert set(claim.evidence_ids) == {e.id for e in evidence}
    right = 0.8 * 0.8 * 0.5 * 0.9
    assert said.confidence == pytest.approx(right + (1 - right) / 3)
    smaller = tool.states("Which is smaller in this image, heart or left lung?", evidence)
    assert smaller is not None and smaller.parts == ("left lung",)
    assert tool.states("Which is bigger, liver or spleen?", evidence) is None  # no spleen box
    assert tool.states("Which is bigger, liver or aorta?", evidence) is None  # not trained

