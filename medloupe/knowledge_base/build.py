"""Building and extending a knowledge-base folder (its layout: :mod:`.index`).

Sources are read as a stream and ingested in chunks of :data:`CHUNK_PASSAGES`: each chunk's
figures are stored, its text and figures embedded and its rows appended to ``passages.sqlite``
and to ``vectors.npy`` (which grows in place), so memory stays bounded by a chunk whatever the
corpus size (JSONL is read line by line). The build happens in ``.<name>.partial`` next to the
KB; after each chunk, ``build.json`` there records how far the stream has been ingested. A
build that is interrupted (killed, out of disk, a model that fails) leaves that folder, and the
same command run again resumes after the last chunk recorded (the sources are read again, the
ingested part is skipped without embedding). Only a finished build is renamed into place, so
nothing half-written is ever opened as a KB.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: passages embedded and committed together (the unit of memory and of resumption)
CHUNK_PASSAGES = 2048
STATE = "build.json"
_MAX_KEPT_WARNINGS = 200


@dataclass
class BuildStats:
    """What a build or an ``add`` did; times in seconds (``resumed_from``: passages already
    ingested by an interrupted run of the same build)."""

    passages: int = 0
    figures: int = 0
    documents: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    figure_seconds: float = 0.0
    index_seconds: float = 0.0
    resumed_from: int = 0
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


class _GrowingNpy:
    """A ``.npy`` file of shape ``(rows, *tail)`` that grows by appended rows.

    NumPy pads a header so that the first axis can grow in place, so appending writes the rows
    at the end and rewrites the header; :meth:`truncate` cuts back to a committed row count.
    """

    def __init__(self, path: Path, dtype: np.dtype[Any], tail: tuple[int, ...]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tail = tail
        if path.exists():
            existing = np.load(path, mmap_mode="r")
            if existing.dtype != self.dtype or existing.shape[1:] != tail:
                raise KnowledgeBaseError(
                    f"{path} holds {existing.dtype} {existing.shape}, not {self.dtype} "
                    f"(n, {', '.join(map(str, tail))}); remove the partial build to start over"
                )
            self.rows, self.offset = int(existing.shape[0]), int(existing.offset)
            del existing
        else:
            self.rows, self.offset = 0, 0
            with path.open("wb") as f:
                self.offset = self._header(f)
        self.row_bytes = self.dtype.itemsize * int(np.prod(tail, dtype=np.int64))

    def _header(self, f: Any) -> int:
        f.seek(0)
        np.lib.format.write_array_header_1_0(
            f,
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (self.rows, *self.tail),
            },
        )
        return int(f.tell())

    def _rewrite_header(self, f: Any) -> None:
        if self._header(f) != self.offset:  # not NumPy's growth-padded header
            raise KnowledgeBaseError(f"{self.path}: its header cannot grow in place")

    def append(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.shape[1:] != self.tail:
            raise KnowledgeBaseError(f"{self.path}: rows {data.shape[1:]}, not {self.tail}")
        with self.path.open("r+b") as f:
            f.seek(self.offset + self.rows * self.row_bytes)
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())  # the rows are on disk before the header counts them
            self.rows += len(data)
            self._rewrite_header(f)

    def truncate(self, rows: int) -> None:
        with self.path.open("r+b") as f:
            f.truncate(self.offset + rows * self.row_bytes)
            self.rows = rows
            self._rewrite_header(f)


def _fingerprint(parts: Iterable[object]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _source_signature(path: str | Path) -> list[object]:
    """Path, sizes and modification times of a source (every file of a book folder)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    sig: list[object] = [str(p.resolve())]
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        sig.append((str(f.relative_to(p)) if p.is_dir() else "", st.st_size, st.st_mtime_ns))
    return sig


def _stream(
    sources: list[str | Path],
    passages: list[SourcePassage],
    stats: BuildStats,
    on_progress: Progress | None,
) -> Iterator[SourcePassage]:
    """The ready passages, then each source's, counting the documents that gave any."""
    yield from passages
    for i, src in enumerate(sources):
        n = 0
        for p in load_source(src, stats.report):
            n += 1
            yield p
        stats.documents += n > 0
        if on_progress:
            on_progress("load", i + 1, len(sources))


class _Builder:
    """Ingests a passage stream into ``folder`` chunk by chunk (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        fingerprint: str,
        embedder: TextEmbedder,
        image_embedder: ImageEmbedder | None,
        stats: BuildStats,
        *,
        warn_duplicates: bool = True,
    ) -> None:
        self.folder = folder
        self.embedder = embedder
        self.image_embedder = image_embedder
        self.stats = stats
        self.warn_duplicates = warn_duplicates
        (folder / "figures").mkdir(parents=True, exist_ok=True)
        state_file = folder / STATE
        # a resumed build's state (its fingerprint checked by the caller)
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.state: dict[str, Any] = {
            "fingerprint": fingerprint,
            "consumed": 0,
            "rows": 0,
            "figure_rows": 0,
            "warnings": [],
            **state,
        }
        self.db = sqlite3.connect(folder / "passages.sqlite")
        self.db.executescript(_SCHEMA)
        self.vectors = _GrowingNpy(folder / "vectors.npy", np.dtype(np.float32), (embedder.dim,))
        self.fig_rows = self.fig_vectors = None
        if image_embedder is not None:
            self.fig_rows = _GrowingNpy(folder / "figure_rows.npy", np.dtype(np.int64), ())
            self.fig_vectors = _GrowingNpy(
                folder / "figure_vectors.npy", np.dtype(np.float32), (image_embedder.dim,)
            )
        if state:  # resume: cut back to what the last recorded chunk committed
            with self.db:
                self.db.execute("DELETE FROM passages WHERE row >= ?", (self.state["rows"],))
            self.vectors.truncate(self.state["rows"])
            if self.fig_rows is not None and self.fig_vectors is not None:
                self.fig_rows.truncate(self.state["figure_rows"])
                self.fig_vectors.truncate(self.state["figure_rows"])
            self.base_rows = int(self.state["base_rows"])
            stats.resumed_from = int(self.state["rows"]) - self.base_rows
            for w in self.state["warnings"]:
                stats.report.problems.append(w)
        else:  # a fresh build, or an add whose copy holds the KB's rows
            self.base_rows = self._count()
            self.state["rows"] = self.base_rows
            self.state["base_rows"] = self.base_rows
            self.state["figure_rows"] = 0 if self.fig_rows is None else self.fig_rows.rows
        self._write_state()

    def _count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0])

    def _write_state(self) -> None:
        tmp = self.folder / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.folder / STATE)

    def ingest(self, stream: Iterator[SourcePassage], on_progress: Progress | None) -> None:
        """Embed and append the stream's passages, skipping those a previous run ingested."""
        skipped = sum(1 for _ in itertools.islice(stream, self.state["consumed"]))
        if skipped < self.state["consumed"]:
            raise KnowledgeBaseError(
                f"the sources now hold fewer passages ({skipped}) than the interrupted build "
                f"had read ({self.state['consumed']}); remove {self.folder} to start over"
            )
        done = self.state["rows"] - self.base_rows
        while chunk := list(itertools.islice(stream, CHUNK_PASSAGES)):
            done += self._commit(chunk)
            if on_progress:
                on_progress("embed", done, 0)

    def _known(self, ids: list[str]) -> set[str]:
        known: set[str] = set()
        for s in range(0, len(ids), 500):
            part = ids[s : s + 500]
            marks = ",".join("?" * len(part))
            query = f"SELECT id FROM passages WHERE id IN ({marks})"
            known.update(r[0] for r in self.db.execute(query, part))
        return known

    def _commit(self, chunk: list[SourcePassage]) -> int:
        known = self._known([p.id for p in chunk])
        keep: list[SourcePassage] = []
        for p in chunk:
            if p.id in known:
                if self.warn_duplicates:
                    message = f"{p.source}: duplicate passage id {p.id}; the later one is skipped"
                    self.stats.report.warn(message)
                    if len(self.state["warnings"]) < _MAX_KEPT_WARNINGS:
                        self.state["warnings"].append(message)
                continue
            known.add(p.id)
            keep.append(p)
        first = int(self.state["rows"])
        names = _save_figures(keep, self.folder / "figures", self.stats.report)
        t0 = time.perf_counter()
        if keep:
            self.vectors.append(self.embedder.encode([p.text for p in keep]))
        t1 = time.perf_counter()
        self.stats.embed_seconds += t1 - t0
        if self.fig_rows is not None and self.fig_vectors is not None:
            assert self.image_embedder is not None
            rows, vecs = embed_figures(self.folder / "figures", names, self.image_embedder)
            self.fig_vectors.append(vecs)
            self.fig_rows.append(rows + first)
            self.state["figure_rows"] = self.fig_rows.rows
        self.stats.figure_seconds += time.perf_counter() - t1
        with self.db:
            self.db.executemany(
                "INSERT INTO passages(row, id, document, section, page, kind, text, figure, "
                "source) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (first + i, p.id, p.document, p.section, p.page, p.kind, p.text, fig, p.source)
                    for i, (p, fig) in enumerate(zip(keep, names, strict=True))
                ],
            )
        self.state["rows"] = first + len(keep)
        self.state["consumed"] += len(chunk)
        self._write_state()
        return len(keep)

    def finish(self, manifest: dict[str, Any]) -> None:
        """Index the vectors and write the manifest; the folder is then a complete KB."""
        import faiss

        count = self._count()
        t0 = time.perf_counter()
        # a compressed index re-ranks from the saved vectors: tune it on the memory map
        vectors = np.load(self.folder / "vectors.npy", mmap_mode="r")
        index, recall, kind = build_faiss_index(vectors)
        faiss.write_index(index, str(self.folder / "text.faiss"))
        image_meta = None
        if self.image_embedder is not None:
            figure_vectors = np.load(self.folder / "figure_vectors.npy")
            fig_index = faiss.IndexFlatIP(int(self.image_embedder.dim))
            if len(figure_vectors):
                fig_index.add(figure_vectors)
            faiss.write_index(fig_index, str(self.folder / "figures.faiss"))
            image_meta = {
                "id": self.image_embedder.id,
                "dim": self.image_embedder.dim,
                "normalized": True,
            }
        self.stats.index_seconds = time.perf_counter() - t0
        manifest = {
            "format": FORMAT,
            **manifest,
            "text_embedder": {
                "id": self.embedder.id,
                "backend": self.embedder.backend,
                "dim": int(vectors.shape[1]),
                "normalized": True,
            },
            "image_embedder": image_meta,
            "figures_embedded": int(self.state["figure_rows"]),
            "index": {
                "type": kind,
                "approx_min_vectors": APPROX_MIN_VECTORS,
                "compress_min_vectors": COMPRESS_MIN_VECTORS,
                "nlist": getattr(index, "nlist", None),
                "nprobe": getattr(index, "nprobe", None),
                "recall": recall,
            },
            "count": count,
            "figures": self.figures_from(0),
            # ordered by id in SQLite (BINARY: UTF-8 byte order = code point order)
            "corpus_hash": corpus_hash(
                self.db.execute("SELECT id, text FROM passages ORDER BY id")
            ),
            "problems": self.stats.report.problems[:_MAX_KEPT_WARNINGS],
            "failed_documents": self.stats.report.failed_documents,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        del vectors
        (self.folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (self.folder / STATE).unlink()

    def figures_from(self, row: int) -> int:
        """Passages with a figure from ``row`` on."""
        query = "SELECT COUNT(*) FROM passages WHERE figure IS NOT NULL AND row >= ?"
        return int(self.db.execute(query, (row,)).fetchone()[0])

    def close(self) -> None:
        self.db.close()


def _run(
    partial: Path,
    fingerprint: str,
    embedder: TextEmbedder,
    image_embedder: ImageEmbedder | None,
    stats: BuildStats,
    stream: Callable[[], Iterator[SourcePassage]],
    manifest: dict[str, Any],
    on_progress: Progress | None,
    *,
    prepare: Callable[[Path], None],
    publish: Callable[[Path], None],
    warn_duplicates: bool,
) -> bool:
    """Build (or resume building) a complete KB in ``partial`` and ``publish`` it, all under
    the lock of its folder; False (and no folder left) when the stream added no passage.
    ``prepare`` fills a fresh ``partial`` (an ``add`` copies the KB into it)."""
    with _dir_lock(partial.parent):
        if partial.exists():
            try:
                state = json.loads((partial / STATE).read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("fingerprint") == fingerprint:
                log.info("resuming the interrupted build in %s", partial)
            else:
                log.info("%s is left from another build; starting over", partial)
                shutil.rmtree(partial)
        if not partial.exists():
            tmp = partial.with_name(partial.name + ".new")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            prepare(tmp)
            os.replace(tmp, partial)
        builder = _Builder(
            partial, fingerprint, embedder, image_embedder, stats, warn_duplicates=warn_duplicates
        )
        try:
            builder.ingest(stream(), on_progress)
            added = builder.state["rows"] - builder.base_rows
            if added:
                builder.finish(manifest)
                stats.passages = added
                stats.figures = builder.figures_from(builder.base_rows)
        except BaseException:
            builder.close()
            if builder.state["rows"] > builder.base_rows:
                log.warning(
                    "the build stopped after %d passages; run the same command again to resume "
                    "from there (or remove %s to start over)",
                    builder.state["rows"] - builder.base_rows,
                    partial,
                )
            else:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        builder.close()
        if not added:
            shutil.rmtree(partial, ignore_errors=True)
            return False
        publish(partial)
        return True


@contextmanager
def _dir_lock(folder: Path) -> Iterator[None]:
    """One build at a time in ``folder`` (an advisory lock on the folder itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another knowledge-base build in %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_kb(
    sources: list[str | Path],
    out: str | Path,
    *,
    embedder: TextEmbedder | None = None,
    image_embedder: ImageEmbedder | str | None = "auto",
    name: str | None = None,
    attribution: list[str] | None = None,
    passages: list[SourcePassage] | None = None,
    on_progress: Progress | None = None,
    overwrite: bool = False,
) -> BuildStats:
    """Build a KB folder at ``out`` from sources (and/or ready ``passages``).

    Each source is loaded on its own: a corrupt one is reported with its name and the build
    goes on (a JSONL corpus streams line by line, a bad line is skipped). A later passage with
    an id already ingested is reported and skipped. The KB is built in ``.<name>.partial``
    next to ``out`` and renamed into place; an interrupted build resumes when called again
    with the same sources and embedders.

    Args:
        embedder: text embedder (default: the bundled all-MiniLM-L6-v2, backend ``auto``).
        image_embedder: an :class:`ImageEmbedder`, a spec for
            :func:`~medloupe.knowledge_base.image_embedders.image_embedder_from_spec`
            (``"auto"``, ``"pixels"``, a CLIP model id or folder), or ``None``/``"none"`` for
            no figure embeddings.
        on_progress: ``(stage, done, total)`` callback: ``load`` (sources read of all) and
            ``embed`` (passages ingested; total 0: not known while streaming).

    Raises:
        KnowledgeBaseError: nothing to index, or ``out`` exists and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    target = Path(out)
    exists = KnowledgeBaseError(
        f"{target} exists; use `medloupe kb add` to extend it or --overwrite to rebuild"
    )
    if target.exists() and not overwrite:
        raise exists
    embedder = embedder or TextEmbedder(backend="auto")
    if image_embedder is None or isinstance(image_embedder, str):
        image_embedder = image_embedder_from_spec(image_embedder or "none")
    ready = list(passages or [])
    fingerprint = _fingerprint(
        [
            "build",
            FORMAT,
            embedder.id,
            None if image_embedder is None else image_embedder.id,
            [_source_signature(s) for s in sources],
            corpus_hash((p.id, p.text) for p in ready),
        ]
    )
    stats = BuildStats()

    def publish(partial: Path) -> None:
        if target.exists():
            if not overwrite:  # another process built it meanwhile
                raise exists
            shutil.rmtree(target)
        os.replace(partial, target)

    target.parent.mkdir(parents=True, exist_ok=True)
    built = _run(
        target.with_name(f".{target.name}.partial"),
        fingerprint,
        embedder,
        image_embedder,
        stats,
        lambda: _stream(sources, ready, stats, on_progress),
        {
            "name": name or target.name,
            "sources": [str(s) for s in sources],
            "attribution": attribution or [],
        },
        on_progress,
        prepare=lambda folder: None,
        publish=publish,
        warn_duplicates=True,
    )
    if not built:
        raise KnowledgeBaseError(
            "no passages to index: "
            + ("; ".join(stats.report.failed_documents) or "the sources hold no text")
        )
    stats.seconds = time.perf_counter() - t0
    return stats


def add_to_kb(
    kb_path: str | Path,
    sources: list[str | Path],
    *,
    on_progress: Progress | None = None,
) -> BuildStats:
    """Add the passages of ``sources`` to an existing KB (ids already present are skipped);
    only the new passages are embedded. The KB is copied to ``.<name>.partial``, extended
    there (resumable like a build) and renamed over the old one."""
    t0 = time.perf_counter()
    kb = KnowledgeBase(kb_path)
    path = kb.path
    manifest = dict(kb.manifest)
    embedder, image_embedder = kb.embedder, kb.image_embedder
    kb.close()
    stats = BuildStats()
    fingerprint = _fingerprint(
        [
            "add",
            manifest.get("corpus_hash"),
            manifest.get("updated_at"),
            [_source_signature(s) for s in sources],
        ]
    )

    def prepare(folder: Path) -> None:
        shutil.copytree(path, folder, dirs_exist_ok=True)
        for f in ("manifest.json", "text.faiss", "figures.faiss"):
            (folder / f).unlink(missing_ok=True)

    def publish(partial: Path) -> None:
        backup = path.with_name(f".{path.name}.old")
        os.replace(path, backup)
        os.replace(partial, path)
        shutil.rmtree(backup, ignore_errors=True)

    _run(
        path.with_name(f".{path.name}.partial"),
        fingerprint,
        embedder,
        image_embedder,
        stats,
        lambda: _stream(sources, [], stats, on_progress),
        {
            "name": manifest.get("name") or path.name,
            "sources": [*manifest.get("sources", []), *(str(s) for s in sources)],
            "attribution": manifest.get("attribution", []),
        },
        on_progress,
        prepare=prepare,
        publish=publish,
        warn_duplicates=False,
    )  # nothing new: the KB is left as it was
    stats.seconds = time.perf_counter() - t0
    return stats
