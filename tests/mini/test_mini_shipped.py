"""The medloupe-mini shipped in the package: the default VLM when none is configured (and
said so in the provenance), the ``ground`` tool, and ``medloupe serve-vlm mini`` over the
OpenAI-compatible API (real uvicorn on loopback, real weights)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from medloupe.agents.protocol import ChatMessage, ImagePart, TextPart, resolve_vlm
from medloupe.config import Settings
from medloupe.mini import BUNDLED
from medloupe.mini.tool import GroundTool, target_from_question
from tests.conftest import cli_env
from tests.service_helpers import free_port


def test_the_checkpoints_ship_in_the_package_within_budget() -> None:
    files = {p.name: p.stat().st_size for p in BUNDLED.iterdir() if p.is_file()}
    shipped = {"answerer.pt", "yesno.pt", "answerer.json", "grounder.pt", "grounder.json",
               "orientation.pt", "orientation.json"}
    assert shipped | {"MODEL_CARD.md"} <= set(files)
    assert sum(files.values()) < 25 * 1024 * 1024
    card = (BUNDLED / "MODEL_CARD.md").read_text()
    for needle in (
        "CC0 1.0",
        "CC BY 4.0",
        "BCCD",
        "ChestX-ray14",
        "test split",
        "not a medical device",
    ):
        assert needle in card


def test_default_vlm_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDLOUPE_VLM", raising=False)
    assert resolve_vlm(None) == ("mini:", True)
    assert resolve_vlm("none") == (None, False)
    assert resolve_vlm("openai:http://h/v1#m") == ("openai:http://h/v1#m", False)
    monkeypatch.setenv("MEDLOUPE_VLM", "None")
    assert resolve_vlm(None) == (None, False)
    monkeypatch.setenv("MEDLOUPE_VLM", "mini:/somewhere")
    assert resolve_vlm(None) == ("mini:/somewhere", False)
    assert resolve_vlm("mini") == ("mini", False)


@pytest.mark.parametrize(
    ("question", "target"),
    [
        ("Locate the liver in this CT image and give its bounding box.", "liver"),
        ("This chest X-ray shows pneumonia. Locate it and give its bounding box.", "pneumonia"),
        ("Where is the left kidney?", "left kidney"),
        ("Find the white blood cell.", "white blood cell"),
        ("Give the bounding box of the nodule in this image", "nodule"),
        ("Is there a pneumothorax?", None),
        ("Locate it.", None),
    ],
)
def test_target_from_question(question: str, target: str | None) -> None:
    assert target_from_question(question) == target


def _ask_json(tmp_path: Path, image: Path, question: str, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "medloupe", "ask", str(image), question, "--json", *extra],
        capture_output=True, text=True, env={**cli_env(tmp_path / "home"), "MEDLOUPE_VLM": ""},
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_ask_uses_the_shipped_mini_by_default_and_says_so(chest_dcm: Path, tmp_path: Path) -> None:
    closed = _ask_json(tmp_path, chest_dcm, "Is there a pleural effusion?")
    prov = closed["provenance"]
    assert prov["vlm"] == "mini:" and prov["vlm_default"] is True
    assert prov["answer_source"] == "vlm" and closed["short_answer"] in ("yes", "no")
    assert 0.0 < closed["confidence"] <= 1.0 and closed["claims"]
    # the header states the modality outright: the short-answer model defers to it
    header = _ask_json(tmp_path, chest_dcm, "What imaging modality is this?")
    assert header["provenance"]["vlm_default"] is True
    assert header["provenance"]["answer_source"] == "evidence-composer"
    assert "radiography" in header["short_answer"] and "mini:" in header["explanation"]
    trace = json.loads((Path(header["run_dir"]) / "trace.json").read_text())
    assert {e["node"] for e in trace["events"] if e["kind"] == "model_call"} >= {"think", "rethink"}
    off = _ask_json(tmp_path, chest_dcm, "Is there a pleural effusion?", "--vlm", "none")
    assert off["abstained"] and off["provenance"]["vlm"] is None
    assert off["provenance"]["vlm_default"] is False


def test_questions_about_the_kind_of_image_are_answered_by_the_open_question(
    chest_dcm: Path, ct_dcm: Path
) -> None:
    from medloupe.io import load_image
    from medloupe.mini.answerer import MiniAnswerer

    answerer = MiniAnswerer(BUNDLED)
    chest, ct = load_image(chest_dcm).rgb(), load_image(ct_dcm).rgb()
    for rgb, question, answer in [
        (chest, "Is this an X-ray?", "yes"),
        (chest, "Is this a CT scan?", "no"),
        (chest, "Is this a study of the chest?", "yes"),
        (ct, "Is this a CT scan?", "yes"),
        (ct, "Is this an X-ray?", "no"),
        (ct, "Is this an axial image?", "yes"),
    ]:
        p = answerer.predict(rgb, question)
        assert (p.answer, p.basis is not None) == (answer, True), (question, p)
    assert "modality X-ray" in str(answerer.predict(chest, "Is this an MRI?").basis)
    # a yes/no question about anything else goes to the gated experts
    assert answerer.predict(chest, "Is there a pleural effusion?").basis is None


def test_the_body_region_is_read_by_its_classifier_on_vqa_rad_images(
    shared_datasets: Path,
) -> None:
    """The head, asked SLAKE's region question, called these VQA-RAD dev images (never trained
    on) chest; the region classifier reads each as the region VQA-RAD states."""
    from medloupe.io import load_image
    from medloupe.mini.answerer import MiniAnswerer

    answerer = MiniAnswerer(BUNDLED)
    assert "region" in answerer.meta["attributes"]
    images = shared_datasets / "vqa_rad" / "images"
    for name, region in [
        ("synpic39460.jpg", "head"),  # axial T2 brain MRI
        ("synpic46943.jpg", "head"),
        ("synpic43433.jpg", "abdomen"),
        ("synpic45115.jpg", "abdomen"),
    ]:
        rgb = load_image(images / name).rgb()
        read = answerer.attribute(rgb, "region")
        assert read is not None and read[0] == region and read[1] > 0.8, (name, read)
    brain = load_image(images / "synpic39460.jpg").rgb()
    said = answerer.predict(brain, "Is this the brain?")
    assert said.answer == "yes" and "region head" in str(said.basis)


def _dev_item(datasets: Path, question_start: str) -> dict:
    for line in (datasets / "dev.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["question"].startswith(question_start):
            return row
    raise AssertionError(question_start)


def test_ground_tool_boxes_an_organ(shared_datasets: Path, tmp_path: Path) -> None:
    from medloupe.artifacts import ArtifactStore
    from medloupe.evaluation.scoring import iou
    from medloupe.io import load_image
    from medloupe.runner import ingest_image
    from medloupe.tools.base import ToolContext

    item = _dev_item(shared_datasets, "Locate the liver in this CT image")
    tool = GroundTool()
    assert tool.available().ok
    store = ArtifactStore(tmp_path / "s")
    record = ingest_image(load_image(shared_datasets / item["image"]), store)
    suggested = tool.suggest(item["question"], record)
    assert suggested == [{"target": "Liver", "modality": "CT"}]
    args = suggested[0]
    out = tool.run(tool.input_model.model_validate(args), ToolContext(image=record, store=store))
    assert out.label == "Liver" and out.modality == "CT" and out.boxes
    assert max(iou(out.boxes[0].box_xyxy, tuple(t)) for t in item["boxes_xyxy"]) >= 0.5
    assert 0.0 < out.confidence < 1.0 and out.regions[0].box_xyxy == out.boxes[0].box_xyxy
    assert tool.suggest("Where is the abnormality?", record) is None  # not a trained target
    # an organ the question names, whatever it asks of it; both sides of a bare "lung"
    named = tool.suggest("Does the liver look abnormal in this CT?", record)
    assert named == [{"target": "Liver", "modality": "CT"}]
    assert tool.targets("Is the lung healthy?") == ["Left Lung", "Right Lung"]
    assert tool.targets("Where is the liver cancer? Is the liver enlarged?") == [
        "Liver Cancer",
        "Liver",
    ]
    assert tool.targets("Locate the spleen next to the liver") == ["Spleen", "Liver"]
    with pytest.raises(ValueError, match="nearest targets it knows"):
        tool.run(
            tool.input_model.model_validate({"target": "banana peel"}),
            ToolContext(image=record, store=store),
        )


@pytest.mark.slow
def test_grounding_question_through_the_graph(shared_datasets: Path, tmp_path: Path) -> None:
    from medloupe.evaluation.scoring import iou

    item = _dev_item(shared_datasets, "Locate the liver in this CT image")
    answer = _ask_json(tmp_path, shared_datasets / item["image"], item["question"])
    assert answer["provenance"]["vlm_default"] and "ground" in answer["provenance"]["tools"]
    assert answer["short_answer"].startswith("Liver: [")
    first = tuple(answer["regions"][0]["box_xyxy"])
    assert max(iou(first, tuple(t)) for t in item["boxes_xyxy"]) >= 0.5
    (claim,) = [c for c in answer["claims"] if "grounder" in c["text"]]
    assert claim["evidence_ids"]


def test_a_size_comparison_is_measured_from_the_grounders_boxes(
    shared_datasets: Path, tmp_path: Path
) -> None:
    """SLAKE dev item (pelvic CT): the rule-based plan grounds every option and the answer is
    the one whose box covers most, citing all three boxes (the head alone said "rectum")."""
    item = _dev_item(shared_datasets, "Which is the biggest in this image, bladder, small bowel")
    answer = _ask_json(tmp_path, shared_datasets / item["image"], item["question"])
    assert answer["provenance"]["answer_source"] == "evidence-composer"
    assert answer["short_answer"] == "bladder" == item["answer"].lower()
    (claim,) = answer["claims"]
    assert "the bladder is the largest" in claim["text"] and len(claim["evidence_ids"]) == 3
    assert [r["label"] for r in answer["regions"][:3]] == ["Bladder 1", "Small Bowel 1", "Rectum 1"]
    assert 1 / 3 < answer["confidence"] < 0.95


def _png_data_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chest_rgb(chest_dcm: Path) -> np.ndarray:
    from medloupe.io import load_image

    px = load_image(chest_dcm).display
    return np.repeat(px[..., None], 3, axis=2) if px.ndim == 2 else px


@pytest.mark.slow
def test_serve_vlm_mini_speaks_the_openai_api(chest_dcm: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medloupe", "serve-vlm", "mini", "--port", str(port)],
        env=cli_env(tmp_path / "home"), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        assert httpx.get(base + "/models").json()["data"][0]["id"] == "medloupe-mini"
        image = {"type": "image_url", "image_url": {"url": _png_data_uri(_chest_rgb(chest_dcm))}}

        def chat(content: list, **extra: object) -> httpx.Response:
            body = {"model": "medloupe-mini", "messages": [{"role": "user", "content": content}]}
            return httpx.post(base + "/chat/completions", json={**body, **extra}, timeout=60)

        text = chat([{"type": "text", "text": "Is there a pleural effusion?"}, image])
        assert text.status_code == 200, text.text
        assert text.json()["choices"][0]["message"]["content"] in ("yes", "no")
        schema = {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
            "required": ["answer", "confidence"],
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        js = chat([{"type": "text", "text": "Question: Is the heart enlarged?"}, image],
                  response_format=fmt)  # fmt: skip
        reply = json.loads(js.json()["choices"][0]["message"]["content"])
        assert reply["answer"] in ("yes", "no") and 0.0 < reply["confidence"] <= 1.0
        no_image = chat([{"type": "text", "text": "Is there a pleural effusion?"}])
        assert no_image.status_code == 400 and "image_url" in no_image.json()["error"]["message"]
        schema2 = {**schema, "properties": {**schema["properties"], "findings": {}},
                   "required": ["answer", "findings"]}  # fmt: skip
        fmt2 = {"type": "json_schema", "json_schema": {"name": "b", "schema": schema2}}
        bad = chat([{"type": "text", "text": "Is it normal?"}, image], response_format=fmt2)
        assert bad.status_code == 400 and "findings" in bad.json()["error"]["message"]
        # medloupe's own OpenAI client talks to it
        from medloupe.agents.protocol import load_backend
        from medloupe.artifacts import ArtifactStore

        store = ArtifactStore(tmp_path / "store")
        aid = store.put_png(_chest_rgb(chest_dcm))
        msgs = [ChatMessage(role="user", content=[ImagePart(artifact=aid),
                                                  TextPart(text="Is there a pneumothorax?")])]  # fmt: skip
        client = load_backend(f"openai:{base}#medloupe-mini")
        gen = asyncio.run(client.generate(msgs, store=store))
        assert gen.text in ("yes", "no")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_only_box_requests_are_answered_with_a_box() -> None:
    from medloupe.mini.tool import asks_for_box

    assert asks_for_box("Locate the liver in this CT image and give its bounding box.")
    assert asks_for_box("This chest X-ray shows nodule. Locate it and give its bounding box.")
    assert not asks_for_box("Where is the spleen in this image, right or lower right?")


def test_presence_wording() -> None:
    from medloupe.mini.backend import presence_name, presupposes

    assert presupposes("Does the liver look abnormal?")
    assert presupposes("Is the left lung healthy?")
    for q in (
        "Does the picture contain liver?",
        "Is there a liver?",
        "Where is the liver?",
        "Is the liver to the left of the spleen?",
        "Locate the liver.",
    ):
        assert not presupposes(q), q
    assert presence_name("Left Lung") == "lung" and presence_name("Liver") == "liver"


@pytest.mark.slow
def test_the_second_look_withholds_when_the_organ_asked_about_is_not_in_view(
    shared_datasets: Path, tmp_path: Path, settings: Settings
) -> None:
    """A SLAKE chest CT slice (xmlab112; SLAKE: "Does the picture contain liver?" -> No):
    asked how the liver looks, medloupe-mini grounds the liver, checks it is in view, finds it
    is not and abstains with the reason; asked about the lung, it answers."""
    from medloupe import ask

    image = shared_datasets / "slake/imgs/xmlab112/source.jpg"
    liver = ask(
        image, "Does the liver look abnormal?", out=tmp_path / "a", vlm="mini:", settings=settings
    )
    assert liver.abstained and "liver does not appear to be in view" in liver.abstention_reason
    trace = json.loads((tmp_path / "a" / "trace.json").read_text())
    called = [e["name"] for e in trace["events"] if e["kind"] == "tool_call"]
    assert "ground" in called
    lung = ask(image, "Is the lung healthy?", out=tmp_path / "b", vlm="mini:", settings=settings)
    assert not lung.abstained and lung.short_answer
