"""IVF recall and latency at scale on realistic vectors: 384-d vectors drawn from a Gaussian with
the mean and covariance of real all-MiniLM-L6-v2 embeddings (the default KB's passages: HPO
and ICD-10-CM terms), L2-normalised, not isotropic clusters. For each size, the index medloupe
builds (``build_faiss_index``: IVF with ``nprobe`` tuned at build time to recall@10 >= 0.95 on
the corpus's own vectors; from 500k vectors compressed, 4-bit IVF-PQ with exact re-ranking)
against exact search on fresh queries from the same distribution.

    python benchmarks/bench_kb_recall.py [--sizes 100000,1000000] [--queries 200]

Writes the "knowledge base, IVF on MiniLM-covariance vectors" section of BENCHMARKS.md (about
5 minutes for 1M vectors on 2 cores, 3.5 GB of memory).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from bench_report import append_section, machine

from medloupe.knowledge_base.default import default_kb
from medloupe.knowledge_base.index import (
    RERANK_PER_K,
    RerankedIndex,
    build_faiss_index,
    exact_neighbours,
)


def minilm_like(n: int, mean: np.ndarray, chol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(n, dim)`` float32 unit vectors drawn from N(mean, L L^T)."""
    out = np.empty((n, len(mean)), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        v = rng.standard_normal((m, len(mean)), dtype=np.float32) @ chol.T + mean
        out[s : s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    kb = default_kb()
    real = np.load(kb.path / "vectors.npy").astype(np.float64)
    kb.close()
    mean = real.mean(0)
    chol = np.linalg.cholesky(np.cov(real, rowvar=False) + 1e-6 * np.eye(real.shape[1]))
    mean32, chol32 = mean.astype(np.float32), chol.astype(np.float32)
    rng = np.random.default_rng(0)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-kb-recall-"))
    for n in [int(s) for s in args.sizes.split(",") if s]:
        # saved and memory-mapped, as a KB keeps them (the compressed index re-ranks from them)
        np.save(tmp / "vectors.npy", minilm_like(n, mean32, chol32, rng))
        vecs = np.load(tmp / "vectors.npy", mmap_mode="r")
        queries = minilm_like(args.queries, mean32, chol32, rng)
        t0 = time.perf_counter()
        built = build_faiss_index(vecs)
        build_s = time.perf_counter() - t0
        tuning = built.recall
        index_bytes = len(faiss.serialize_index(built.index))
        index = RerankedIndex(built.index, vecs) if built.kind == "ivfpq" else built.index
        lat, got = [], []
        for q in queries:
            t = time.perf_counter()
            _, ids = index.search(q[None], 10)
            lat.append((time.perf_counter() - t) * 1000.0)
            got.append(set(ids[0].tolist()))
        truth = exact_neighbours(queries, vecs, 10)
        recall = float(
            np.mean([len(g & set(t.tolist())) / 10 for g, t in zip(got, truth, strict=True)])
        )
        kind = type(built.index).__name__
        tuned = (
            f"nprobe {tuning['nprobe']} of nlist {index.nlist} chosen at build (recall@10 "
            f"{tuning['recall_at_k']:.3f} on {tuning['queries']} of its own vectors)"
            if tuning
            else "exact"
        )
        if built.kind == "ivfpq":
            tuned += f"; top {RERANK_PER_K * 10} re-scored exactly from the mapped vectors"
        rows.append(
            (
                f"{n:,} vectors ({kind}, build {build_s:.0f} s incl. tuning)",
                f"p50 {statistics.median(lat):.2f} ms, p95 {np.percentile(lat, 95):.2f} ms; "
                f"recall@10 on fresh queries {recall:.3f}",
                f"{tuned}; index memory {index_bytes / 1e9 * 1e6 / n:.3f} GB per million "
                f"vectors (vectors.npy, {vecs.nbytes / 1e9 * 1e6 / n:.2f} GB per million, stays "
                "on disk, memory-mapped); goals p50 <= 2 ms at recall@10 >= 0.95, <= 0.5 GB "
                "per million",
            )
        )
        print(rows[-1], flush=True)
        del vecs, index, built
    shutil.rmtree(tmp, ignore_errors=True)
    append_section(
        "knowledge base, IVF on MiniLM-covariance vectors",
        rows,
        context=machine(f"FAISS on CPU; covariance of {len(real)} real MiniLM embeddings"),
        note=(
            "Vectors and queries drawn from a Gaussian with the mean and covariance of the "
            "default KB's MiniLM embeddings, unit-normalised; single queries one at a time; "
            "recall against exact inner-product search."
        ),
    )


if __name__ == "__main__":
    main()
