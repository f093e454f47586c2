"""Evaluation: scoring rules, importers, metrics, and the harness on a slice of the dev set
(fresh run per item, resumable, ablations, failures recorded, report written)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medloupe.errors import InputError
from medloupe.evaluation import (
    Ablation,
    EvalItem,
    Evaluation,
    compute_metrics,
    filter_items,
    load_dataset,
    score,
)
from medloupe.evaluation.harness import read_records
from medloupe.evaluation.metrics import calibration
from medloupe.evaluation.scoring import canonical, closed_match, first_number, normalise
from medloupe.schemas import GroundedAnswer, Region
from tests.conftest import cli_env

# --- scoring ---------------------------------------------------------------------------------


def answer(text: str | None, *, confidence: float = 0.7, boxes=(), abstained=False):  # type: ignore[no-untyped-def]
    return GroundedAnswer(
        question="q",
        short_answer=None if abstained else text,
        abstained=abstained,
        abstention_reason="no evidence" if abstained else None,
        confidence=0.0 if abstained else confidence,
        regions=[Region(id=f"r{i}", box_xyxy=b, label="x") for i, b in enumerate(boxes)],
    )


def test_closed_answers_fold_synonyms_numbers_and_sides() -> None:
    assert normalise("The Left  Lung.") == "left lung"
    assert canonical("Present") == "yes" and canonical("absent") == "no"
    assert canonical("Just one") == "1" and canonical("two") == "2"
    assert canonical("left-sided") == "left"
    assert closed_match("Yes, there is an effusion on the right.", "yes")
    assert closed_match("No.", "No") and not closed_match("No", "yes")
    assert closed_match("1", "Just one") and closed_match("There are 2 cells", "2")
    assert closed_match("On the right side", "Right") and not closed_match(
        "left and right", "right"
    )
    assert not closed_match("maybe", "yes")
    assert first_number("three lesions") == 3 and first_number("2.5 cm") == 2.5


def test_item_scores_by_task() -> None:
    closed = EvalItem(id="a", image="x", question="q", answer="Yes", answer_type="closed")
    assert score(closed, answer("yes")).correct
    assert not score(closed, answer(None, abstained=True)).correct
    assert score(closed, answer(None, abstained=True)).abstained
    assert not score(closed, None).abstained  # a failed run is not an abstention
    opened = EvalItem(id="b", image="x", question="q", answer="white matter", answer_type="open")
    s = score(opened, answer("the white matter of the brain"))
    assert not s.correct and s.token_recall == 1.0
    box = EvalItem(
        id="c",
        image="x",
        question="q",
        answer="Liver",
        answer_type="box",
        task="grounding",
        boxes_xyxy=[(100, 100, 200, 200)],
    )
    hit = score(box, answer("liver", boxes=[(110, 105, 205, 210)]))
    assert hit.correct and hit.iou == pytest.approx(8550 / 11425) and hit.pointing_hit
    miss = score(box, answer("liver", boxes=[(150, 150, 400, 400)]))
    assert not miss.correct and miss.pointing_hit is False
    count = EvalItem(
        id="d", image="x", question="q", answer="2", answer_type="closed", task="count"
    )
    c = score(count, answer("3 white blood cells"))
    assert not c.correct and c.count_error == 1


def test_metrics_calibration_and_groups() -> None:
    records = [
        {
            "id": "1",
            "task": "vqa",
            "source": "s",
            "modality": "CT",
            "answer_type": "closed",
            "correct": True,
            "abstained": False,
            "confidence": 0.9,
            "latency_s": 1.0,
            "tool_calls": 2,
            "tool_failures": 0,
        },
        {
            "id": "2",
            "task": "vqa",
            "source": "s",
            "modality": "CT",
            "answer_type": "closed",
            "correct": False,
            "abstained": False,
            "confidence": 0.9,
            "latency_s": 3.0,
            "tool_calls": 2,
            "tool_failures": 1,
        },
        {
            "id": "3",
            "task": "vqa",
            "source": "s",
            "modality": "MRI",
            "answer_type": "closed",
            "correct": False,
            "abstained": True,
            "confidence": 0.0,
            "latency_s": 2.0,
            "tool_calls": 0,
            "tool_failures": 0,
        },
    ]
    m = compute_metrics(records)
    o = m["overall"]
    assert o["accuracy"] == pytest.approx(1 / 3) and o["accuracy_answered"] == 0.5
    assert o["abstention_rate"] == pytest.approx(1 / 3)
    assert m["calibration"]["ece"] == pytest.approx(0.4)  # one bin: confidence 0.9, accuracy 0.5
    assert m["runtime"]["latency_p50_s"] == 2.0 and m["runtime"]["tool_failure_rate"] == 0.25
    assert m["by"]["modality"]["CT"]["items"] == 2 and m["by"]["modality"]["MRI"]["answered"] == 0
    assert calibration([])["ece"] is None


# --- importers --------------------------------------------------------------------------------


def test_importers_for_vqa_rad_slake_and_jsonl(tmp_path: Path) -> None:
    img = tmp_path / "images" / "synpic1.jpg"
    img.parent.mkdir()
    Image.new("RGB", (32, 32)).save(img)
    rad = tmp_path / "trainset.json"
    rad.write_text(
        json.dumps(
            [
                {
                    "qid": 7,
                    "image_name": "synpic1.jpg",
                    "image_organ": "CHEST",
                    "answer": "Yes",
                    "answer_type": "CLOSED",
                    "question_type": "PRES",
                    "question": "Is there a mass?",
                },
                {  # VQA-RAD's trainset has two of these, with a trailing space
                    "qid": 8,
                    "image_name": "synpic1.jpg",
                    "answer": "No",
                    "answer_type": "CLOSED ",
                    "question": "Is there a cavity?",
                },
            ]
        )
    )
    item, spaced = load_dataset(rad)
    assert item.id == "vqa_rad-7" and item.answer_type == "closed" and Path(item.image) == img
    assert item.question_type == "PRES"
    assert spaced.answer_type == "closed"

    root = tmp_path / "slake"
    (root / "imgs" / "xmlab5").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "imgs" / "xmlab5" / "source.jpg")
    (root / "imgs" / "xmlab5" / "detection.json").write_text(
        json.dumps([{"Liver": [10, 20, 30, 15]}])
    )
    (root / "splits").mkdir()
    (root / "splits" / "validate.json").write_text(
        json.dumps(
            [
                {
                    "img_name": "xmlab5/source.jpg",
                    "question": "Which organ?",
                    "answer": "Liver",
                    "q_lang": "en",
                    "modality": "CT",
                    "answer_type": "OPEN",
                    "qid": 11,
                },
                {
                    "img_name": "xmlab5/source.jpg",
                    "question": "哪个器官?",
                    "answer": "肝脏",
                    "q_lang": "zh",
                    "modality": "CT",
                    "answer_type": "OPEN",
                    "qid": 12,
                },
            ]
        )
    )
    items = load_dataset(root / "splits" / "validate.json")
    assert [i.task for i in items] == ["vqa", "grounding"]  # Chinese questions left out
    assert items[1].boxes_xyxy == [(10.0, 20.0, 40.0, 35.0)] and items[1].answer == "Liver"

    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(
        json.dumps(
            {
                "id": "m1",
                "image": "images/synpic1.jpg",
                "question": "q",
                "answer": "a",
                "task": "vqa",
                "modality": "CT",
            }
        )
        + "\n"
    )
    (mine,) = load_dataset(jsonl)
    assert Path(mine.image) == img
    jsonl.write_text('{"id": "m1"\n')
    with pytest.raises(InputError, match=r"mine\.jsonl:1"):
        load_dataset(jsonl)
    (tmp_path / "odd.json").write_text("{}")
    with pytest.raises(InputError, match="not a format"):
        load_dataset(tmp_path / "odd.json")


def test_importers_read_the_shared_files(shared_datasets: Path) -> None:
    rad = load_dataset(shared_datasets / "vqa_rad" / "trainset.json")
    assert len(rad) == 3064 and Path(rad[0].image).is_file()
    slake = load_dataset(shared_datasets / "slake" / "splits" / "validate.json")
    grounding = [i for i in slake if i.task == "grounding"]
    assert grounding and all(i.boxes_xyxy for i in grounding)
    dev = load_dataset(shared_datasets / "dev.jsonl")
    assert len(dev) == 166
    assert {i.task for i in filter_items(dev, modality="ct")} >= {"vqa", "grounding"}


def test_mirp_qa_files_are_read_with_their_image_folders(shared_datasets: Path) -> None:
    mirp = shared_datasets / "mirp_sample" / "1_dataset_guide"
    if not mirp.is_dir():
        pytest.skip(f"{mirp} is not in this copy of ../shared")
    plain = load_dataset(mirp / "RQ1" / "qa.json")
    dots = load_dataset(mirp / "RQ2" / "qa_dots.json")
    numbers = load_dataset(mirp / "AS" / "qa_numbers.json")
    for items in (plain, dots, numbers):
        assert len(items) == 10 and all(Path(i.image).is_file() for i in items)
        assert {i.answer for i in items} <= {"yes", "no"} and {i.task for i in items} == {
            "relative_position"
        }
    assert "/RQ2/image_dots/" in dots[0].image and dots[0].question_type == "RQ2 dots"
    assert plain[0].question == "Is the aorta above the spleen?" and plain[0].answer == "yes"
    assert plain[0].points_xy == {"aorta": (272.3134535367545, 276.54091539528434),
                                  "spleen": (292.31620417951353, 367.5964371360055)}  # fmt: skip
    assert set(numbers[0].points_xy or {}) == {"45", "40"}
    assert len({i.id for i in [*plain, *dots, *numbers]}) == 30


# --- the harness --------------------------------------------------------------------------------


def dev_slice(shared: Path) -> list[EvalItem]:
    dev = load_dataset(shared / "dev.jsonl")
    out: list[EvalItem] = []
    for task in ("vqa", "count", "grounding", "classification", "relative_position"):
        out += filter_items(dev, task=task, limit=2 if task == "count" else 1)
    return out


@pytest.mark.slow
def test_harness_on_a_dev_slice(shared_datasets: Path, tmp_path: Path, settings: object) -> None:
    items = dev_slice(shared_datasets)
    out = tmp_path / "eval"
    metrics = asyncio.run(Evaluation(out, workers=2, settings=settings).run(items))  # type: ignore[arg-type]
    records = [json.loads(line) for line in (out / "items.jsonl").open()]
    assert sorted(r["id"] for r in records) == sorted(i.id for i in items)
    o = metrics["overall"]
    assert o["items"] == len(items) and 0.0 <= o["accuracy"] <= 1.0
    assert 0.0 <= o["abstention_rate"] <= 1.0 and o["run_errors"] == 0
    # with no VLM only the cell counter answers: the two count items are answered, cited
    counts = [r for r in records if r["task"] == "count"]
    assert all(not r["abstained"] and "count_cells" in r["tools"] for r in counts)
    assert metrics["overall"]["count_exact"] >= 0.5
    # ... and the grounder tool (no VLM needed) answers localisation questions with a box
    assert all(
        r["abstained"] or (r["task"] == "grounding" and "ground" in r["tools"])
        for r in records
        if r["task"] != "count"
    )
    assert metrics["runtime"]["tool_calls"] > 0 and metrics["runtime"]["latency_p95_s"] > 0
    assert set(metrics["by"]) >= {"source", "task", "modality", "answer_type"}
    # each item is its own run, with its own thread id
    run_ids = {json.loads((out / r["run_dir"] / "run.json").read_text())["run_id"] for r in records}
    assert len(run_ids) == len(records)
    report = (out / "report.html").read_text()
    assert report.count('class="card') == len(items) and "data:image/png;base64" in report
    # resumable: a second run skips finished items and leaves their records alone
    before = (out / "items.jsonl").read_text()
    asyncio.run(Evaluation(out, settings=settings).run(items))  # type: ignore[arg-type]
    assert (out / "items.jsonl").read_text() == before


def test_failures_are_recorded_and_ablations_change_the_graph(
    shared_datasets: Path, tmp_path: Path, settings: object, caplog: pytest.LogCaptureFixture
) -> None:
    item = next(i for i in dev_slice(shared_datasets) if i.task == "count")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad = EvalItem(id="bad", image=str(broken), question="How many?", answer="1", task="count")
    out = tmp_path / "a"
    with caplog.at_level("WARNING", logger="medloupe.evaluation.harness"):
        asyncio.run(Evaluation(out, settings=settings).run([bad, item]))  # type: ignore[arg-type]
    records = {json.loads(line)["id"]: json.loads(line) for line in (out / "items.jsonl").open()}
    assert "CorruptImageError" in records["bad"]["error"] and not records["bad"]["correct"]
    # the input error says what is wrong in one line: no traceback in the log
    (warned,) = [r for r in caplog.records if "item bad failed" in r.getMessage()]
    assert "CorruptImageError" in warned.getMessage() and not warned.exc_info
    assert not records[item.id].get("error")
    no_tools = asyncio.run(
        Evaluation(tmp_path / "b", ablation=Ablation(tools=False), settings=settings).run([item])  # type: ignore[arg-type]
    )
    assert no_tools["runtime"]["tool_calls"] == 0 and no_tools["config"]["ablation"] == "no-tools"
    asyncio.run(
        Evaluation(tmp_path / "c", ablation=Ablation(rethink=False), settings=settings).run([item])  # type: ignore[arg-type]
    )
    rec = json.loads((tmp_path / "c" / "items.jsonl").read_text())
    trace = json.loads((tmp_path / "c" / rec["run_dir"] / "trace.json").read_text())
    assert not [e for e in trace["events"] if e.get("node") == "rethink"]
    assert "crop" not in rec["tools"]


@pytest.mark.slow
def test_eval_cli_ablation_grid(shared_datasets: Path, tmp_path: Path) -> None:
    item = next(i for i in dev_slice(shared_datasets) if i.task == "count")
    dataset = tmp_path / "one.jsonl"
    dataset.write_text(json.dumps({**item.model_dump(mode="json")}) + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medloupe",
            "eval",
            str(dataset),
            "--out",
            str(tmp_path / "o"),
            "--ablate",
        ],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path / "home"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "o" / "comparison.md").read_text()
    for name in ("full", "no-tools", "no-retrieval", "no-rethink"):
        assert f"| {name} |" in table
    comparison = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert comparison["no-tools"]["runtime"]["tool_calls"] == 0
    assert comparison["full"]["runtime"]["tool_calls"] > 0
    paired = comparison["no-rethink"]["paired"]
    assert paired["against"] == "full" and paired["seed"] == 0
    overall = next(
        d for d in paired["differences"] if d["group"] == "overall" and d["measure"] == "accuracy"
    )
    assert overall["items"] == 1 and overall["p_value"] is not None
    assert "### no-tools vs full" in (tmp_path / "o" / "paired.md").read_text()
    assert "McNemar" in proc.stdout
    empty = subprocess.run(
        [
            sys.executable,
            "-m",
            "medloupe",
            "eval",
            str(dataset),
            "--out",
            str(tmp_path / "p"),
            "--task",
            "grounding",
        ],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path / "home"),
        timeout=120,
    )
    assert empty.returncode == 2 and "no items" in empty.stderr


def test_dev_slice_image_exists(shared_datasets: Path) -> None:
    for item in dev_slice(shared_datasets):
        assert np.asarray(Image.open(item.image)).size > 0


def test_answered_items_are_scored_and_calibrated_with_a_fake_vlm(
    shared_datasets: Path, tmp_path: Path, settings: object
) -> None:
    """Orchestration only: a scripted FAKE backend always answers "yes" with confidence 0.8,
    so the answered-item path of scoring and calibration can be checked exactly."""
    from medloupe.agents.roles import AnswerDraft
    from medloupe.testing.fakes import ScriptedFakeVLM, evidence_ids_in

    def always_yes(messages, n):  # type: ignore[no-untyped-def]
        ids = evidence_ids_in(messages)
        return AnswerDraft(
            short_answer="yes",
            confidence=0.8,
            claims=[{"text": "scripted", "evidence_ids": ids[:1]}],  # type: ignore[list-item]
        )

    dev = load_dataset(shared_datasets / "dev.jsonl")
    closed = [i for i in dev if i.answer_type == "closed" and i.task == "vqa"][:4]
    fake = ScriptedFakeVLM(answer=always_yes)
    metrics = asyncio.run(
        Evaluation(tmp_path / "e", vlm=fake, settings=settings).run(closed)  # type: ignore[arg-type]
    )
    truth_yes = sum(1 for i in closed if canonical(i.answer) == "yes")
    o = metrics["overall"]
    assert o["answered"] == len(closed) and o["abstention_rate"] == 0.0
    assert o["accuracy"] == pytest.approx(truth_yes / len(closed))
    assert metrics["calibration"]["ece"] == pytest.approx(abs(0.8 - truth_yes / len(closed)))
    assert metrics["config"]["vlm"] == "fake:scripted"
    assert sum(1 for role, _ in fake.calls if role == "answer") == len(closed)
    for record in read_records(tmp_path / "e" / "items.jsonl"):
        run_json = json.loads((tmp_path / "e" / record["run_dir"] / "run.json").read_text())
        assert run_json["vlm"] == "fake:scripted"  # the backend that ran, as the trace says
        trace = json.loads((tmp_path / "e" / record["run_dir"] / "trace.json").read_text())
        assert trace["meta"]["vlm"] == "fake:scripted"
