"""Load and reliability of ``medloupe serve`` on loopback, bounded in count and time.

Phase 1 (load): N concurrent clients each post runs (the bundled CT slice, no VLM) and
follow each run's event stream to its end; a 429 is retried after Retry-After. Malformed
requests (bad multipart, huge upload, wrong types, unknown run ids) are sent in between and
must each get the right 4xx while the server stays healthy.
Phase 2 (crash): runs are posted, the server is killed with SIGKILL mid-work, restarted on
the same MEDLOUPE_HOME, and every accepted run must end done or failed with a reason.

Reports throughput, p50/p95 latency (post -> answer), peak server memory (VmHWM), and the
counts of runs accepted, completed, failed with a reason, and lost (goal: zero lost).

    python benchmarks/bench_serve.py [--clients 8] [--runs-per-client 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_report import append_section, machine

from tests.service_helpers import Server, post_run, sse_events, wait_done


def _ct_slice() -> bytes:
    import data_store

    return (Path(data_store.__file__).parent / "data" / "693_UNCR.dcm").read_bytes()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _client(
    srv: Server, n: int, image: bytes, results: list[dict[str, object]], lock: threading.Lock
) -> None:
    with httpx.Client(base_url=srv.url, timeout=300) as c:
        for i in range(n):
            t0 = time.perf_counter()
            throttled = 0
            while True:
                r = post_run(c, image, f"What organ is shown? (client run {i})")
                if r.status_code != 429:
                    break
                throttled += 1
                time.sleep(float(r.headers.get("retry-after", "1")) / 5)
            if r.status_code != 202:
                with lock:
                    results.append({"accepted": False, "code": r.status_code})
                continue
            run_id = r.json()["run_id"]
            last = None
            for name, _data in sse_events(c, run_id, timeout_s=600):
                last = name if name in ("answer", "failed") else last
            info = c.get(f"/v1/runs/{run_id}").json()
            with lock:
                results.append(
                    {
                        "accepted": True,
                        "run_id": run_id,
                        "status": info["status"],
                        "error": info["error"],
                        "stream_end": last,
                        "latency_s": time.perf_counter() - t0,
                        "throttled": throttled,
                    }
                )


def _malformed(srv: Server, image: bytes) -> list[tuple[str, int, int]]:
    """(what, expected status, got status) for each malformed request."""
    q = "What organ is shown?"
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        checks = [
            ("multipart without image", 422, c.post("/v1/runs", data={"question": q})),
            ("JSON body, not multipart", 422, c.post("/v1/runs", json={"question": q})),
            ("not an image", 415, post_run(c, b"%PDF-1.7" + b"x" * 900, q)),
            ("truncated DICOM", 400, post_run(c, image[: len(image) // 3], q)),
            ("upload over the limit", 413, post_run(c, b"\x89PNG\r\n\x1a\n" + b"\0" * (70 << 20), q)),
            ("wrong option type", 422, post_run(c, image, q, {"max_steps": "many"})),
            ("unknown option", 422, post_run(c, image, q, {"no_such": 1})),
            ("empty question", 422, post_run(c, image, "  ")),
            ("unknown run id", 404, c.get("/v1/runs/run-20000101-000000-abcdef")),
            ("path in run id", 404, c.get("/v1/runs/..%2F..%2Fetc")),
        ]
        healthy = c.get("/healthz").status_code
    return [(what, want, r.status_code) for what, want, r in checks] + [
        ("health after malformed requests", 200, healthy)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--runs-per-client", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queue", type=int, default=4)
    ap.add_argument("--crash-runs", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    image = _ct_slice()

    with tempfile.TemporaryDirectory() as tmp:
        # -- phase 1: load
        srv = Server(Path(tmp) / "load", "--vlm", "none", "--workers", str(args.workers), "--queue", str(args.queue))
        srv.start()
        assert srv.proc is not None
        results: list[dict[str, object]] = []
        lock = threading.Lock()
        t0 = time.perf_counter()
        threads = [
            threading.Thread(target=_client, args=(srv, args.runs_per_client, image, results, lock))
            for _ in range(args.clients)
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)
        malformed = _malformed(srv, image)  # while the load runs
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        peak_mb = _peak_rss_mb(srv.proc.pid)
        srv.stop()

        accepted = [r for r in results if r["accepted"]]
        done = [r for r in accepted if r["status"] == "done"]
        failed = [r for r in accepted if r["status"] == "failed" and r["error"]]
        lost = len(accepted) - len(done) - len(failed)
        lat = sorted(float(r["latency_s"]) for r in done)  # type: ignore[arg-type]
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else float("nan")
        throttled = sum(int(r.get("throttled", 0)) for r in accepted)  # type: ignore[call-overload]

        # -- phase 2: crash and restart
        home = Path(tmp) / "crash"
        srv = Server(home, "--vlm", "none", "--workers", str(args.workers), "--queue", str(args.crash_runs)).start()
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            ids = [
                post_run(c, image, f"What organ is shown? (crash run {i})").json()["run_id"]
                for i in range(args.crash_runs)
            ]
        srv.kill()  # at once: most runs are still queued or mid-graph
        srv2 = Server(home, "--vlm", "none", "--workers", str(args.workers)).start()
        t1 = time.perf_counter()
        with httpx.Client(base_url=srv2.url, timeout=120) as c:
            final = [wait_done(c, i, timeout_s=600) for i in ids]
        recover_s = time.perf_counter() - t1
        srv2.stop()
        c_done = sum(1 for f in final if f["status"] == "done")
        c_failed = sum(1 for f in final if f["status"] == "failed" and f["error"])
        c_resumed = sum(1 for f in final if f["resumes"])
        c_lost = len(ids) - c_done - c_failed
        c_reasons = sorted({str(f["error"])[:120] for f in final if f["status"] == "failed"})

    bad = [m for m in malformed if m[1] != m[2]]
    rows = [
        ("clients x runs each", f"{args.clients} x {args.runs_per_client}", f"workers {args.workers}, queue {args.queue}"),
        ("runs accepted / completed", f"{len(accepted)} / {len(done)}", f"429 answers retried: {throttled}"),
        ("runs failed with a reason", str(len(failed)), ""),
        ("runs lost", str(lost), "goal 0"),
        ("throughput", f"{len(done) / wall:.2f} runs/s", f"{wall:.1f} s wall"),
        ("latency p50 / p95 (post -> answer)", f"{statistics.median(lat):.2f} s / {p95:.2f} s" if lat else "n/a", "includes queueing"),
        ("peak server memory (VmHWM)", f"{peak_mb:.0f} MB", ""),
        ("malformed requests with the right 4xx", f"{len(malformed) - len(bad)}/{len(malformed)}", "; ".join(f"{w}: want {a} got {b}" for w, a, b in bad) or "server healthy after"),
        ("crash: runs accepted before SIGKILL", str(len(ids)), f"{c_resumed} resumed after restart"),
        ("crash: completed / failed with reason / lost", f"{c_done} / {c_failed} / {c_lost}", f"all settled {recover_s:.1f} s after restart; goal 0 lost" + "".join(f"; failed: {r}" for r in c_reasons)),
    ]
    note = (
        "Runs use the bundled CT slice (pydicom-data 693_UNCR.dcm) with no VLM and no KB, so "
        "the load is the graph, the classical tools and the HTTP/SSE layer. Latency counts "
        "from the POST to the end of the event stream."
    )
    if args.no_write:
        print(json.dumps(rows, indent=1))
        return
    append_section("serve API under load and a crash", rows, note=note, context=machine("loopback"))


if __name__ == "__main__":
    main()
