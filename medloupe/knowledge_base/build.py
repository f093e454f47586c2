"""Building and extending a knowledge-base folder (its layout: :mod:`.index`).

A build writes into a temporary folder and renames it into place, so a failed build leaves
nothing half-written; ``add`` rewrites the files atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base.embedders import TextEmbedder
from medloupe.knowledge_base.image_embedders import ImageEmbedder, image_embedder_from_spec
from medloupe.knowledge_base.index import (
    _SCHEMA,
    APPROX_MIN_VECTORS,
    COMPRESS_MIN_VECTORS,
    FIGURE_MAX_SIDE,
    FORMAT,
    KnowledgeBase,
    build_faiss_index,
    corpus_hash,
)
from medloupe.knowledge_base.loaders import LoadReport, SourcePassage, load_source


@dataclass
class BuildStats:
    passages: int = 0
    figures: int = 0
    documents: int = 0
    seconds: float = 0.0
    report: LoadReport = field(default_factory=LoadReport)


def _save_figure(p: SourcePassage, figures_dir: Path, report: LoadReport) -> str | None:
    """Store a passage's figure as a downsized PNG; returns its file name or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        if p.figure_bytes is not None:
            im = Image.open(io.BytesIO(p.figure_bytes))
        elif p.figure_file is not None:
            im = Image.open(p.figure_file)
        else:
            return None
        with im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        report.warn(f"{p.source}: figure of {p.id} is unreadable ({exc}); kept as text only")
        return None
    rgb.thumbnail((FIGURE_MAX_SIDE, FIGURE_MAX_SIDE))
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    name = hashlib.sha256(data).hexdigest()[:16] + ".png"
    target = figures_dir / name
    if not target.exists():
        target.write_bytes(data)
    return name


def _save_figures(
    passages: list[SourcePassage], figures_dir: Path, report: LoadReport
) -> list[str | None]:
    """Store each passage's figure; a figure passage whose image is unreadable becomes text."""
    names = [_save_figure(p, figures_dir, report) for p in passages]
    for p, name in zip(passages, names, strict=True):
        if p.kind == "figure" and name is None:
            p.kind = "text"
    return names


def embed_figures(
    figures_dir: Path,
    figure_names: list[str | None],
    embedder: ImageEmbedder,
    *,
    on_batch: Callable[[int], None] | None = None,
    batch: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, vectors) for the passages that have a figure, read from ``figures_dir``."""
    from PIL import Image

    rows = np.array([i for i, f in enumerate(figure_names) if f], dtype=np.int64)
    chunks: list[np.ndarray] = []
    for start in range(0, len(rows), batch):
        images = []
        for r in rows[start : start + batch]:
            with Image.open(figures_dir / str(figure_names[int(r)])) as im:
                images.append(np.asarray(im.convert("RGB")))
        chunks.append(embedder.encode_images(images))
        if on_batch is not None:
            on_batch(len(images))
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)
    return rows, vectors.astype(np.float32)


def _write_kb(
    folder: Path,
    passages: list[SourcePassage],
    vectors: np.ndarray,
    embedder: TextEmbedder,
    *,
    name: str,
    sources: list[str],
    attribution: list[str],
    report: LoadReport,
    figure_names: list[str | None],
    image_embedder: ImageEmbedder | None = None,
    figure_rows: np.ndarray | None = None,
    figure_vectors: np.ndarray | None = None,
) -> None:
    import faiss

    con = sqlite3.connect(folder / "passages.sqlite")
    with con:
        con.executescript(_SCHEMA)
        con.executemany(
            "INSERT INTO passages(row, id, document, section, page, kind, text, figure, source) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (i, p.id, p.document, p.section, p.page, p.kind, p.text, fig, p.source)
                for i, (p, fig) in enumerate(zip(passages, figure_names, strict=True))
            ],
        )
    con.close()
    np.save(folder / "vectors.npy", vectors)
    # a compressed index re-ranks from the saved vectors: tune it on the memory map
    index, recall, kind = build_faiss_index(np.load(folder / "vectors.npy", mmap_mode="r"))
    faiss.write_index(index, str(folder / "text.faiss"))
    image_meta = None
    if image_embedder is not None and figure_rows is not None and figure_vectors is not None:
        np.save(folder / "figure_rows.npy", figure_rows)
        np.save(folder / "figure_vectors.npy", figure_vectors)
        fig_index = faiss.IndexFlatIP(int(figure_vectors.shape[1]))
        if len(figure_vectors):
            fig_index.add(figure_vectors)
        faiss.write_index(fig_index, str(folder / "figures.faiss"))
        image_meta = {
            "id": image_embedder.id,
            "dim": int(figure_vectors.shape[1]),
            "normalized": True,
        }
    manifest = {
        "format": FORMAT,
        "name": name,
        "text_embedder": {"id": embedder.id, "dim": int(vectors.shape[1]), "normalized": True},
        "image_embedder": image_meta,
        "figures_embedded": 0 if figure_rows is None else len(figure_rows),
        "index": {
            "type": kind,
            "approx_min_vectors": APPROX_MIN_VECTORS,
            "compress_min_vectors": COMPRESS_MIN_VECTORS,
            "nlist": getattr(index, "nlist", None),
            "nprobe": getattr(index, "nprobe", None),
            "recall": recall,
        },
        "count": len(passages),
        "figures": sum(1 for f in figure_names if f),
        "corpus_hash": corpus_hash((p.id, p.text) for p in passages),
        "sources": sources,
        "attribution": attribution,
        "problems": report.problems[:200],
        "failed_documents": report.failed_documents,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def build_kb(
    sources: list[str | Path],
    out: str | Path,
    *,
    embedder: TextEmbedder | None = None,
    image_embedder: ImageEmbedder | str | None = "auto",
    name: str | None = None,
    attribution: list[str] | None = None,
    passages: list[SourcePassage] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    overwrite: bool = False,
) -> BuildStats:
    """Build a KB folder at ``out`` from sources (and/or ready ``passages``).

    Each source is loaded on its own: a corrupt one is reported with its name and the build
    goes on. The KB is written to a temporary folder next to ``out`` and renamed into place.

    Args:
        embedder: text embedder (default: the bundled all-MiniLM-L6-v2).
        image_embedder: an :class:`ImageEmbedder`, a spec for
            :func:`~medloupe.knowledge_base.image_embedders.image_embedder_from_spec`
            (``"auto"``, ``"pixels"``, a CLIP model id or folder), or ``None``/``"none"`` for
            no figure embeddings.
        on_progress: ``(stage, done, total)`` callback (stages ``load``, ``embed``,
            ``figures``).

    Raises:
        KnowledgeBaseError: nothing to index, or ``out`` exists and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    target = Path(out)
    if target.exists() and not overwrite:
        raise KnowledgeBaseError(
            f"{target} exists; use `medloupe kb add` to extend it or --overwrite to rebuild"
        )
    embedder = embedder or TextEmbedder()
    if image_embedder is None or isinstance(image_embedder, str):
        image_embedder = image_embedder_from_spec(image_embedder or "none")
    stats = BuildStats()
    report = stats.report
    items: list[SourcePassage] = list(passages or [])
    for i, src in enumerate(sources):
        before = len(items)
        items.extend(load_source(src, report))
        if len(items) > before:
            stats.documents += 1
        if on_progress:
            on_progress("load", i + 1, len(sources))
    unique = _unique(items, report)
    if not unique:
        raise KnowledgeBaseError(
            "no passages to index: "
            + ("; ".join(report.failed_documents) or "the sources hold no text")
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / "figures").mkdir()
        figure_names = _save_figures(unique, tmp / "figures", report)
        tick = _counter(on_progress, "embed", len(unique))

        vectors = embedder.encode([p.text for p in unique], on_batch=tick)
        figure_rows = figure_vectors = None
        if image_embedder is not None:
            figure_rows, figure_vectors = embed_figures(
                tmp / "figures",
                figure_names,
                image_embedder,
                on_batch=_counter(on_progress, "figures", sum(1 for f in figure_names if f)),
            )
        _write_kb(
            tmp,
            unique,
            vectors,
            embedder,
            name=name or target.name,
            sources=[str(s) for s in sources],
            attribution=attribution or [],
            report=report,
            figure_names=figure_names,
            image_embedder=image_embedder,
            figure_rows=figure_rows,
            figure_vectors=figure_vectors,
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.passages = len(unique)
    stats.figures = sum(1 for f in figure_names if f)
    stats.seconds = time.perf_counter() - t0
    return stats


def _unique(items: list[SourcePassage], report: LoadReport) -> list[SourcePassage]:
    """The passages with their first id (a later duplicate is reported and skipped)."""
    seen: set[str] = set()
    unique = []
    for p in items:
        if p.id in seen:
            report.warn(f"{p.source}: duplicate passage id {p.id}; the later one is skipped")
            continue
        seen.add(p.id)
        unique.append(p)
    return unique


def _counter(
    on_progress: Callable[[str, int, int], None] | None, stage: str, total: int
) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        on_progress(stage, done, total)

    return tick


def add_to_kb(
    kb_path: str | Path,
    sources: list[str | Path],
    *,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> BuildStats:
    """Add the passages of ``sources`` to an existing KB (ids already present are skipped);
    only the new passages are embedded. Files are replaced atomically (a new folder is
    written and renamed over the old one)."""
    t0 = time.perf_counter()
    kb = KnowledgeBase(kb_path)
    path = kb.path
    stats = BuildStats()
    report = stats.report
    existing = {
        r[0]: r
        for r in kb._db.execute(
            "SELECT id, document, section, page, kind, text, figure, source FROM passages "
            "ORDER BY row"
        )
    }
    old = [
        SourcePassage(
            id=r[0], document=r[1], section=r[2], page=r[3], kind=r[4], text=r[5], source=r[7]
        )
        for r in existing.values()
    ]
    old_figs: list[str | None] = [r[6] for r in existing.values()]
    new: list[SourcePassage] = []
    for i, src in enumerate(sources):
        for p in load_source(src, report):
            if p.id in existing or any(q.id == p.id for q in new):
                continue
            new.append(p)
        if on_progress:
            on_progress("load", i + 1, len(sources))
    kb.close()
    if not new:
        stats.seconds = time.perf_counter() - t0
        return stats
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        shutil.copytree(path / "figures", tmp / "figures")
        new_figs = _save_figures(new, tmp / "figures", report)
        tick = _counter(on_progress, "embed", len(new))

        vectors = np.concatenate(
            [
                np.load(path / "vectors.npy"),
                kb.embedder.encode([p.text for p in new], on_batch=tick),
            ]
        )
        figure_rows = figure_vectors = None
        if kb.image_embedder is not None:
            new_rows, new_vecs = embed_figures(
                tmp / "figures",
                new_figs,
                kb.image_embedder,
                on_batch=_counter(on_progress, "figures", sum(1 for f in new_figs if f)),
            )
            figure_rows = np.concatenate([np.load(path / "figure_rows.npy"), new_rows + len(old)])
            figure_vectors = np.concatenate([np.load(path / "figure_vectors.npy"), new_vecs])
        _write_kb(
            tmp,
            old + new,
            vectors,
            kb.embedder,
            name=kb.manifest.get("name") or path.name,
            sources=[*kb.manifest.get("sources", []), *(str(s) for s in sources)],
            attribution=kb.manifest.get("attribution", []),
            report=report,
            figure_names=old_figs + new_figs,
            image_embedder=kb.image_embedder,
            figure_rows=figure_rows,
            figure_vectors=figure_vectors,
        )
        backup = path.with_name(f".{path.name}.old")
        os.replace(path, backup)
        os.replace(tmp, path)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.passages = len(new)
    stats.figures = sum(1 for f in new_figs if f)
    stats.seconds = time.perf_counter() - t0
    return stats
