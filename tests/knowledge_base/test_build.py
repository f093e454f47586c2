"""Streaming, resumable knowledge-base builds: bounded memory, an interrupted build resumed
from its last chunk to the same KB as an uninterrupted one, vectors.npy grown in place, bad
JSONL lines skipped. The real MiniLM embedder throughout."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from medloupe.knowledge_base import KnowledgeBase, add_to_kb, build, build_kb
from medloupe.knowledge_base.build import STATE, _GrowingNpy
from medloupe.knowledge_base.embedders import TextEmbedder
from medloupe.knowledge_base.loaders import LoadReport, load_source

ORGANS = ["liver", "spleen", "kidney", "lung", "heart", "pancreas", "bladder", "femur"]


def write_corpus(path: Path, n: int) -> Path:
    """A JSONL corpus of ``n`` short pages (one passage each)."""
    with path.open("w") as f:
        for i in range(n):
            organ = ORGANS[i % len(ORGANS)]
            page = {"document": "Corpus", "id": f"p{i}", "text": f"Note {i} on the {organ}."}
            f.write(json.dumps(page) + "\n")
    return path


def test_growing_npy_appends_truncates_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    grow = _GrowingNpy(path, np.dtype(np.float32), (3,))
    grow.append(np.ones((2, 3)))
    grow.append(np.full((3, 3), 2.0))
    assert np.load(path).shape == (5, 3)
    grow.truncate(4)
    again = _GrowingNpy(path, np.dtype(np.float32), (3,))  # reopened: rows from the header
    again.append(np.zeros((1, 3)))
    got = np.load(path)
    assert got.shape == (5, 3) and got[:2].sum() == 6 and got[2:4].sum() == 12
    assert got[4].sum() == 0
    np.save(tmp_path / "saved.npy", np.ones((2, 3), np.float32))  # NumPy's own file grows too
    _GrowingNpy(tmp_path / "saved.npy", np.dtype(np.float32), (3,)).append(np.zeros((1, 3)))
    assert np.load(tmp_path / "saved.npy").shape == (3, 3)


def test_an_interrupted_build_resumes_to_the_same_kb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl", 230)
    monkeypatch.setattr(build, "CHUNK_PASSAGES", 50)
    embedder = TextEmbedder(backend="torch")
    calls: list[int] = []
    original = TextEmbedder.encode

    def encode_then_die(self: TextEmbedder, texts: list[str], **kw: object) -> np.ndarray:
        if len(calls) == 3:
            raise KeyboardInterrupt  # the build is stopped during its fourth chunk
        calls.append(len(texts))
        return original(self, texts, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(TextEmbedder, "encode", encode_then_die)
    out = tmp_path / "kb"
    with pytest.raises(KeyboardInterrupt):
        build_kb([corpus], out, embedder=embedder, image_embedder=None)
    partial = tmp_path / ".kb.partial"
    assert not out.exists() and json.loads((partial / STATE).read_text())["rows"] == 150
    assert "run the same command again to resume" in caplog.text

    calls.clear()
    monkeypatch.setattr(TextEmbedder, "encode", lambda self, texts, **kw: (
        calls.append(len(texts)), original(self, texts, **kw))[1])  # fmt: skip
    stats = build_kb([corpus], out, embedder=embedder, image_embedder=None)
    assert calls == [50, 30] and stats.resumed_from == 150 and stats.passages == 230
    assert not partial.exists()

    fresh = tmp_path / "fresh"
    build_kb([corpus], fresh, embedder=embedder, image_embedder=None)
    a, b = KnowledgeBase(out), KnowledgeBase(fresh)
    assert a.manifest["corpus_hash"] == b.manifest["corpus_hash"] and len(a) == 230
    ids = "SELECT id FROM passages ORDER BY row"
    assert [r[0] for r in a._db.execute(ids)] == [f"p{i}" for i in range(230)]
    va, vb = np.load(out / "vectors.npy"), np.load(fresh / "vectors.npy")
    assert va.shape == (230, 384) and np.abs(va - vb).max() < 1e-4
    assert a.search_sync("Note 17 on the spleen.", k=1)[0].id == "p17"


def test_a_changed_source_starts_the_build_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl", 120)
    monkeypatch.setattr(build, "CHUNK_PASSAGES", 50)
    embedder = TextEmbedder(backend="torch")
    original = TextEmbedder.encode
    calls: list[int] = []

    def encode_then_die(self: TextEmbedder, texts: list[str], **kw: object) -> np.ndarray:
        if calls:
            raise KeyboardInterrupt
        calls.append(len(texts))
        return original(self, texts, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(TextEmbedder, "encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_kb([corpus], tmp_path / "kb", embedder=embedder, image_embedder=None)
    monkeypatch.setattr(TextEmbedder, "encode", original)
    write_corpus(corpus, 90)  # edited in between: the partial build is not reused
    stats = build_kb([corpus], tmp_path / "kb", embedder=embedder, image_embedder=None)
    assert stats.resumed_from == 0 and stats.passages == 90


@pytest.mark.slow
def test_memory_is_bounded_by_a_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "CHUNK_PASSAGES", 256)
    embedder = TextEmbedder(backend="auto")
    embedder.encode(["warm up"])  # the model itself is not the builder's memory
    peaks = {}
    for n in (1_000, 8_000):
        corpus = write_corpus(tmp_path / f"c{n}.jsonl", n)
        tracemalloc.start()
        stats = build_kb([corpus], tmp_path / f"kb{n}", embedder=embedder, image_embedder=None)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats.passages == n
    # 8x the corpus; holding it whole would need > 3 x the memory of the small one
    assert peaks[8_000] < 1.5 * peaks[1_000], peaks


def test_add_streams_onto_a_copy_and_skips_known_ids(tmp_path: Path) -> None:
    first = write_corpus(tmp_path / "a.jsonl", 40)
    out = tmp_path / "kb"
    build_kb([first], out, image_embedder=None)
    more = tmp_path / "b.jsonl"
    with more.open("w") as f:
        for i in range(30, 60):  # 30-39 are in already
            f.write(json.dumps({"document": "More", "id": f"p{i}", "text": f"Extra {i}."}) + "\n")
    stats = add_to_kb(out, [more])
    assert stats.passages == 20
    kb = KnowledgeBase(out)
    assert len(kb) == 60 and np.load(out / "vectors.npy").shape == (60, 384)
    assert kb.search_sync("Extra 55.", k=1)[0].id == "p55"
    assert add_to_kb(out, [more]).passages == 0  # nothing new: left as it was
    assert not list(tmp_path.glob(".kb*"))


def test_bad_jsonl_lines_are_skipped_one_by_one(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"document": "D", "text": "First good page."}\n'
        b"\xff\xfe not utf-8\n"
        b"{not json}\n"
        b'{"text": "no document"}\n'
        b'{"document": "D", "text": "Second good page."}\n'
    )
    report = LoadReport()
    got = [p.text for p in load_source(path, report)]
    assert got == ["First good page.", "Second good page."]
    assert [m.split(": ")[1] for m in report.problems] == [
        "not UTF-8 (invalid start byte); line skipped",
        "not JSON (Expecting property name enclosed in double quotes); line skipped",
        "a page needs `document` and `text`; line skipped",
    ]
