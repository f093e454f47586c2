"""Text embedder backends: the int8 ONNX Runtime export of the bundled MiniLM against
PyTorch's own vectors on real textbook passages, its cache, the manifest naming the backend
queries use, and the fall-back to torch with the reason."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx as onnx_format
import pytest

from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base import KnowledgeBase, build_kb, embedders
from medloupe.knowledge_base.embedders import TextEmbedder, resolve_backend
from medloupe.knowledge_base.loaders import LoadReport, load_openstax
from medloupe.knowledge_base.onnx_text import UNFUSED_OPS
from tests.conftest import SHARED

OPENSTAX = SHARED / "textbooks" / "openstax-ap2e"


@pytest.fixture(scope="module")
def passages() -> list[str]:
    if not OPENSTAX.is_dir():
        pytest.skip(f"the shared OpenStax book is absent ({OPENSTAX})")
    texts = [p.text for p in load_openstax(OPENSTAX, LoadReport())]
    return texts[::40][:100]  # spread over the book, short to long


@pytest.mark.slow
def test_int8_onnx_vectors_agree_with_torch_and_the_export_is_cached(
    passages: list[str], tmp_path: Path
) -> None:
    onnx = TextEmbedder(backend="onnx-int8", cache_dir=tmp_path)
    got = onnx.encode(passages)
    assert onnx.backend == "onnx-int8"
    ref = TextEmbedder(backend="torch").encode(passages)
    cos = (got * ref).sum(1)
    assert cos.min() > 0.97 and cos.mean() > 0.99, (cos.min(), cos.mean())
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the nearest neighbour of a passage among the others is mostly the same with both (the
    # book's labelled retrieval set is in benchmarks/bench_kb.py)
    sim_a, sim_b = got @ got.T, ref @ ref.T
    np.fill_diagonal(sim_a, -1)
    np.fill_diagonal(sim_b, -1)
    assert (sim_a.argmax(1) == sim_b.argmax(1)).mean() >= 0.85
    (export,) = tmp_path.iterdir()
    # the fused attention, skip-layer-norm and bias-GELU kernels ran slower on CPU: left out
    ops = {n.op_type for n in onnx_format.load(str(export / "model.int8.onnx")).graph.node}
    assert ops.isdisjoint(UNFUSED_OPS) and {"LayerNormalization", "Gelu"} <= ops, ops
    stamp = (export / "model.int8.onnx").stat().st_mtime_ns
    again = TextEmbedder(backend="onnx-int8", cache_dir=tmp_path)
    assert (again.encode(passages[:5]) * got[:5]).sum(1).min() > 0.98
    assert (export / "model.int8.onnx").stat().st_mtime_ns == stamp  # not exported again


def test_order_of_texts_is_kept_and_a_vector_does_not_depend_on_its_company() -> None:
    texts = ["a much longer sentence about the liver and its lobes " * 5, "spleen", "kidney"] * 3
    emb = TextEmbedder(backend="onnx-int8")  # the session's cache
    together = emb.encode(texts, batch_size=2)
    alone = np.concatenate([emb.encode([t]) for t in texts])
    # one text per run (int8 activations are scaled per run), runs in parallel: the same
    # vectors, bit for bit, as each text embedded alone, in the order given
    assert np.array_equal(together, alone)
    assert np.array_equal(together[0], together[3]) and not np.allclose(together[0], together[1])


def test_a_kb_records_its_backend_and_queries_with_it(tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text(
        "# Liver\n\nThe liver has four lobes.\n\n# Spleen\n\nThe spleen filters blood.\n"
    )
    build_kb([notes], tmp_path / "kb", image_embedder=None)  # backend auto
    kb = KnowledgeBase(tmp_path / "kb")
    assert kb.manifest["text_embedder"]["backend"] == resolve_backend("auto") == "onnx-int8"
    assert kb.embedder.backend == "onnx-int8"
    assert kb.search_sync("which organ filters blood", k=1)[0].section == "Spleen"


def test_without_onnx_runtime_the_torch_backend_is_used_and_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embedders, "onnx_available", lambda: False)
    assert resolve_backend("auto") == "torch"
    emb = TextEmbedder(backend="onnx-int8")
    with caplog.at_level(logging.WARNING):
        vec = emb.encode(["the liver"])
    assert emb.backend == "torch" and vec.shape == (1, 384)
    assert "needs onnx and onnxruntime" in caplog.text
    with pytest.raises(KnowledgeBaseError, match="unknown text backend 'tensorrt'"):
        TextEmbedder(backend="tensorrt")
