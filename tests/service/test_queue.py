"""The service queue's claims and leases, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from medloupe.config import Settings
from medloupe.service.manager import ServiceDB


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.interop)])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    return Settings(home=tmp_path / "home", database_url=url)


def test_claims_go_oldest_first_and_leases_pass_only_when_they_run_out(
    db_settings: Settings, tmp_path: Path
) -> None:
    db = ServiceDB(db_settings)
    for i in range(3):
        db.add(f"run-{i}", tmp_path)
    a = db.claim("replica-a", lease_s=30)
    b = db.claim("replica-b", lease_s=0.5)
    assert a is not None and b is not None
    assert (a["run_id"], a["attempts"], a["resumes"]) == ("run-0", 1, 0)
    assert b["run_id"] == "run-1" and b["owner"] == "replica-b"
    assert db.heartbeat("replica-a", 30) == {"run-0"}
    time.sleep(0.7)  # b's lease runs out (no heartbeat)
    c = db.claim("replica-c", lease_s=30)
    assert c is not None and c["run_id"] == "run-1"  # the expired claim first: it is older
    assert (c["attempts"], c["resumes"]) == (2, 1)
    assert db.finish("run-1", "replica-b", "done") is False  # b lost it
    assert db.heartbeat("replica-b", 30) == set()
    assert db.finish("run-1", "replica-c", "done") is True
    assert db.finish("run-1", "replica-c", "done") is False  # ends once
    assert db.release("replica-a") == 1  # a clean stop hands run-0 back at once
    d = db.claim("replica-d", 30)
    assert d is not None and d["run_id"] == "run-0" and d["resumes"] == 1
    e = db.claim("replica-d", 30)
    assert e is not None and e["run_id"] == "run-2" and e["attempts"] == 1
    assert db.claim("replica-d", 30) is None
    assert db.counts() == {"done": 1, "running": 2}
    row = db.get("run-1")
    assert row is not None and row["status"] == "done" and row["finished"] >= row["started"]


def test_concurrent_claims_never_hand_out_a_run_twice(
    db_settings: Settings, tmp_path: Path
) -> None:
    db = ServiceDB(db_settings)
    for i in range(40):
        db.add(f"run-{i:02d}", tmp_path)
    got: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (row := db.claim(name, 60)) is not None:
            with lock:
                got.append(row["run_id"])

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == [f"run-{i:02d}" for i in range(40)]


def test_an_older_service_table_gains_the_lease_columns_and_its_runs_are_claimable(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    old = sqlite3.connect(home / "service.sqlite")
    old.execute(
        "CREATE TABLE runs (run_id TEXT PRIMARY KEY, dir TEXT NOT NULL, status TEXT NOT NULL, "
        "created REAL NOT NULL, updated REAL NOT NULL, started REAL, finished REAL, "
        "resumes INTEGER NOT NULL DEFAULT 0, error TEXT)"
    )
    old.execute("INSERT INTO runs VALUES ('run-old', '/x', 'running', 1, 1, 1, NULL, 0, NULL)")
    old.commit()
    old.close()
    db = ServiceDB(Settings(home=home))
    row = db.claim("me", 30)
    assert row is not None and row["run_id"] == "run-old" and row["resumes"] == 1
