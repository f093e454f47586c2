"""Several ``medloupe serve`` replicas on one real PostgreSQL and one shared home: clients
submit round-robin, a replica is SIGKILLed mid-load, then every replica is; no accepted run
is lost or completed twice, and every replica serves every run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.postgres_helpers import wait_owning
from tests.service_helpers import Server, post_run, sse_events, wait_done

pytestmark = [pytest.mark.interop, pytest.mark.slow]

LEASE_S = "6"


def _start(home: Path, url: str, n: int) -> list[Server]:
    servers = [
        Server(home, "--workers", "1", "--queue", "32", "--lease", LEASE_S,
               env={"MEDLOUPE_DATABASE_URL": url})
        for _ in range(n)
    ]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda s: s.start(timeout_s=180), servers))
    return servers


def _submit(servers: list[Server], image: bytes, n: int, tag: str) -> dict[str, Server]:
    accepted: dict[str, Server] = {}
    for i in range(n):
        srv = servers[i % len(servers)]
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = post_run(c, image, f"{tag} {i}: what modality is this image?")
        assert r.status_code == 202, r.text
        accepted[r.json()["run_id"]] = srv
    return accepted


def _run_ends(client: httpx.Client, run_id: str) -> int:
    trace = client.get(f"/v1/runs/{run_id}/trace").json()
    seqs = [e["seq"] for e in trace["events"]]
    assert seqs == sorted(set(seqs)), "trace events out of order or repeated"
    return sum(e["kind"] == "run_end" for e in trace["events"])


def test_replicas_share_runs_and_lose_none_when_killed(
    postgres: object, pg_url: str, tmp_path: Path, chest_dcm: Path
) -> None:
    home = tmp_path / "home"
    image = chest_dcm.read_bytes()
    servers = _start(home, pg_url, 3)
    try:
        accepted = _submit(servers, image, 12, "Batch A")
        victim = servers[0]
        killed_owning = wait_owning(pg_url, victim)
        victim.kill()
        survivors = servers[1:]
        with httpx.Client(base_url=survivors[0].url, timeout=120) as c:
            final = {i: wait_done(c, i, timeout_s=600) for i in accepted}
        assert all(f["status"] == "done" for f in final.values()), final
        for run_id in killed_owning:  # taken over from its last checkpoint
            assert final[run_id]["resumes"] >= 1 and final[run_id]["answer"]["short_answer"]
        with httpx.Client(base_url=survivors[1].url, timeout=120) as c:
            assert all(_run_ends(c, i) == 1 for i in accepted)  # none completed twice
            # a run accepted by another replica: status, events, trace, artifacts, page
            other = next(i for i, s in accepted.items() if s is survivors[0])
            names = [name for name, _ in sse_events(c, other)]
            assert names[-2:] == ["answer", "end"] and "run_start" in names
            after = c.get(f"/v1/runs/{other}/trace").json()["events"][2]["seq"]
            resumed = c.get(f"/v1/runs/{other}/events", headers={"Last-Event-ID": str(after)})
            assert f"id: {after}\n" not in resumed.text and f"id: {after + 1}\n" in resumed.text
            image_id = c.get(f"/v1/runs/{other}/trace").json()["meta"]["image"]["display_artifact"]
            assert c.get(f"/v1/runs/{other}/artifacts/{image_id}").status_code == 200
            page = c.get(f"/runs/{other}")
            assert page.status_code == 200 and other in page.text
            listed = {r["run_id"] for r in c.get("/v1/runs?limit=100").json()}
            assert set(accepted) <= listed
            # a review given on one replica is seen on another; traces are in the database
            with httpx.Client(base_url=survivors[0].url, timeout=60) as c0:
                r = c0.post(f"/v1/runs/{other}/reviews", json={"verdict": "agree"})
                assert r.status_code == 201
            assert [v["verdict"] for v in c.get(f"/v1/runs/{other}").json()["reviews"]] == [
                "agree"
            ]
        with psycopg.connect(pg_url) as conn:
            dirs = [r[0] for r in conn.execute("SELECT dir FROM medloupe_service_runs")]
        for name in ("trace.sqlite", "checkpoints.sqlite"):
            assert dirs and not any((Path(d) / name).exists() for d in dirs), name

        # every replica killed mid-load; new ones resume everything
        batch = _submit(survivors, image, 6, "Batch B")
        wait_owning(pg_url, survivors[0])
        for s in survivors:
            s.kill()
        fresh = _start(home, pg_url, 2)
        servers += fresh
        with httpx.Client(base_url=fresh[1].url, timeout=120) as c:
            final_b = {i: wait_done(c, i, timeout_s=600) for i in batch}
            assert all(f["status"] == "done" for f in final_b.values()), final_b
            assert all(_run_ends(c, i) == 1 for i in batch)
    finally:
        for s in servers:
            s.stop()
