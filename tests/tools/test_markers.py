"""``find_markers`` and the relative-position reading shared by every tool: parsing MIRP's
marker questions, dots by hue, labels by OCR (RapidOCR's bundled models), and whole runs on
MIRP's marked slices from ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medloupe.tools.markers import Marker, find_dots, find_labels, marker_relation
from medloupe.tools.ocr import TextLine
from medloupe.tools.position import holds, relation_from_question, split_relation

MIRP = "mirp_sample/1_dataset_guide"


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Is the aorta (red) above the spleen (blue)?", ("red", "above", "blue")),
        ("Is the right iliopsoas (DK) below the prostate (AV)?", ("DK", "below", "AV")),
        ("Is the spleen (1) to the right of the left kidney (3)?", ("1", "right", "3")),
        ("Is the red dot above the blue dot?", ("red", "above", "blue")),
        ("Are the letters UW to the right of the letters VM?", ("UW", "right", "VM")),
        ("Is the number 45 to the right of the number 40?", ("45", "right", "40")),
        ("Is the aorta above the spleen?", None),  # organs, no markers: the grounder's
        ("Is there a red dot in the image?", None),
        ("Is the red dot above the red dot?", None),
    ],
)
def test_marker_questions_are_parsed(question: str, expected: tuple | None) -> None:
    got = marker_relation(question)
    assert (None if got is None else (got[0].value, got[1], got[2].value)) == expected


def test_organ_relations_stay_plain_words() -> None:
    assert relation_from_question("Is the aorta (red) above the spleen (blue)?") is None
    assert split_relation("Is the aorta (red) above the spleen (blue)?") == (
        "the aorta (red)",
        "above",
        "the spleen (blue)",
    )
    assert holds("left", (1, 5), (2, 0)) and holds("above", (9, 0), (0, 1))


def test_dots_are_found_by_hue_on_a_grey_slice() -> None:
    rgb = np.repeat(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], 3, axis=2)
    rgb = np.repeat(rgb, 150, axis=0).copy()  # a grey ramp, 150 x 200
    rgb[20:30, 40:50] = (230, 20, 20)  # red
    rgb[100:108, 150:158] = (20, 40, 240)  # blue
    rgb[5:6, 5:7] = (230, 20, 20)  # two red pixels: noise, not a dot
    (red, n_red), *others = find_dots(rgb, "red")
    assert red == (40, 20, 50, 30) and n_red == 100 and not others
    assert find_dots(rgb, "blue")[0][0] == (150, 100, 158, 108)
    assert find_dots(rgb, "green") == []


def test_labels_match_exactly_or_as_ocrs_look_alike_characters() -> None:
    lines = [
        TextLine("Al", 0.8, (10, 10, 30, 20)),  # "AI" read with a lower-case l
        TextLine("4O 45", 0.9, (100, 50, 150, 60)),  # two numbers on one line, O for 0
        TextLine("BZ", 0.99, (0, 90, 20, 100)),
    ]
    assert find_labels(lines, "AI") == [((10, 10, 30, 20), 0.8)]
    assert find_labels(lines, "40") == [((100, 50, 120, 60), 0.9)]
    assert find_labels(lines, "45")[0][0] == (130, 50, 150, 60)
    assert find_labels([TextLine("B2", 0.9, (0, 0, 9, 9))], "BZ")  # letters asked: 2 is Z
    assert not find_labels([TextLine("B2", 0.9, (0, 0, 9, 9))], "B3")
    assert find_labels(lines, "AA") == []
    assert Marker("label", "BZ").name == "the label BZ"


def _mirp_items(root: Path, kinds: list[tuple[str, str, str]]) -> list[tuple[Path, str, str]]:
    items = []
    for rq, qa, folder in kinds:
        rows = json.loads((root / MIRP / rq / qa).read_text())[:2]
        for row in rows:
            q = row["question_answer"][0]
            items.append(
                (
                    root / MIRP / rq / folder / row["filename"],
                    q["question"],
                    "yes" if q["answer"] else "no",
                )
            )
    return items


@pytest.mark.slow
def test_marker_questions_on_mirp_slices_are_answered_from_the_markers(
    shared_datasets: Path, tmp_path: Path
) -> None:
    """Real MIRP marked slices (dots, letters, numbers; RQ2 names organs beside the marker,
    RQ3 and AS only the markers), the whole graph, the default model: the answer comes from
    find_markers' evidence, with both markers' regions, and is right."""
    from medloupe import ask

    if not (shared_datasets / MIRP).is_dir():
        pytest.skip(f"{shared_datasets / MIRP} is not in this copy of ../shared")
    items = _mirp_items(
        shared_datasets,
        [
            ("RQ2", "qa_dots.json", "image_dots"),
            ("RQ2", "qa_letters.json", "image_letters"),
            ("RQ3", "qa_numbers.json", "image_numbers"),
            ("AS", "qa_letters.json", "image_letters"),
        ],
    )
    for i, (image, question, truth) in enumerate(items):
        answer = ask(image, question, out=tmp_path / f"r{i}", modality="CT")
        assert answer.short_answer == truth, (image.name, question, answer)
        assert len(answer.regions) >= 2 and answer.confidence >= 0.6
        cited = {e for c in answer.claims for e in c.evidence_ids}
        trace = (tmp_path / f"r{i}" / "trace.json").read_text()
        assert "find_markers" in trace and cited
    # a marked slice with a marker that is not on it: no guess
    image, _, _ = items[0]
    answer = ask(image, "Is the green dot above the blue dot?", out=tmp_path / "none")
    assert answer.abstained or answer.confidence <= 0.6
    Image.open(image).close()
