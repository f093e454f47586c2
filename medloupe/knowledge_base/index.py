"""A knowledge base on disk: FAISS index, SQLite metadata, manifest, figures.

Layout of a KB folder::

    manifest.json     format, text embedder (id, dim, normalised), index type, count,
                      corpus hash, sources, attribution
    passages.sqlite   one row per passage; the row number is the FAISS id
    vectors.npy       the embeddings (float32, L2-normalised), kept for rebuilds
    text.faiss        the FAISS index of the text vectors
    figures/          figure images, content-addressed PNG (longer side <= 640 px)
    figure_vectors.npy, figure_rows.npy, figures.faiss
                      image embeddings of the figures (manifest ``image_embedder``), the
                      passage row of each, and their exact inner-product index

A query is text, an image crop, or both: text ranks passages by their text vectors, an image
ranks figure passages by their image vectors, and both are fused by reciprocal rank fusion.

Index: exact inner product (``IndexFlatIP``) below :data:`APPROX_MIN_VECTORS` vectors, an
IVF index (``IndexIVFFlat``, ``nlist = 4 sqrt(n)``, ``nprobe`` = :func:`default_nprobe`) from
there; both move to the GPU when ``faiss.get_num_gpus() > 0``. A build writes into a temporary
folder and renames it into place, so a failed build leaves nothing half-written; ``add``
rewrites the files atomically.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base.embedders import TextEmbedder
from medloupe.knowledge_base.image_embedders import (
    ImageEmbedder,
    image_embedder_from_spec,
    reciprocal_rank_fusion,
)
from medloupe.knowledge_base.loaders import LoadReport, SourcePassage, load_source
from medloupe.knowledge_base.protocol import Passage

log = logging.getLogger(__name__)

FORMAT = 1
APPROX_MIN_VECTORS = 50_000
FIGURE_MAX_SIDE = 640

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    row INTEGER PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    document TEXT NOT NULL,
    section TEXT,
    page TEXT,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    figure TEXT,
    source TEXT
);
"""


def default_nprobe(nlist: int) -> int:
    """IVF cells searched per query: enough for recall@10 >= 0.95 on embedding-like data
    (see ``benchmarks/bench_kb.py``)."""
    return max(16, nlist // 8)


def build_faiss_index(vectors: np.ndarray) -> Any:
    """An index over ``vectors`` (float32, normalised): flat below the approximate threshold,
    IVF above it (trained on the vectors)."""
    import faiss

    n, dim = vectors.shape
    index: Any
    if n < APPROX_MIN_VECTORS:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * math.sqrt(n))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = default_nprobe(nlist)
    if n:
        index.add(vectors)
    return index


def faiss_gpus() -> int:
    """How many GPUs the installed FAISS build can use (0 for ``faiss-cpu``, or no FAISS)."""
    try:
        import faiss
    except ImportError:
        return 0
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def to_device(index: Any) -> Any:
    """The index on all GPUs when FAISS sees any, else unchanged (CPU)."""
    import faiss

    gpus = faiss_gpus()
    if gpus > 0:
        log.info("FAISS index moved to %d GPU(s)", gpus)
        return faiss.index_cpu_to_all_gpus(index)
    return index


def corpus_hash(rows: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for pid, text in sorted(rows):
        h.update(pid.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\1")
    return h.hexdigest()


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


class KnowledgeBase:
    """An opened KB folder; a :class:`~medloupe.knowledge_base.protocol.Retriever`.

    Args:
        path: the KB folder.
        embedder: the text embedder to query with; default: the one the KB was built with.
            A different model than the manifest's fails with :class:`KnowledgeBaseError`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        embedder: TextEmbedder | None = None,
        image_embedder: ImageEmbedder | None = None,
    ) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise KnowledgeBaseError(
                f"{self.path} is not a knowledge base (no manifest.json); build one with "
                "`medloupe kb build SOURCE... --out KB`"
            )
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise KnowledgeBaseError(
                f"{self.path} has KB format {self.manifest.get('format')}, this medloupe reads "
                f"format {FORMAT}; rebuild it with `medloupe kb build`"
            )
        built_with = self.manifest["text_embedder"]
        self.embedder = embedder or TextEmbedder(built_with["id"])
        if self.embedder.id != built_with["id"]:
            raise KnowledgeBaseError(
                f"{self.path} was built with text embedder {built_with['id']!r} "
                f"(dim {built_with['dim']}); querying it with {self.embedder.id!r} would compare "
                "unrelated vectors. Use the same embedder or rebuild the KB with the new one"
            )
        image_built = self.manifest.get("image_embedder")
        self.image_embedder: ImageEmbedder | None = None
        if image_built:
            self.image_embedder = image_embedder or _image_embedder_for(image_built["id"])
            if self.image_embedder.id != image_built["id"]:
                raise KnowledgeBaseError(
                    f"{self.path} embedded its figures with {image_built['id']!r}; querying "
                    f"them with {self.image_embedder.id!r} would compare unrelated vectors. "
                    "Use the same image embedder or rebuild the KB with the new one"
                )
        self._lock = threading.Lock()
        self._index: Any = None
        self._vectors: np.ndarray | None = None
        self._figure_index: Any = None
        self._figure_rows: np.ndarray | None = None
        self._db = sqlite3.connect(self.path / "passages.sqlite", check_same_thread=False)

    # --- facts ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"kb:{self.manifest.get('name') or self.path.name}"

    def __len__(self) -> int:
        return int(self.manifest.get("count", 0))

    def info(self) -> dict[str, Any]:
        kinds = dict(self._db.execute("SELECT kind, COUNT(*) FROM passages GROUP BY kind"))
        docs = [r[0] for r in self._db.execute("SELECT DISTINCT document FROM passages")]
        gpus = faiss_gpus()
        return {
            **self.manifest,
            "kinds": kinds,
            "documents": docs,
            "path": str(self.path),
            "search_device": f"{gpus} GPU(s)" if gpus else "cpu",
        }

    def close(self) -> None:
        self._db.close()

    # --- search ---------------------------------------------------------------------------

    def _ensure(self) -> tuple[Any, np.ndarray]:
        with self._lock:
            if self._index is None:
                import faiss

                self._index = to_device(faiss.read_index(str(self.path / "text.faiss")))
                self._vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
            assert self._vectors is not None
            return self._index, self._vectors

    def _ensure_figures(self) -> tuple[Any, np.ndarray]:
        with self._lock:
            if self._figure_index is None:
                import faiss

                self._figure_index = to_device(faiss.read_index(str(self.path / "figures.faiss")))
                self._figure_rows = np.load(self.path / "figure_rows.npy")
            assert self._figure_rows is not None
            return self._figure_index, self._figure_rows

    def _rows(self, rows: list[int]) -> dict[int, tuple[Any, ...]]:
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        cur = self._db.execute(
            f"SELECT row, id, document, section, page, kind, text, figure FROM passages "
            f"WHERE row IN ({marks})",
            rows,
        )
        return {r[0]: r for r in cur}

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search: (scores, rows), each ``(len(queries), k)``; rows -1 when fewer."""
        index, _ = self._ensure()
        scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows

    def search_sync(
        self,
        query: str,
        *,
        image: np.ndarray | None = None,
        k: int = 5,
        mmr: float | None = None,
    ) -> list[Passage]:
        """Top ``k`` passages for a text ``query``, an ``(H, W, 3)`` uint8 RGB ``image`` crop,
        or both (ranks fused by reciprocal rank fusion; the score is then the fused score).

        With ``mmr`` (0..1, the weight of relevance), the top ``4k`` are re-ranked for
        diversity (maximal marginal relevance over the text vectors). An image query on a KB
        without figure embeddings is ignored (logged).
        """
        query = query.strip()
        use_image = image is not None and self.image_embedder is not None and self._has_figures
        if image is not None and not use_image:
            log.info(
                "%s has no figure embeddings; the image part of the query is ignored", self.name
            )
        if not query and not use_image:
            return []
        fused = use_image and bool(query)
        fetch = k if (mmr is None and not fused) else max(4 * k, 20)
        rankings: list[list[tuple[int, float]]] = []
        if query:
            q = self.embedder.encode([query])[0]
            self._check_dim(q[None, :], "text_embedder")
            scores, rows = self.search_vectors(q[None, :], min(fetch, max(len(self), 1)))
            rankings.append(
                [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
            )
        if use_image:
            assert self.image_embedder is not None and image is not None
            qi = self.image_embedder.encode_images([image])
            self._check_dim(qi, "image_embedder")
            index, figure_rows = self._ensure_figures()
            scores, hits = index.search(qi, min(fetch, len(figure_rows)))
            rankings.append(
                [
                    (int(figure_rows[h]), float(s))
                    for h, s in zip(hits[0], scores[0], strict=True)
                    if h >= 0
                ]
            )
        if len(rankings) == 1:
            pairs = rankings[0]
        else:
            pairs = reciprocal_rank_fusion([[r for r, _ in ranking] for ranking in rankings])
        if mmr is not None and pairs:
            _, vectors = self._ensure()
            pairs = mmr_rerank(pairs, np.asarray(vectors[[r for r, _ in pairs]]), k, mmr)
        meta = self._rows([r for r, _ in pairs[:k]])
        out = []
        for row, score in pairs[:k]:
            _, pid, document, section, page, kind, text, figure = meta[row]
            out.append(
                Passage(
                    id=pid,
                    document=document,
                    section=section,
                    page=page,
                    kind=kind,
                    text=text,
                    score=score,
                    figure_path=str(self.path / "figures" / figure) if figure else None,
                )
            )
        return out

    def _check_dim(self, vectors: np.ndarray, which: str) -> None:
        want = int(self.manifest[which]["dim"])
        if vectors.shape[1] != want:
            raise KnowledgeBaseError(
                f"{self.path}: the {which.replace('_', ' ')} gives {vectors.shape[1]}-d vectors "
                f"but the KB holds {want}-d ones (built by another version of "
                f"{self.manifest[which]['id']!r}); rebuild the KB"
            )

    @property
    def _has_figures(self) -> bool:
        return bool(self.manifest.get("figures_embedded"))

    async def search(
        self, query: str, *, image: np.ndarray | None = None, k: int = 5
    ) -> list[Passage]:
        """Top ``k`` passages for ``query`` and/or the ``image`` crop (see :meth:`search_sync`)."""
        return await asyncio.to_thread(self.search_sync, query, image=image, k=k)


def _image_embedder_for(embedder_id: str) -> ImageEmbedder:
    """The embedder a manifest names by its id (every id is a spec the reader accepts)."""
    embedder = image_embedder_from_spec(embedder_id)
    if embedder is None:
        raise KnowledgeBaseError(f"the manifest names no image embedder ({embedder_id!r})")
    return embedder


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


def mmr_rerank(
    pairs: list[tuple[int, float]], vectors: np.ndarray, k: int, weight: float
) -> list[tuple[int, float]]:
    """Maximal marginal relevance: pick ``k`` of ``pairs`` (row, score) trading relevance
    (``weight``) against similarity to what was already picked."""
    chosen: list[int] = []
    left = list(range(len(pairs)))
    while left and len(chosen) < k:
        best, best_val = left[0], -math.inf
        for i in left:
            redundancy = max((float(vectors[i] @ vectors[j]) for j in chosen), default=0.0)
            val = weight * pairs[i][1] - (1.0 - weight) * redundancy
            if val > best_val:
                best, best_val = i, val
        chosen.append(best)
        left.remove(best)
    return [pairs[i] for i in chosen]


# --- building -------------------------------------------------------------------------------


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
    index = build_faiss_index(vectors)
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
            "type": "flat" if vectors.shape[0] < APPROX_MIN_VECTORS else "ivf",
            "approx_min_vectors": APPROX_MIN_VECTORS,
            "nlist": getattr(index, "nlist", None),
            "nprobe": getattr(index, "nprobe", None),
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
