"""Replicas of ``medloupe serve`` on one real PostgreSQL (Debian's server, a fresh cluster on
loopback) and one shared home.

Phase 1 (throughput): the same runs submitted round-robin to 1 replica and to 3 replicas
(each ``--workers W``), and to one SQLite server for the embedded baseline; runs/s from the
first POST to the last run done.
Phase 2 (a replica killed): runs posted round-robin to 3 replicas, one SIGKILLed while it
holds runs; every accepted run must end done or failed with a reason, none lost, none
completed twice (two ``run_end`` events in its trace).
Phase 3 (every replica killed): the same with all replicas killed mid-load and new ones
started on the same database and home.

Runs use medloupe-mini (the default VLM) on the bundled chest radiograph, a CPU-bound mix.

    python benchmarks/bench_replicas.py [--runs 24] [--workers 1] [--lease 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_report import append_section, machine

from tests.postgres_helpers import Postgres, wait_owning
from tests.service_helpers import Server, post_run, wait_done


def _image() -> bytes:
    import data_store

    return (Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm").read_bytes()


def _start(home: Path, n: int, args: argparse.Namespace, url: str | None) -> list[Server]:
    env = {"MEDLOUPE_DATABASE_URL": url} if url else {}
    servers = [
        Server(home, "--workers", str(args.workers), "--queue", "256", "--lease", str(args.lease), env=env)
        for _ in range(n)
    ]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda s: s.start(timeout_s=300), servers))
    return servers


def _submit(servers: list[Server], image: bytes, n: int, tag: str) -> list[str]:
    ids = []
    for i in range(n):
        with httpx.Client(base_url=servers[i % len(servers)].url, timeout=120) as c:
            r = post_run(c, image, f"{tag} {i}: what modality is this image?")
        assert r.status_code == 202, r.text
        ids.append(r.json()["run_id"])
    return ids


def _settle(server: Server, ids: list[str]) -> list[dict[str, object]]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        return [wait_done(c, i, timeout_s=1800) for i in ids]


def _run_ends(server: Server, ids: list[str]) -> list[int]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        return [
            sum(e["kind"] == "run_end" for e in c.get(f"/v1/runs/{i}/trace").json()["events"])
            for i in ids
        ]


def _cpu_s(server: Server) -> float:
    """User + system CPU seconds of the server process so far."""
    assert server.proc is not None
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _throughput(
    root: Path, n_replicas: int, args: argparse.Namespace, url: str | None, image: bytes
) -> tuple[float, float]:
    """(runs/s, CPU cores the replicas kept busy on average)."""
    servers = _start(root, n_replicas, args, url)
    try:
        _settle(servers[0], _submit(servers, image, n_replicas * args.workers, "warm-up"))
        cpu0 = sum(_cpu_s(s) for s in servers)
        t0 = time.perf_counter()
        ids = _submit(servers, image, args.runs, "load")
        final = _settle(servers[0], ids)
        wall = time.perf_counter() - t0
        cores = (sum(_cpu_s(s) for s in servers) - cpu0) / wall
        assert all(f["status"] == "done" for f in final), final
    finally:
        for s in servers:
            s.stop()
    return args.runs / wall, cores


def _tally(final: list[dict[str, object]], ends: list[int]) -> tuple[int, int, int, int, int]:
    done = sum(f["status"] == "done" for f in final)
    failed = sum(f["status"] == "failed" and bool(f["error"]) for f in final)
    resumed = sum(bool(f["resumes"]) for f in final)
    return done, failed, len(final) - done - failed, sum(e > 1 for e in ends), resumed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--lease", type=float, default=6.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    image = _image()
    pg = Postgres().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            sqlite_rate, _ = _throughput(root / "sqlite", 1, args, None, image)
            one, one_cores = _throughput(root / "pg1", 1, args, pg.create_database(), image)
            three, three_cores = _throughput(root / "pg3", 3, args, pg.create_database(), image)

            url = pg.create_database()
            servers = _start(root / "kill", 3, args, url)
            ids = _submit(servers, image, args.runs, "kill")
            wait_owning(url, servers[0])
            t_kill = time.perf_counter()
            servers[0].kill()
            final = _settle(servers[1], ids)
            settle_one = time.perf_counter() - t_kill
            kill_one = _tally(final, _run_ends(servers[2], ids))

            ids_b = _submit(servers[1:], image, args.runs, "all")
            wait_owning(url, servers[1])
            for s in servers:
                s.kill()
            t_restart = time.perf_counter()
            fresh = _start(root / "kill", 3, args, url)
            final_b = _settle(fresh[0], ids_b)
            settle_all = time.perf_counter() - t_restart
            kill_all = _tally(final_b, _run_ends(fresh[1], ids_b))
            for s in fresh:
                s.stop()
    finally:
        pg.stop()

    def tally(t: tuple[int, int, int, int, int]) -> str:
        return f"{t[0]} / {t[1]} / {t[2]} / {t[3]}"

    cores = os.cpu_count() or 1
    ceiling = cores / (one_cores / one)  # runs/s with every core busy at one replica's CPU per run
    rows = [
        ("runs per phase, workers per replica", f"{args.runs}, {args.workers}", f"lease {args.lease:g} s"),
        ("throughput, 1 server on SQLite", f"{sqlite_rate:.2f} runs/s", "the embedded default"),
        ("throughput, 1 replica on PostgreSQL", f"{one:.2f} runs/s", f"{one / sqlite_rate:.2f}x SQLite; the replica kept {one_cores:.2f} of {cores} cores busy"),
        ("throughput, 3 replicas on PostgreSQL", f"{three:.2f} runs/s", f"{three / one:.2f}x one replica (goal 2x); {three_cores:.2f} cores busy, so at most {cores / one_cores:.2f}x was to be had"),
        ("CPU per run, 1 vs 3 replicas", f"{one_cores / one:.2f} s vs {three_cores / three:.2f} s", f"at {one_cores / one:.2f} CPU-s a run, {cores} cores finish at most {ceiling:.2f} runs/s: 3 replicas reached {three / ceiling:.0%} of that"),
        ("1 of 3 killed: done / failed / lost / completed twice", tally(kill_one), f"{kill_one[4]} taken over; all settled {settle_one:.1f} s after the kill; goal 0 lost, 0 twice"),
        ("all killed, 3 new: done / failed / lost / completed twice", tally(kill_all), f"{kill_all[4]} resumed; all settled {settle_all:.1f} s after the restart began"),
    ]
    note = (
        "Runs: medloupe-mini on the bundled chest radiograph (pydicom-data RG1_UNCR.dcm), "
        "submitted round-robin over the replicas; throughput counts from the first POST to "
        "the last run done, after one warm-up run per worker. Replicas share one home (the "
        "run directories) and one PostgreSQL 15 database (queue, run index, checkpoints, "
        "trace events, reviews)."
    )
    if args.no_write:
        print(json.dumps(rows, indent=1))
        return
    append_section("serve replicas on PostgreSQL", rows, note=note, context=machine("loopback"))


if __name__ == "__main__":
    main()
