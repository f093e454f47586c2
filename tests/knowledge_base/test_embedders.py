"""Text embedder backends: the int8 ONNX Runtime export of the bundled MiniLM against
PyTorch's own vectors on real textbook passages, its cache, the manifest naming the backend
queries use, and the fall-back to torch with the reason."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx as onnx_format
import pytest

from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base import KnowledgeBase, build_kb, embedders
from medloupe.knowledge_base.embedders import TextEmbedder, resolve_backend
from medloupe.knowledge_base.loaders import LoadReport, load_openstax
from medloupe.knowledge_base.onnx_text import UNFUSED_OPS, OnnxTextModel
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
    (export,) = [d for d in tmp_path.iterdir() if d.name != "sources"]  # sources: records
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


CHILD = """
import json, sys
import numpy as np
from pathlib import Path
from medloupe.knowledge_base.embedders import TextEmbedder
emb = TextEmbedder(sys.argv[1], backend="onnx-int8", cache_dir=Path(sys.argv[2]))
texts = json.loads(Path(sys.argv[3]).read_text())
np.save(sys.argv[4], emb.encode(texts))
print(json.dumps({m: m in sys.modules for m in ("torch", "sentence_transformers")}))
"""


@pytest.mark.slow
def test_a_checked_export_starts_again_from_the_folder_alone(
    passages: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first load exports, checks against PyTorch and records the folder; the next one,
    in a fresh process, needs neither torch nor sentence-transformers and gives the same
    vectors; a changed folder or a damaged record falls back to the full load."""
    bundled = Path(embedders.default_text_model_path())
    folder = tmp_path / "model"
    shutil.copytree(bundled, folder)
    cache = tmp_path / "cache"
    first = TextEmbedder(str(folder), backend="onnx-int8", cache_dir=cache)
    want = first.encode(passages)
    assert first._model is not None  # the full load: sentence-transformers, export, check
    # the tokenizer in use is the model's own, called as sentence-transformers calls it (a
    # text over max_seq_length included)
    st = first._model
    long = [*passages, " ".join(passages[:8])]
    ids = st.tokenizer(long, truncation=True, max_length=st.max_seq_length)["input_ids"]
    assert [e.ids for e in first._onnx.tokenizer.encode_batch(long)] == ids
    assert len(ids[-1]) == st.max_seq_length < first.count_tokens(long[-1])
    assert first.count_tokens(long[-1]) == len(st.tokenizer(long[-1])["input_ids"])
    (record,) = (cache / "sources").iterdir()

    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(passages))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(cache), str(texts), str(tmp_path / "v.npy")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "torch": False,
        "sentence_transformers": False,
    }
    assert np.array_equal(np.load(tmp_path / "v.npy"), want)

    assert OnnxTextModel.from_folder(folder, cache) is not None
    config = folder / "sentence_bert_config.json"
    config.write_text(config.read_text().replace("256", "128"))  # another model now
    assert OnnxTextModel.from_folder(folder, cache) is None
    config.write_text((bundled / config.name).read_text())
    damaged = json.loads(record.read_text())
    damaged["probes"] = (-np.asarray(damaged["probes"])).tolist()
    record.write_text(json.dumps(damaged))
    with caplog.at_level(logging.WARNING):
        assert OnnxTextModel.from_folder(folder, cache) is None
    assert "no longer gives its probe vectors" in caplog.text
    again = TextEmbedder(str(folder), backend="onnx-int8", cache_dir=cache)
    assert np.array_equal(again.encode(passages[:3]), want[:3]) and again._model is not None
    assert OnnxTextModel.from_folder(folder, cache) is not None  # recorded afresh

    # a damaged export in the cache: torch embeds, and the warning says what to delete
    export = cache / json.loads(record.read_text())["export"]
    (export / "model.int8.onnx").write_bytes(b"not a model")
    caplog.clear()
    damaged_cache = TextEmbedder(str(folder), backend="onnx-int8", cache_dir=cache)
    with caplog.at_level(logging.WARNING):
        vec = damaged_cache.encode(passages[:1])
    assert damaged_cache.backend == "torch" and vec.shape == (1, 384)
    assert "does not load" in caplog.text and f"delete {export}" in caplog.text
