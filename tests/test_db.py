"""The SQL tables of a home (medloupe/db.py) and what lives in them with a shared
PostgreSQL: the run index, trace events and metadata, reviews."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from medloupe.config import Settings
from medloupe.db import DatabaseError, safe_url
from medloupe.reviews import ReviewIn, add_review, load_reviews
from medloupe.runner import RunIndex
from medloupe.trace import TraceRecorder, events_after, read_trace


@pytest.mark.interop
def test_the_run_index_lives_in_postgres_when_a_url_is_set(pg_url: str, tmp_path: Path) -> None:
    a = RunIndex(Settings(home=tmp_path / "a", database_url=pg_url))
    b = RunIndex(Settings(home=tmp_path / "b", database_url=pg_url))
    a.add("run-x", tmp_path, "What is shown?")
    b.update("run-x", "done", answer="a chest")
    assert a.get("run-x") == b.get("run-x")
    assert b.list()[0]["answer"] == "a chest"
    assert not (tmp_path / "a" / "runs.sqlite").exists()


def test_a_bad_or_unreachable_database_url_is_named_without_its_password(
    tmp_path: Path,
) -> None:
    with pytest.raises(DatabaseError, match="not a PostgreSQL URL"):
        RunIndex(Settings(home=tmp_path, database_url="mysql://u:pw@h/db"))
    url = "postgresql://medloupe:s3cret-pw@127.0.0.1:1/medloupe"
    with pytest.raises(DatabaseError) as err:
        RunIndex(Settings(home=tmp_path, database_url=url))
    text = str(err.value)
    assert "cannot reach the database" in text and "MEDLOUPE_DATABASE_URL" in text
    assert "s3cret-pw" not in text and safe_url(url) in text


def test_safe_url_masks_only_the_password() -> None:
    assert safe_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert safe_url("postgresql://h/db") == "postgresql://h/db"


@pytest.mark.interop
def test_traces_and_reviews_live_in_postgres_and_every_reader_sees_them(
    pg_url: str, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", database_url=pg_url)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "run-20261203-000000-abcdef"}))
    run_id = "run-20261203-000000-abcdef"
    rec = TraceRecorder(run_dir / "trace.sqlite", settings=settings, run_id=run_id)
    rec.set_meta(question="What is shown?")
    threads = [
        threading.Thread(target=lambda: [rec.record("note", name=f"n{i}") for i in range(20)])
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.close()
    # a second recorder (a replica taking the run over) numbers on from the last event
    rec2 = TraceRecorder(run_dir / "trace.sqlite", settings=settings, run_id=run_id)
    assert rec2.record("resume").seq == 61
    rec2.close()
    assert not (run_dir / "trace.sqlite").exists()
    seqs = [e.seq for e in events_after("", 0, settings=settings, run_id=run_id)]
    assert seqs == list(range(1, 62))
    assert [e.seq for e in events_after("", 59, settings=settings, run_id=run_id)] == [60, 61]
    assert events_after("", 0, settings=settings, run_id="run-other") == []

    add_review(run_dir, ReviewIn(verdict="agree", comment="fine"), settings)
    add_review(run_dir, ReviewIn(verdict="disagree", reviewer="r2"), settings)
    assert not (run_dir / "reviews.json").exists()
    reviews = load_reviews(run_dir, settings)
    assert [r.verdict for r in reviews] == ["agree", "disagree"]
    doc = read_trace(run_dir, run_id, settings=settings)
    assert doc.meta == {"question": "What is shown?"} and len(doc.events) == 61
    assert [r["verdict"] for r in doc.reviews] == ["agree", "disagree"]
    assert load_reviews(run_dir) == []  # the file store knows nothing of them
