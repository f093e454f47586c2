"""Knowledge-base benchmark on the OpenStax *Anatomy and Physiology 2e* book (../shared):

- ingestion throughput for the whole book (sections/s, passages/s; text embedding, figure
  embedding and indexing timed apart), with each text backend (int8 ONNX Runtime and PyTorch),
  and the speed and recall@5 of the first against the second, measured in one run;
- retrieval quality on a labelled query set built from the book itself:
  * text: each glossary definition's meaning (glossaries are not indexed) -> the section
    (module) whose glossary defines it;
  * image: a random 40-80 % crop of each figure -> the figure's section;
  * fused: a definition's meaning plus a crop of a figure of the same section;
  recall@5 and MRR@10 at section level (goal: recall@5 >= 0.8 for text);
- FAISS query latency p50/p95 (single queries) at 10k, 100k and 1M synthetic clustered
  384-d vectors with the index medloupe builds at that size, and recall@10 of the approximate
  index against exact search (goal >= 0.95 where it is used). CPU here; the index moves to
  the GPU when FAISS sees one.

Writes its section of BENCHMARKS.md. Run: ``.venv/bin/python benchmarks/bench_kb.py``
(about 10-15 minutes on 2 cores; ``--sizes 10000,100000`` for a shorter run).

Book: "Anatomy and Physiology 2e, OpenStax (Rice University), CC BY 4.0".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
from bench_report import append_section, machine
from PIL import Image

from medloupe.knowledge_base import KnowledgeBase, build_kb
from medloupe.knowledge_base.embedders import TextEmbedder
from medloupe.knowledge_base.index import (
    RerankedIndex,
    build_faiss_index,
    faiss_gpus,
    to_device,
)
from medloupe.knowledge_base.loaders import clean

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT.parent / "shared" / "textbooks" / "openstax-ap2e"
CNX = "{http://cnx.rice.edu/cnxml}"


def module_of(passage_id: str) -> str:
    return passage_id.split(":")[1]


def glossary_queries(book: Path) -> list[tuple[str, set[str]]]:
    """(definition meaning, modules whose glossary defines that meaning)."""
    where: dict[str, set[str]] = defaultdict(set)
    for path in sorted((book / "modules").glob("*/index.cnxml")):
        root = ET.parse(path).getroot()
        for d in root.iter(f"{CNX}definition"):
            meaning = d.find(f"{CNX}meaning")
            if meaning is None:
                continue
            text = clean("".join(meaning.itertext()))
            if len(text.split()) >= 4:
                where[text].add(path.parent.name)
    return sorted(where.items())


def rank_of_hit(ids: list[str], modules: set[str]) -> int | None:
    for i, pid in enumerate(ids, 1):
        if module_of(pid) in modules:
            return i
    return None


def score(ranks: list[int | None]) -> tuple[float, float]:
    recall5 = sum(1 for r in ranks if r is not None and r <= 5) / len(ranks)
    mrr = sum(1.0 / r for r in ranks if r is not None and r <= 10) / len(ranks)
    return recall5, mrr


def random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    ch, cw = max(8, int(h * rng.uniform(0.4, 0.8))), max(8, int(w * rng.uniform(0.4, 0.8)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return np.ascontiguousarray(image[y : y + ch, x : x + cw])


def quality(
    kb: KnowledgeBase, book: Path, limit: int | None
) -> dict[str, tuple[float, float, int]]:
    rng = np.random.default_rng(0)
    queries = glossary_queries(book)
    if limit:
        idx = rng.choice(len(queries), size=min(limit, len(queries)), replace=False)
        queries = [queries[i] for i in sorted(idx)]
    text_ranks = [rank_of_hit([h.id for h in kb.search_sync(q, k=10)], mods) for q, mods in queries]
    figures = list(
        kb._db.execute("SELECT id, figure FROM passages WHERE kind = 'figure' ORDER BY row")
    )
    by_module: dict[str, list[str]] = defaultdict(list)
    for pid, fig in figures:
        by_module[module_of(pid)].append(fig)
    image_ranks = []
    for pid, fig in figures:
        with Image.open(kb.path / "figures" / fig) as im:
            crop = random_crop(np.asarray(im.convert("RGB")), rng)
        hits = kb.search_sync("", image=crop, k=10)
        image_ranks.append(rank_of_hit([h.id for h in hits], {module_of(pid)}))
    fused_ranks = []
    for q, mods in queries:
        with_fig = [m for m in sorted(mods) if by_module.get(m)]
        if not with_fig:
            continue
        m = with_fig[0]
        fig = by_module[m][int(rng.integers(0, len(by_module[m])))]
        with Image.open(kb.path / "figures" / fig) as im:
            crop = random_crop(np.asarray(im.convert("RGB")), rng)
        hits = kb.search_sync(q, image=crop, k=10)
        fused_ranks.append(rank_of_hit([h.id for h in hits], mods))
    return {
        "text (definition -> section)": (*score(text_ranks), len(text_ranks)),
        "image (40-80 % figure crop -> section)": (*score(image_ranks), len(image_ranks)),
        "fused (definition + crop of a figure of its section)": (
            *score(fused_ranks),
            len(fused_ranks),
        ),
    }


def clustered(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """Embedding-like vectors: points around cluster centres, L2-normalised."""
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        c = centers[rng.integers(0, len(centers), m)]
        v = c + 0.6 * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        out[s : s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def scale(sizes: list[int], dim: int = 384, nq: int = 200) -> list[tuple[str, ...]]:
    import faiss

    rng = np.random.default_rng(1)
    centers = rng.standard_normal((2000, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rows = []
    for n in sizes:
        vecs = clustered(n, dim, rng, centers)
        queries = clustered(nq, dim, rng, centers)
        t0 = time.perf_counter()
        built = build_faiss_index(vecs)
        if built.kind == "ivfpq":  # compressed, re-ranked from the vectors, on the CPU
            cpu_index = index = RerankedIndex(built.index, vecs)
        else:
            cpu_index = built.index
            index = to_device(cpu_index)
        build_s = time.perf_counter() - t0
        on_gpu = index is not cpu_index
        kind = {"flat": "flat", "ivf": "IVF", "ivfpq": "IVF-PQ"}[built.kind]
        lat = []
        got = np.empty((nq, 10), dtype=np.int64)
        for i in range(nq):
            t = time.perf_counter()
            _, ids = index.search(queries[i : i + 1], 10)
            lat.append((time.perf_counter() - t) * 1000.0)
            got[i] = ids[0]
        p50, p95 = statistics.median(lat), float(np.percentile(lat, 95))
        # the same index on the CPU: same neighbours? and a batch of queries at once
        t = time.perf_counter()
        index.search(queries, 10)
        batch_ms = (time.perf_counter() - t) * 1000.0
        device_note = f"{nq} queries in one batch {batch_ms:.1f} ms"
        if on_gpu:
            t = time.perf_counter()
            _, cpu_ids = cpu_index.search(queries, 10)
            cpu_batch_ms = (time.perf_counter() - t) * 1000.0
            agree = float(
                np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, cpu_ids, strict=True)])
            )
            device_note += (
                f" (CPU {cpu_batch_ms:.1f} ms); top-10 shared with the same index on the CPU "
                f"{agree:.3f}"
            )
        if kind != "flat":
            exact = faiss.IndexFlatIP(dim)
            exact.add(vecs)
            lat_exact = []
            truth = np.empty((nq, 10), dtype=np.int64)
            for i in range(nq):
                t = time.perf_counter()
                _, ids = exact.search(queries[i : i + 1], 10)
                lat_exact.append((time.perf_counter() - t) * 1000.0)
                truth[i] = ids[0]
            recall = float(
                np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)])
            )
            note = (
                f"recall@10 vs exact {recall:.3f} (nlist {cpu_index.nlist}, nprobe "
                f"{cpu_index.nprobe}); exact search on the CPU p50 "
                f"{statistics.median(lat_exact):.2f} ms"
            )
            del exact
        else:
            note = "exact (IndexFlatIP)"
        note += "; " + device_note
        rows.append(
            (
                f"{n:,} vectors ({kind}, build {build_s:.1f} s)",
                f"p50 {p50:.2f} ms, p95 {p95:.2f} ms",
                note,
            )
        )
        print(rows[-1], flush=True)
        del index, cpu_index, vecs
    return rows


def faiss_device() -> str:
    import faiss

    gpus = faiss_gpus()
    if not gpus:
        return "FAISS on CPU"
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
    return f"FAISS {faiss.__version__} on {gpus} GPU(s), {name}"


def scale_section(rows: list[tuple[str, ...]]) -> None:
    append_section(
        "knowledge base, FAISS latency at scale",
        rows,
        context=machine(faiss_device()),
        note=(
            "Single queries one at a time (p50/p95) and a batch of the same queries, on "
            "synthetic clustered 384-d vectors with the index medloupe builds at that size "
            "(flat below 50,000 vectors, IVF above); build time includes training the IVF "
            "quantiser on the CPU and the copy to the GPU."
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kb", type=Path, help="reuse this built KB (skips the ingestion timing)")
    parser.add_argument("--limit", type=int, default=None, help="text queries at most")
    parser.add_argument("--image-embedder", default="auto")
    parser.add_argument(
        "--text-backends",
        default="onnx-int8,torch",
        help="build the book with each (the first is compared with the second)",
    )
    parser.add_argument(
        "--scale-only",
        action="store_true",
        help="only the FAISS latency rows (synthetic vectors; no book needed), e.g. on a GPU",
    )
    args = parser.parse_args()
    if args.scale_only:
        scale_section(scale([int(s) for s in args.sizes.split(",") if s]))
        return
    if not BOOK.is_dir():
        raise SystemExit(f"the shared textbook is absent ({BOOK}); nothing to benchmark")
    rows: list[tuple[str, ...]] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-kb-")
    backends = [b for b in args.text_backends.split(",") if b]
    results: dict[str, dict[str, float]] = {}
    image_id = None
    for backend in backends if not args.kb else ["as built"]:
        if args.kb:
            kb_path = args.kb
        else:
            kb_path = Path(tmp.name) / backend
            t0 = time.perf_counter()
            stats = build_kb(
                [BOOK],
                kb_path,
                embedder=TextEmbedder(backend=backend),
                image_embedder=args.image_embedder,
            )
            total = time.perf_counter() - t0
            sections = sum(1 for _ in (BOOK / "modules").glob("*/index.cnxml"))
            load_s = total - stats.embed_seconds - stats.figure_seconds - stats.index_seconds
            rate = stats.passages / max(stats.embed_seconds, 1e-9)
            results[backend] = {"embed rate": rate}
            rows.append(
                (
                    f"ingestion, whole book, text backend {backend}",
                    f"{sections} sections, {stats.passages} passages, {stats.figures} figures "
                    f"in {total:.0f} s: {sections / total:.2f} sections/s, "
                    f"{stats.passages / total:.1f} passages/s",
                    f"text embedding {stats.embed_seconds:.0f} s ({rate:.0f} passages/s), "
                    f"figure embedding {stats.figure_seconds:.1f} s, index "
                    f"{stats.index_seconds:.1f} s, reading and storing {load_s:.1f} s; "
                    f"{len(stats.report.problems)} problems reported",
                )
            )
            print(rows[-1], flush=True)
        kb = KnowledgeBase(kb_path)
        image_id = (kb.manifest.get("image_embedder") or {}).get("id")
        for name, (r5, mrr, n) in quality(kb, BOOK, args.limit).items():
            results.setdefault(backend, {})[name] = r5
            rows.append(
                (
                    f"retrieval {name}, {n} queries, text backend {kb.embedder.backend}",
                    f"recall@5 {r5:.3f}, MRR@10 {mrr:.3f}",
                    "goal recall@5 >= 0.8" if name.startswith("text") else "",
                )
            )
            print(rows[-1], flush=True)
        kb.close()
    if len(results) == 2:
        (fast, fast_r), (ref, ref_r) = results.items()
        deltas = ", ".join(
            f"{name.split(' ')[0]} {fast_r[name] - ref_r[name]:+.3f}"
            for name in fast_r
            if name != "embed rate"
        )
        rows.append(
            (
                f"text backend {fast} against {ref} (one run)",
                f"text embedding {fast_r['embed rate'] / ref_r['embed rate']:.2f}x as fast",
                f"recall@5 differences: {deltas} (goal: within 0.01)",
            )
        )
        print(rows[-1], flush=True)
    rows += scale([int(s) for s in args.sizes.split(",") if s])
    append_section(
        "knowledge base, OpenStax A&P 2e",
        rows,
        context=machine(f"{faiss_device()}; text all-MiniLM-L6-v2, images {image_id}"),
        note=(
            "A hit is a passage from the right section (CNXML module) in the top k. Image queries "
            "are crops of figures that are themselves in the index, so they measure finding the "
            "picture again from a part of it, not recognising anatomy drawn differently. Latency "
            "is one query at a "
            "time on synthetic clustered vectors, which are easy for IVF (nprobe 1-2 reach the "
            "recall target); on vectors with the covariance of real MiniLM embeddings see "
            "bench_kb_recall.py. Book: Anatomy and Physiology 2e, OpenStax "
            "(Rice University), CC BY 4.0."
        ),
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
