"""Reviewers' verdicts on a run, kept with the run in ``<run>/reviews.json``, or, with a
shared database (``Settings.database_url``), as rows of ``medloupe_reviews`` every replica
reads.

A file review is appended under an exclusive file lock and the file is replaced
atomically, so concurrent reviewers (threads or processes) never lose one another's
verdicts and a crash never leaves a half-written file; a database review is one INSERT.
``trace.json`` is rewritten with the reviews so the exported trace carries them.
"""

from __future__ import annotations

import fcntl
import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from medloupe.artifacts import atomic_write_bytes
from medloupe.config import Settings
from medloupe.db import Table, uses_database
from medloupe.errors import InputError

REVIEWS_FILE = "reviews.json"


class ReviewIn(BaseModel):
    """What a reviewer submits."""

    model_config = {"extra": "forbid"}

    verdict: Literal["agree", "disagree"] = Field(
        description="the reviewer's verdict on the answer"
    )
    comment: str = Field(default="", max_length=4000)
    reviewer: str | None = Field(
        default=None, max_length=100, description="a name or role; free text, optional"
    )


class Review(ReviewIn):
    """A stored review."""

    model_config = {"extra": "ignore"}

    id: str
    created: str = Field(description="ISO 8601 time, UTC")


class ReviewTable(Table):
    """Reviews of every run in the shared PostgreSQL."""

    PG_NAME = "medloupe_reviews"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, run_id TEXT NOT NULL, "
        "created TEXT NOT NULL, verdict TEXT NOT NULL, comment TEXT NOT NULL, reviewer TEXT, "
        "added DOUBLE PRECISION NOT NULL)"
    )


def _run_id(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "run.json").read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{run_dir} is not a run directory") from None


def load_reviews(run_dir: str | Path, settings: Settings | None = None) -> list[Review]:
    """The reviews of a run, oldest first (empty when none); from the shared database
    when ``settings.database_url`` is set."""
    run_dir = Path(run_dir)
    if uses_database(settings):
        assert settings is not None
        rows = ReviewTable(settings).rows(
            "SELECT id, created, verdict, comment, reviewer FROM {t} WHERE run_id=? "
            "ORDER BY added, id",
            (_run_id(run_dir),),
        )
        return [Review.model_validate(r) for r in rows]
    path = run_dir / REVIEWS_FILE
    if not path.is_file():
        return []
    try:
        return [Review.model_validate(r) for r in json.loads(path.read_text())]
    except (ValueError, ValidationError) as exc:
        raise InputError(f"{path} is not a reviews file: {exc}") from exc


def add_review(
    run_dir: str | Path, review: ReviewIn, settings: Settings | None = None
) -> Review:
    """Append ``review`` to the run's reviews (in the shared database when
    ``settings.database_url`` is set); returns the stored review."""
    run_dir = Path(run_dir)
    run_id = _run_id(run_dir)
    stored = Review(
        **review.model_dump(),
        id=f"rev-{secrets.token_hex(4)}",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    shared = uses_database(settings)
    with open(run_dir / ".reviews.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shared:
            assert settings is not None
            ReviewTable(settings).run(
                "INSERT INTO {t}(id, run_id, created, verdict, comment, reviewer, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stored.id, run_id, stored.created, stored.verdict, stored.comment,
                 stored.reviewer, time.time()),
            )
            reviews = load_reviews(run_dir, settings)
        else:
            reviews = [*load_reviews(run_dir), stored]
        data = [r.model_dump(mode="json") for r in reviews]
        if not shared:
            atomic_write_bytes(
                run_dir / REVIEWS_FILE, (json.dumps(data, indent=2) + "\n").encode()
            )
        trace_json = run_dir / "trace.json"
        if trace_json.is_file():
            try:
                doc = json.loads(trace_json.read_text())
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                doc["reviews"] = data
                atomic_write_bytes(trace_json, (json.dumps(doc, indent=2) + "\n").encode())
    return stored
