"""Segmentation: weight resolution, the SAM/MedSAM engines (real segment-anything classes with
tiny random weights), the embedding cache, the classical segmenter and the `segment` tool."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medloupe.artifacts import ArtifactStore
from medloupe.errors import ChecksumError, WeightsMissingError
from medloupe.io import load_image
from medloupe.runner import ingest_image
from medloupe.tools import ToolContext, ToolRegistry, default_registry
from medloupe.tools.classical import ClassicalSegmenter
from medloupe.tools.measures import mask_measures
from medloupe.tools.sam import (
    SAM_MODELS,
    EmbeddingCache,
    SamEngine,
    SamModelSpec,
    build_sam_model,
)
from medloupe.tools.segment import SegmentTool
from medloupe.tools.weights import WeightFile, weights_dir

# the same builder as sam_vit_b/l/h (segment-anything's _build_sam), a tiny encoder
TINY = SamModelSpec("sam_tiny", 32, 2, 2, (1,), None)
TINY_MEDSAM = SamModelSpec("medsam_tiny", 32, 2, 2, (1,), None, "medsam")


def make_ctx(path: Path, tmp_path: Path) -> ToolContext:
    store = ArtifactStore(tmp_path / "run")
    return ToolContext(image=ingest_image(load_image(path), store), store=store)


def call(reg: ToolRegistry, name: str, args: dict, ctx: ToolContext):  # type: ignore[no-untyped-def]
    return asyncio.run(reg.call(name, args, ctx, default_timeout_s=120))


def disk_image(h: int = 120, w: int = 160, r: int = 30) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 40, np.uint8)
    img[(yy - 60) ** 2 + (xx - 80) ** 2 <= r * r] = 200
    return img


# --- weights --------------------------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def file_server() -> Iterator[str]:
    _Files.payload = b"pretend checkpoint bytes" * 100
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/w.pth"
    server.shutdown()


def test_weight_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wf = WeightFile(filename="w-order.pth", name="test_w", how_to_get="ask a friend")
    monkeypatch.delenv("MEDLOUPE_TEST_W", raising=False)
    with pytest.raises(WeightsMissingError, match=r"MEDLOUPE_TEST_W.*ask a friend"):
        wf.resolve()
    cached = weights_dir() / "w-order.pth"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"c")
    assert wf.resolve() == cached
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"e")
    monkeypatch.setenv("MEDLOUPE_TEST_W", str(env_file))
    assert wf.resolve() == env_file
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"x")
    assert wf.resolve(explicit) == explicit
    # a typo in a given path is an error, not a silent fall-back to the cache
    with pytest.raises(WeightsMissingError, match="is not a file"):
        wf.resolve(tmp_path / "typo.pth")
    cached.unlink()


def test_download_verifies_sha256(file_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MEDLOUPE_OFFLINE", raising=False)
    good = hashlib.sha256(_Files.payload).hexdigest()
    wf = WeightFile("dl-good.pth", "test_dl", url=file_server, sha256=good)
    path = wf.resolve(download=True)
    assert path.read_bytes() == _Files.payload and path.parent == weights_dir()
    bad = WeightFile("dl-bad.pth", "test_dl", url=file_server, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="discarded"):
        bad.resolve(download=True)
    assert not (weights_dir() / "dl-bad.pth").exists()
    assert not list(weights_dir().glob(".dl-bad*"))  # no partial file left behind
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = WeightFile("dl-off.pth", "test_dl", url=file_server, sha256=good)
    with pytest.raises(WeightsMissingError, match="downloads are off"):
        offline.resolve(download=True)


def test_published_sam_checkpoints_are_pinned() -> None:
    for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        w = SAM_MODELS[name].weights
        assert w is not None and w.url and w.sha256 and len(w.sha256) == 64
    medsam = SAM_MODELS["medsam_vit_b"]
    assert medsam.preprocessing == "medsam" and medsam.weights is not None
    assert "MedSAM" in medsam.weights.how_to_get


# --- SAM engines -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(build_sam_model(TINY).state_dict(), path)
    return path


def test_two_phase_api_boxes_points_and_cache(tiny_sam_checkpoint: Path) -> None:
    engine = SamEngine(TINY, checkpoint=tiny_sam_checkpoint, device="cpu")
    img = disk_image()
    first = engine.set_image(img)
    assert first.size == (120, 160)
    masks = first.predict(boxes=[(40, 20, 120, 100), (0, 0, 50, 50)])
    assert len(masks) == 2
    assert all(m.mask.shape == (120, 160) and m.mask.dtype == bool for m in masks)
    assert all(0.0 <= m.score <= 1.0 for m in masks)
    (pm,) = first.predict(points=[(80, 60)], point_labels=[1])
    assert pm.mask.shape == (120, 160)
    both = first.predict(boxes=[(40, 20, 120, 100)], points=[(80, 60), (5, 5)], point_labels=[1, 0])
    assert len(both) == 1
    # further prompts on the same image skip the encoder
    again = engine.set_image(img.copy())
    assert engine.encoder_runs == 1 and engine.cache.hits >= 1
    np.testing.assert_array_equal(again.predict(boxes=[(40, 20, 120, 100)])[0].mask, masks[0].mask)
    with pytest.raises(ValueError, match="at most one box"):
        first.predict(boxes=[(0, 0, 5, 5), (5, 5, 9, 9)], points=[(2, 2)])
    with pytest.raises(ValueError, match="uint8 RGB"):
        engine.set_image(img[..., 0])


def test_embedding_cache_is_bounded_and_safe_under_concurrency(tiny_sam_checkpoint: Path) -> None:
    engine = SamEngine(TINY, checkpoint=tiny_sam_checkpoint, device="cpu", cache=EmbeddingCache(1))
    img = disk_image()
    threads = [threading.Thread(target=engine.set_image, args=(img,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.encoder_runs == 1  # six concurrent callers, one encoder pass
    engine.set_image(disk_image(r=10))  # evicts the first (capacity 1)
    assert len(engine.cache) == 1
    engine.set_image(img)
    assert engine.encoder_runs == 3


def test_medsam_preprocessing_frame(tiny_sam_checkpoint: Path) -> None:
    engine = SamEngine(TINY_MEDSAM, checkpoint=tiny_sam_checkpoint, device="cpu")
    image = engine.set_image(disk_image())
    assert image.embedding.input_size == (1024, 1024)  # MedSAM: a square 1024 resize
    (m,) = image.predict(boxes=[(40, 20, 120, 100)])
    assert m.mask.shape == (120, 160)
    sam_image = SamEngine(TINY, checkpoint=tiny_sam_checkpoint, device="cpu").set_image(
        disk_image()
    )
    assert sam_image.embedding.input_size == (768, 1024)  # SAM: longest side 1024, aspect kept


def test_wrong_checkpoint_is_named(tmp_path: Path) -> None:
    import torch

    other = tmp_path / "other.pth"
    torch.save({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ValueError, match="does not fit sam_tiny"):
        build_sam_model(TINY, other)


def test_checkpoint_found_through_the_registry_and_env(
    tiny_sam_checkpoint: Path, ct_dcm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SamModelSpec(
        "sam_tiny", 32, 2, 2, (1,), WeightFile("sam_tiny.pth", "test_sam_tiny")
    )
    tool = SegmentTool({"sam_tiny": spec}, device="cpu")
    assert "classical segmenter only" in tool.available().reason
    monkeypatch.setenv("MEDLOUPE_TEST_SAM_TINY", str(tiny_sam_checkpoint))
    assert tool.available().reason.startswith("ready: sam_tiny")
    reg = ToolRegistry([tool])
    ctx = make_ctx(ct_dcm, tmp_path)
    ev = call(reg, "segment", {"boxes_xyxy": [[100, 100, 300, 300]]}, ctx)
    assert ev.status == "ok", ev.error
    assert ev.output["model"] == "sam_tiny"
    # the loaded weights are the checkpoint's: same masks as an engine built from the file
    direct = SamEngine(TINY, checkpoint=tiny_sam_checkpoint, device="cpu")
    (expected,) = direct.set_image(ctx.rgb()).predict(boxes=[(100, 100, 300, 300)])
    got = ctx.store.load(ev.output["masks"][0]["mask_artifact"]) > 0
    np.testing.assert_array_equal(got, expected.mask)


# --- the segment tool -------------------------------------------------------------------------


def test_segment_classical_on_real_ct(ct_dcm: Path, tmp_path: Path) -> None:
    reg = default_registry(plugins=False)
    ctx = make_ctx(ct_dcm, tmp_path)
    ev = call(reg, "segment", {"boxes_xyxy": [[150, 150, 350, 350]], "label": "body"}, ctx)
    assert ev.status == "ok", ev.error
    out = ev.output
    assert out["model"] == "classical"  # no SAM checkpoint on this machine
    (m,) = out["masks"]
    assert m["method"] == "classical:box-otsu"
    assert m["area_mm2"] == pytest.approx(m["area_px"] * 0.478516**2, rel=1e-4)
    assert m["perimeter_mm"] is not None and m["max_diameter_mm"] > 0
    region = ev.regions[0]
    assert region.mask_artifact == m["mask_artifact"] and region.label == "body"
    mask = ctx.store.load(m["mask_artifact"])
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}


def test_segment_bad_prompts_fail_clearly(
    ct_dcm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = default_registry(plugins=False)
    ctx = make_ctx(ct_dcm, tmp_path)
    outside = call(reg, "segment", {"boxes_xyxy": [[600, 600, 700, 700]]}, ctx)
    assert outside.status == "error" and "outside" in outside.error
    border = call(reg, "segment", {"points_xy": [[0, 200]]}, ctx)
    assert border.status == "error" and "border" in border.error
    normalised = call(reg, "segment", {"points_xy": [[0.5, 0.5]]}, ctx)
    assert normalised.status == "error" and "normalised" in normalised.error
    none = call(reg, "segment", {}, ctx)
    assert none.status == "error" and "at least one box" in none.error
    unknown = call(reg, "segment", {"boxes_xyxy": [[1, 1, 9, 9]], "model": "sam_vit_x"}, ctx)
    assert unknown.status == "error" and "sam_vit_b" in unknown.error  # the choices are listed
    # a flat region gives nothing to separate: an empty mask is an error, not a silent success
    flat = np.full((64, 64, 3), 90, np.uint8)
    from PIL import Image

    Image.fromarray(flat).save(tmp_path / "flat.png")
    fctx = make_ctx(tmp_path / "flat.png", tmp_path / "f")
    empty = call(reg, "segment", {"boxes_xyxy": [[10, 10, 50, 50]]}, fctx)
    assert empty.status == "error" and "empty" in empty.error
    # a named SAM model without weights (offline): the error says how to provide them
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEDLOUPE_SAM_VIT_B", raising=False)
    named = call(reg, "segment", {"boxes_xyxy": [[100, 100, 300, 300]], "model": "sam_vit_b"}, ctx)
    assert named.status == "error"
    assert "sam_vit_b_01ec64.pth" in named.error and "MEDLOUPE_SAM_VIT_B" in named.error


def test_classical_point_prompt_grows_the_region() -> None:
    img = disk_image()
    (m,) = ClassicalSegmenter().set_image(img).predict(points=[(80, 60)])
    truth = img[..., 0] == 200
    dice = 2 * (m.mask & truth).sum() / (m.mask.sum() + truth.sum())
    assert dice > 0.95 and m.method == "classical:region-growing"
    (g,) = (
        ClassicalSegmenter()
        .set_image(img)
        .predict(boxes=[(40, 20, 120, 100)], points=[(80, 60), (45, 25)], point_labels=[1, 0])
    )
    assert g.method == "classical:grabcut"
    assert 2 * (g.mask & truth).sum() / (g.mask.sum() + truth.sum()) > 0.9


def test_classical_segmenter_on_slake_ct_liver(shared_datasets: Path) -> None:
    from PIL import Image

    items = [json.loads(line) for line in (shared_datasets / "dev.jsonl").open()]
    item = next(i for i in items if i["id"] == "D0100-slake-grounding")  # liver, CT
    rgb = np.asarray(Image.open(shared_datasets / item["image"]).convert("RGB"))
    labels = np.asarray(Image.open(shared_datasets / item["mask"]).convert("L"))
    x0, y0, x1, y1 = (round(v) for v in item["boxes_xyxy"][0])
    truth = np.zeros(labels.shape, bool)
    truth[y0:y1, x0:x1] = labels[y0:y1, x0:x1] > 0
    (m,) = ClassicalSegmenter().set_image(rgb).predict(boxes=[item["boxes_xyxy"][0]])
    dice = 2 * (m.mask & truth).sum() / (m.mask.sum() + truth.sum())
    box_only = 2 * truth.sum() / ((x1 - x0) * (y1 - y0) + truth.sum())
    assert dice > 0.9 and dice > box_only


# --- measures ---------------------------------------------------------------------------------


def test_mask_measures_of_a_disk() -> None:
    img = disk_image(r=30)
    mask = img[..., 0] == 200
    px = mask_measures(mask, None)
    assert px.area_px == mask.sum() and px.area_mm2 is None
    assert px.max_diameter_px == pytest.approx(61, abs=1.5)
    assert px.perimeter_px == pytest.approx(2 * np.pi * 30, rel=0.1)
    mm = mask_measures(mask, (0.5, 0.5))
    assert mm.area_mm2 == pytest.approx(px.area_px * 0.25)
    assert mm.max_diameter_mm == pytest.approx(px.max_diameter_px * 0.5, rel=0.02)
    assert px.components == 1 and px.box_xyxy == (50.0, 30.0, 111.0, 91.0)
    with pytest.raises(ValueError, match="empty"):
        mask_measures(np.zeros((4, 4), bool), None)


def test_measure_tool_takes_a_mask_from_segment(ct_dcm: Path, tmp_path: Path) -> None:
    reg = default_registry(plugins=False)
    ctx = make_ctx(ct_dcm, tmp_path)
    seg = call(reg, "segment", {"boxes_xyxy": [[150, 150, 350, 350]]}, ctx)
    art = seg.output["masks"][0]["mask_artifact"]
    ev = call(reg, "measure", {"mask_artifact": art}, ctx)
    assert ev.status == "ok" and ev.output["unit"] == "mm"
    assert ev.output["area"] == pytest.approx(seg.output["masks"][0]["area_mm2"])
    assert ev.output["max_diameter"] == pytest.approx(seg.output["masks"][0]["max_diameter_mm"])
    bad = call(reg, "measure", {"mask_artifact": "mask-0000000000000000.png"}, ctx)
    assert bad.status == "error" and "no artifact" in bad.error
    two = call(reg, "measure", {"mask_artifact": art, "box_xyxy": [0, 0, 5, 5]}, ctx)
    assert two.status == "error" and "exactly one" in two.error
