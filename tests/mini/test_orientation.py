"""medloupe-mini's orientation estimate and the relative-position answer read from the
grounder's boxes in the image as shown (real shipped weights; SLAKE and MIRP images from
../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medloupe.evaluation.scoring import iou
from medloupe.mini import BUNDLED
from medloupe.mini.grounder import MiniGrounder
from medloupe.mini.orientation import KEEP_GRID, choose, d4, d4_box, d4_inverse, pick_keep_at
from medloupe.tools.position import centre, relation_from_question


@pytest.mark.parametrize("k", range(8))
def test_each_d4_element_is_undone_by_its_inverse(k: int) -> None:
    a = np.arange(2 * 3 * 3).reshape(2, 3, 3)  # not square: rotations swap the axes
    assert np.array_equal(d4(d4(a, k), d4_inverse(k)), a)
    assert len({d4(np.arange(6).reshape(2, 3), j).tobytes() + bytes(j >= 4) for j in range(8)}) == 8


@pytest.mark.parametrize("k", range(8))
def test_a_box_follows_its_pixels_under_each_d4_element(k: int) -> None:
    """``d4_box`` puts a normalised box where ``d4`` puts its pixels (a 60x40 array: the
    rotations swap the axes)."""
    h, w = 40, 60
    x0, y0, x1, y1 = 6, 4, 30, 16  # pixels
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    moved = d4(mask, k)
    ys, xs = np.nonzero(moved)
    mh, mw = moved.shape
    got = d4_box((x0 / w, y0 / h, x1 / w, y1 / h), k)
    want = (xs.min() / mw, ys.min() / mh, (xs.max() + 1) / mw, (ys.max() + 1) / mh)
    assert np.allclose(got, want), (k, got, want)


@pytest.mark.parametrize(
    ("question", "relation"),
    [
        ("Is the aorta to the left of the spleen? Answer yes or no.", ("aorta", "left", "spleen")),
        ("Is the spleen below the stomach?", ("spleen", "below", "stomach")),
        ("Is the liver above the right kidney in this image?", ("liver", "above", "right kidney")),
        ("Are the kidneys on the right side of the liver?", ("kidneys", "right", "liver")),
        ("Is the heart underneath the lung?", ("heart", "below", "lung")),
        ("Is the liver situated beneath the heart?", ("liver", "below", "heart")),
        ("What is the organ on the left side of this image?", None),  # asks a name
        ("Is the liver on the left of the image?", None),  # a side of the image
        ("Is there a nodule in the left lung?", None),
    ],
)
def test_relation_from_question(question: str, relation: tuple[str, str, str] | None) -> None:
    assert relation_from_question(question) == relation


@pytest.mark.parametrize(
    ("question", "targets", "named", "unnamed"),
    [
        ("Is the aorta to the left of the spleen?", ["Spleen"], "the aorta", "spleen"),
        ("Is the right iliopsoas below the prostate?", [], "right iliopsoas or the prostate", ""),
        (
            "Is the right lung middle lobe to the right of the heart?",
            ["Right Lung", "Heart"],
            "did not locate both",
            "no tool",
        ),  # both known: the boxes were not found
        ("Is the red dot above the blue dot?", [], "did not locate both", "no tool"),
        (f"Is the {'x' * 80} above the {'y' * 90}?", [], "x" * 30, "x" * 31),
    ],
)
def test_mini_names_the_side_no_tool_can_locate(
    question: str, targets: list[str], named: str, unnamed: str, tmp_path: Path
) -> None:
    """An unanswered relative-position question says which side no tool is trained to
    locate (a marker is find_markers'), in an abstention reason that fits its field."""
    import asyncio

    from medloupe.agents.protocol import RoleRequest
    from medloupe.agents.roles import AnswerDraft
    from medloupe.artifacts import ArtifactStore
    from medloupe.mini.backend import MiniBackend

    request = RoleRequest(role="answer", question=question, targets=targets)
    gen = asyncio.run(
        MiniBackend().play(request, [], store=ArtifactStore(tmp_path), schema=AnswerDraft)
    )
    draft = AnswerDraft.model_validate(gen.parsed)
    reason = draft.abstention_reason or ""
    assert draft.abstained and named in reason
    assert not unnamed or unnamed not in reason


def test_a_slice_is_turned_only_when_as_displayed_is_implausible() -> None:
    """As displayed stands while its probability is at least ``keep_at`` (a doubtful estimate
    of a turned slice no longer falls back to as displayed when that is the least likely of
    all); ``keep_at`` is the largest of the grid that keeps 99 % of as-displayed slices."""
    probs = np.array(
        [
            [0.30, 0.60, 0.10, 0, 0, 0, 0, 0],  # doubtful, but as displayed is plausible
            [0.01, 0.00, 0.87, 0, 0, 0, 0.12, 0],  # MIRP's rotated slice: p 0.87 < 0.9
            [0.97, 0.03, 0, 0, 0, 0, 0, 0],
        ]
    )
    assert choose(probs, 0.05).tolist() == [0, 2, 0]
    assert choose(probs, 0.005).tolist() == [0, 0, 0]
    rng = np.random.default_rng(0)
    n = 800
    y = np.tile(np.arange(8), n // 8)
    p0 = np.where(y == 0, rng.uniform(0.06, 1.0, n), rng.uniform(0.0, 0.3, n))

    def probs_for(p0: np.ndarray) -> np.ndarray:
        other = np.eye(8)[np.where(y == 0, 1, y)]  # the rest of the mass on one element
        return (1 - p0)[:, None] * other + p0[:, None] * np.eye(8)[0]

    mods = np.array(["CT"] * n)
    # every as-displayed slice has p0 >= 0.06: kept up to 0.05, not all at 0.1 or more
    assert pick_keep_at(probs_for(p0), y, mods) == 0.05
    doubted = p0.copy()
    doubted[np.flatnonzero(y == 0)[:3]] = 0.008  # 3 of 100 doubted: kept only below 0.008
    assert pick_keep_at(probs_for(doubted), y, mods) == 0.005
    assert json.loads((Path(BUNDLED) / "orientation.json").read_text())["keep_at"] in KEEP_GRID


def test_a_flipped_slice_is_grounded_in_the_standard_view_and_boxed_where_shown(
    shared_datasets: Path,
) -> None:
    """A SLAKE training CT slice (the orientation model saw it: this checks the mapping
    back, not generalisation) mirrored and rotated: the liver's box follows the liver."""
    image = shared_datasets / "slake/imgs/xmlab100/source.jpg"
    if not image.is_file():
        pytest.skip(f"{image} is not in this copy of ../shared")
    g = MiniGrounder(BUNDLED)
    rgb = np.asarray(Image.open(image).convert("RGB"))
    upright = g.ground(rgb, "liver", "CT")
    assert upright.orientation == 0
    h, w = rgb.shape[:2]
    for k in (2, 4, 5):
        shown = d4(rgb, k)
        found = g.ground(shown, "liver", "CT")
        assert found.orientation == k and (found.orientation_probability or 0) >= 0.9
        # the upright box carried through the same transform, as a mask's bounding box
        mask = np.zeros((h, w), bool)
        x0, y0, x1, y1 = (int(v) for v in upright.boxes[0][0])
        mask[y0:y1, x0:x1] = True
        ys, xs = np.nonzero(d4(mask, k))
        expected = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert iou(found.boxes[0][0], expected) >= 0.7, (k, found.boxes[0][0], expected)


@pytest.mark.slow
def test_relative_position_is_read_from_both_boxes_or_abstains(
    shared_datasets: Path, tmp_path: Path
) -> None:
    """MIRP slices (rotated or flipped): the answer compares the two grounded centres and
    cites both boxes; with a structure the grounder does not know, it abstains and says why."""
    from tests.mini.test_mini_shipped import _ask_json

    rq1 = shared_datasets / "mirp_sample/1_dataset_guide/RQ1"
    rows = {r["filename"]: r for r in json.loads((rq1 / "qa.json").read_text())}
    qa = rows["amos_img3_slice68.png"]["question_answer"][0]
    answer = _ask_json(tmp_path / "a", rq1 / "images/amos_img3_slice68.png", qa["question"])
    assert not answer["abstained"]
    assert answer["short_answer"] == "yes"
    assert "In the image as shown" in answer["claims"][0]["text"]
    assert {r["label"] for r in answer["regions"][:2]} == {"Spleen 1", "Left Kidney 1"}
    (a_box, b_box) = (answer["regions"][0]["box_xyxy"], answer["regions"][1]["box_xyxy"])
    assert centre(a_box)[0] > centre(b_box)[0]
    other = rows["btcv_img61_slice111.png"]["question_answer"][0]  # the aorta: not trained
    answer = _ask_json(tmp_path / "b", rq1 / "images/btcv_img61_slice111.png", other["question"])
    assert answer["abstained"] and "relative positions" in answer["abstention_reason"]
    assert "no tool here is trained to locate the aorta" in answer["abstention_reason"]


def test_the_ground_tool_says_when_it_found_the_slice_turned(
    shared_datasets: Path, tmp_path: Path
) -> None:
    """A MIRP slice shown mirrored: the tool's result and summary say so (the trace and the
    review page show how the boxes were obtained)."""
    from medloupe.artifacts import ArtifactStore
    from medloupe.io import load_image
    from medloupe.mini.tool import GroundTool
    from medloupe.runner import ingest_image
    from medloupe.tools.base import ToolContext

    image = shared_datasets / "mirp_sample/1_dataset_guide/RQ1/images/btcv_img73_slice85.png"
    store = ArtifactStore(tmp_path / "s")
    record = ingest_image(load_image(image), store)
    tool = GroundTool()
    args = tool.input_model.model_validate({"target": "spleen", "modality": "CT"})
    out = tool.run(args, ToolContext(image=record, store=store))
    assert out.orientation is not None and out.orientation.startswith("mirrored left-right")
    assert "slice found mirrored left-right" in out.summary()


def test_a_modality_no_header_states_is_read_from_the_image(
    shared_datasets: Path, tmp_path: Path
) -> None:
    """A MIRP slice is a PNG (no header) and its question names no modality: the ground tool
    reads CT from the pixels, so the slice is checked for turning (here rotated 180 degrees,
    which the orientation estimate gives p 0.87: below the old 0.9 bar, far above keep_at for
    "as displayed"); both organs are then boxed where they lie (MIRP's own centre points)."""
    from medloupe.artifacts import ArtifactStore
    from medloupe.io import load_image
    from medloupe.mini.tool import GroundTool
    from medloupe.runner import ingest_image
    from medloupe.tools.base import ToolContext

    rq1 = shared_datasets / "mirp_sample/1_dataset_guide/RQ1"
    qa = {r["filename"]: r for r in json.loads((rq1 / "qa.json").read_text())}[
        "amos_img3_slice80.png"
    ]["question_answer"][0]
    store = ArtifactStore(tmp_path / "s")
    record = ingest_image(load_image(rq1 / "images/amos_img3_slice80.png"), store)
    assert record.modality == "OT"  # "other": a PNG states none
    tool = GroundTool()
    reads: list[int] = []
    read = tool.read_modality
    tool.read_modality = lambda rgb: reads.append(1) or read(rgb)  # type: ignore[method-assign]
    for i in (1, 2):
        args = tool.input_model.model_validate({"target": qa[f"object{i}_name"]})
        out = tool.run(args, ToolContext(image=record, store=store))
        assert out.modality == "CT" and (out.modality_estimated or 0) >= 0.9
        assert out.orientation is not None and out.orientation.startswith("rotated 180")
        assert "modality read from the image" in out.summary()
        x0, y0, x1, y1 = out.boxes[0].box_xyxy
        px, py = qa[f"object{i}_center_x"], qa[f"object{i}_center_y"]
        assert x0 <= px <= x1 and y0 <= py <= y1
    assert reads == [1]  # one image, two targets: its modality is read once
    stated = tool.input_model.model_validate({"target": "spleen", "modality": "CT"})
    assert tool.run(stated, ToolContext(image=record, store=store)).modality_estimated is None
