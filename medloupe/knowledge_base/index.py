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
IVF index (``IndexIVFFlat``, ``nlist = 4 sqrt(n)``, ``nprobe`` the smallest that reaches
recall@10 >= 0.95 on the corpus's own vectors, :func:`tune_nprobe`, recorded in the manifest)
from there, and from :data:`COMPRESS_MIN_VECTORS` a compressed one: IVF with 4-bit product
quantisation scanned with SIMD (``IndexIVFPQFastScan``, 4 bits per :data:`PQ_DIMS`
dimensions) whose :data:`RERANK_PER_K` x k
best candidates are re-scored exactly against ``vectors.npy``, memory-mapped
(:class:`RerankedIndex`), its ``nprobe`` tuned on the re-ranked recall. Flat and IVF indexes
move to the GPU when ``faiss.get_num_gpus() > 0`` (the compressed one stays on the CPU: it
is small and its re-ranking reads the mapped vectors). Building and adding: :mod:`.build`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medloupe.errors import KnowledgeBaseError
from medloupe.knowledge_base.embedders import TextEmbedder
from medloupe.knowledge_base.image_embedders import (
    ImageEmbedder,
    image_embedder_from_spec,
    reciprocal_rank_fusion,
)
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


COMPRESS_MIN_VECTORS = 500_000
PQ_DIMS = 2  # dimensions per 4-bit code of the compressed index (96 bytes a 384-d vector)
RERANK_PER_K = 30  # candidates re-scored exactly per result asked for
TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_QUERIES = 500


class BuiltIndex(NamedTuple):
    """A FAISS index, its kind (``flat``, ``ivf``, ``ivfpq``) and, for an IVF index, how its
    ``nprobe`` was chosen (:func:`tune_nprobe`; ``None`` for an exact index)."""

    index: Any
    recall: dict[str, Any] | None
    kind: str = "flat"


class RerankedIndex:
    """A compressed IVF-PQ index whose candidates are re-scored exactly.

    Args:
        index: the ``IndexIVFPQFastScan`` (inner product).
        vectors: ``(n, dim)`` float32 normalised vectors, row i = FAISS id i (a memory map
            of ``vectors.npy``: only the candidates' rows are read).
        per_k: candidates fetched per result asked for.

    :meth:`search` has FAISS's signature: ``(scores, rows)`` of shape ``(len(queries), k)``,
    exact inner products, best first, rows -1 when fewer.
    """

    def __init__(self, index: Any, vectors: np.ndarray, per_k: int = RERANK_PER_K) -> None:
        self.index = index
        self.vectors = vectors
        self.per_k = per_k

    @property
    def nprobe(self) -> int:
        return int(self.index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.index.nprobe = value

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, candidates = self.index.search(queries, max(k * self.per_k, k))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        for i, hits in enumerate(candidates):
            found = np.sort(hits[hits >= 0])  # ascending rows: sequential reads of the map
            exact = np.asarray(self.vectors[found]) @ queries[i]
            best = np.argsort(-exact)[:k]
            scores[i, : len(best)], rows[i, : len(best)] = exact[best], found[best]
        return scores, rows


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """``(len(queries), k)`` rows of the ``k`` largest inner products, best first, computed in
    chunks of 65,536 vectors (no second copy of a large corpus)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), 65_536):
        s = queries @ np.asarray(vectors[start : start + 65_536]).T
        cat_s = np.concatenate([best_s, s], axis=1)
        ids = np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)
        cat_i = np.concatenate([best_i, ids], axis=1)
        top = np.argsort(-cat_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    return best_i


def tune_nprobe(
    index: Any,
    vectors: np.ndarray,
    *,
    target: float = TARGET_RECALL,
    k: int = RECALL_K,
    queries: int = RECALL_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Set an IVF ``index``'s ``nprobe`` to the smallest (doubling from 1, then bisecting; at
    most ``nlist``) whose recall@``k`` against exact search reaches ``target`` with a margin
    for the sample: the mean less two standard errors, measured on a held-back sample of
    the corpus itself (``queries`` of its own vectors, each query's own row left out of both
    neighbour lists). Returns what the manifest records (``nprobe``, ``recall_at_k``,
    ``recall_lower_bound``, ``k``, ``target``, ``queries``, and each tried ``nprobe``'s
    recall and lower bound)."""
    n = len(vectors)
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, size=min(queries, n), replace=False)
    q = np.ascontiguousarray(vectors[rows], dtype=np.float32)

    def others(found: np.ndarray) -> list[set[int]]:  # each query's k best but itself
        return [
            set([int(r) for r in f if r != own and r >= 0][:k])
            for f, own in zip(found, rows, strict=True)
        ]

    truth = others(exact_neighbours(q, vectors, k + 1))
    tried: dict[int, float] = {}
    bounds: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        """The lower bound (mean less two standard errors) of recall@k at ``nprobe``."""
        if nprobe not in tried:
            index.nprobe = nprobe
            _, got = index.search(q, k + 1)
            each = np.array(
                [len(g & t) / max(len(t), 1) for g, t in zip(others(got), truth, strict=True)]
            )
            tried[nprobe] = float(each.mean())
            bounds[nprobe] = float(each.mean() - 2 * each.std() / math.sqrt(len(each)))
        return bounds[nprobe]

    nprobe = 1
    while recall(nprobe) < target and nprobe < index.nlist:
        nprobe = min(nprobe * 2, int(index.nlist))
    low = nprobe // 2  # below target (or 0): bisect to the smallest nprobe that reaches it
    while recall(nprobe) >= target and nprobe - low > 1:
        mid = (low + nprobe) // 2
        low, nprobe = (low, mid) if recall(mid) >= target else (mid, nprobe)
    index.nprobe = nprobe
    return {
        "nprobe": nprobe,
        "recall_at_k": round(tried[nprobe], 4),
        "recall_lower_bound": round(bounds[nprobe], 4),
        "k": k,
        "target": target,
        "queries": len(rows),
        "tried": {str(p): round(r, 4) for p, r in tried.items()},
        "lower_bounds": {str(p): round(r, 4) for p, r in bounds.items()},
    }


def index_kind(n: int, *, compress_from: int | None = None) -> str:
    """The index built for ``n`` vectors: ``flat``, ``ivf`` or ``ivfpq`` (compressed from
    ``compress_from``, default :data:`COMPRESS_MIN_VECTORS`)."""
    if n < APPROX_MIN_VECTORS:
        return "flat"
    return "ivfpq" if n >= (compress_from or COMPRESS_MIN_VECTORS) else "ivf"


def build_faiss_index(
    vectors: np.ndarray,
    *,
    target_recall: float = TARGET_RECALL,
    compress_from: int | None = None,
) -> BuiltIndex:
    """An index over ``vectors`` (float32, normalised): flat below the approximate threshold,
    IVF above it, compressed IVF-PQ from ``compress_from`` (:func:`index_kind`); an IVF
    index is trained on a sample of the vectors and its ``nprobe`` tuned to
    ``target_recall`` (:func:`tune_nprobe`; for IVF-PQ, the recall after re-ranking, so
    ``vectors`` must stay where :class:`RerankedIndex` reads them)."""
    import faiss

    n, dim = vectors.shape
    kind = index_kind(n, compress_from=compress_from)
    if kind == "flat":
        flat = faiss.IndexFlatIP(dim)
        if n:
            flat.add(vectors)
        return BuiltIndex(flat, None, kind)
    nlist = int(4 * math.sqrt(n))
    quantizer = faiss.IndexFlatIP(dim)
    index: Any
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        if dim % PQ_DIMS:
            raise KnowledgeBaseError(
                f"a compressed index needs a dimension divisible by {PQ_DIMS}; the embedder "
                f"gives {dim}"
            )
        m = dim // PQ_DIMS
        index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = vectors[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for start in range(0, n, 100_000):  # a memory map is read in slices
        index.add(np.ascontiguousarray(vectors[start : start + 100_000], dtype=np.float32))
    tuned = index if kind == "ivf" else RerankedIndex(index, vectors)
    recall = tune_nprobe(tuned, vectors, target=target_recall)
    if kind == "ivfpq":
        recall["rerank_per_k"] = RERANK_PER_K
    return BuiltIndex(index, recall, kind)


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
    """A digest of ``(id, text)`` rows given in id order (a KB's passages: ``ORDER BY id``)."""
    h = hashlib.sha256()
    for pid, text in rows:
        h.update(pid.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\1")
    return h.hexdigest()


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
        # queries are embedded the way the passages were (older manifests: torch)
        self.embedder = embedder or TextEmbedder(
            built_with["id"], backend=built_with.get("backend", "torch")
        )
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

                index = faiss.read_index(str(self.path / "text.faiss"))
                self._vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
                if self.manifest.get("index", {}).get("type") == "ivfpq":
                    per_k = int(self.manifest["index"]["recall"]["rerank_per_k"])
                    self._index = RerankedIndex(index, self._vectors, per_k)
                else:
                    self._index = to_device(index)
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
