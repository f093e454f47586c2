"""Streaming ingestion of a JSONL corpus through ``medloupe kb build`` (the CLI, one process
per build):

- throughput (passages/s, the whole command: parsing, embedding, storing, indexing) and the
  peak resident memory of builds of two corpus sizes, to show that memory is bounded by a
  chunk rather than by the corpus;
- a build SIGKILLed half-way and run again: it resumes from its last recorded chunk, and the
  KB it finishes holds the same passages (same corpus hash) as an uninterrupted build.

The corpus is the OpenStax *Anatomy and Physiology 2e* passages (../shared), repeated with new
ids up to the size asked, so passage lengths are those of a real textbook. Text only (figures
are timed by bench_kb.py). Writes its section of BENCHMARKS.md.

Run: ``.venv/bin/python benchmarks/bench_kb_ingest.py`` (about 8 minutes on 2 cores;
``--sizes 2000,10000`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_report import append_section, machine

from medloupe.config import env_name

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT.parent / "shared" / "textbooks" / "openstax-ap2e"

CHILD = """
import json, resource, sys, time
from medloupe.cli import main
sys.argv = ["medloupe", "kb", "build", sys.argv[1], "--out", sys.argv[2],
            "--image-embedder", "none", "--text-backend", sys.argv[3]]
t0 = time.perf_counter()
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sys.stderr.write(json.dumps({"code": code, "seconds": time.perf_counter() - t0,
                             "peak_mb": peak}) + "\\n")
"""


def write_corpus(path: Path, n: int) -> None:
    from medloupe.knowledge_base.loaders import LoadReport, load_openstax

    texts = [p.text for p in load_openstax(BOOK, LoadReport())]
    with path.open("w") as f:
        for i in range(n):
            page = {"document": "A&P 2e, repeated", "id": f"p{i}", "text": texts[i % len(texts)]}
            f.write(json.dumps(page) + "\n")


def build(corpus: Path, out: Path, backend: str, *, kill_after: float | None = None) -> dict:
    """Run one ``kb build`` in a child process; its result line (or ``killed``)."""
    env = {**os.environ, env_name("log_level"): "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(corpus), str(out), backend],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return {"killed": True}
    _, err = proc.communicate()
    lines = [line for line in err.splitlines() if line.startswith('{"code"')]
    if proc.returncode != 0 or not lines or json.loads(lines[-1])["code"] not in (0, None):
        raise SystemExit(f"kb build failed:\n{err[-3000:]}")
    return json.loads(lines[-1])


def kb_facts(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    return {"count": manifest["count"], "hash": manifest["corpus_hash"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,10000")
    parser.add_argument("--text-backend", default="auto")
    args = parser.parse_args()
    if not BOOK.is_dir():
        raise SystemExit(f"the shared textbook is absent ({BOOK}); nothing to benchmark")
    from medloupe.knowledge_base.embedders import resolve_backend

    backend = resolve_backend(args.text_backend)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        warm = root / "warm.jsonl"
        write_corpus(warm, 50)  # the ONNX export is made once, before anything is timed
        build(warm, root / "warm", backend)
        results = {}
        for n in sizes:
            corpus = root / f"corpus-{n}.jsonl"
            write_corpus(corpus, n)
            got = build(corpus, root / f"kb-{n}", backend)
            count = kb_facts(root / f"kb-{n}")["count"]
            results[n] = got
            rows.append(
                (
                    f"kb build, {n:,}-page JSONL ({count:,} passages), text backend {backend}",
                    f"{count / got['seconds']:.1f} passages/s ({got['seconds']:.0f} s)",
                    f"peak RSS {got['peak_mb']:.0f} MB",
                )
            )
            print(rows[-1], flush=True)
        small, big = sizes[0], sizes[-1]
        if len(sizes) > 1:
            ratio = results[big]["peak_mb"] / results[small]["peak_mb"]
            rows.append(
                (
                    f"peak memory, {big:,} against {small:,} pages (one run)",
                    f"{ratio:.2f}x for {big / small:.0f}x the corpus",
                    "chunks of 2,048 passages: memory is bounded by a chunk, not the corpus",
                )
            )
            print(rows[-1], flush=True)
        # kill the biggest build half-way through its expected time, then run it again
        corpus, out = root / f"corpus-{big}.jsonl", root / "resumed"
        build(corpus, out, backend, kill_after=results[big]["seconds"] / 2)
        state = json.loads((root / ".resumed.partial" / "build.json").read_text())
        again = build(corpus, out, backend)
        same = kb_facts(out) == kb_facts(root / f"kb-{big}")
        rows.append(
            (
                f"kb build SIGKILLed half-way ({big:,} pages) and run again",
                f"resumed after {state['rows']:,} passages; the rerun took "
                f"{again['seconds']:.0f} s (the whole build {results[big]['seconds']:.0f} s)",
                f"finished KB has the same {kb_facts(out)['count']:,} passages and corpus hash "
                f"as the uninterrupted build: {'yes' if same else 'NO'}",
            )
        )
        print(rows[-1], flush=True)
    append_section(
        "knowledge base, streaming JSONL ingestion",
        rows,
        context=machine(f"all-MiniLM-L6-v2, text backend {backend}"),
        note=(
            "Each build is one `medloupe kb build` process (reading, embedding, storing and "
            "indexing; model loading included); peak RSS is that process's maximum resident "
            "set. The corpus repeats the OpenStax A&P 2e passages (CC BY 4.0) with new ids."
        ),
    )


if __name__ == "__main__":
    main()
