"""Reviewers' verdicts on a run, kept with the run in ``<run>/reviews.json``.

Each review is appended under an exclusive file lock and the file is replaced atomically,
so concurrent reviewers (threads or processes) never lose one another's verdicts and a
crash never leaves a half-written file. ``trace.json`` is rewritten with the reviews so the
exported trace carries them.
"""

from __future__ import annotations

import fcntl
import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from medloupe.artifacts import atomic_write_bytes
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


def load_reviews(run_dir: str | Path) -> list[Review]:
    """The reviews of a run, oldest first (empty when none)."""
    path = Path(run_dir) / REVIEWS_FILE
    if not path.is_file():
        return []
    try:
        return [Review.model_validate(r) for r in json.loads(path.read_text())]
    except (ValueError, ValidationError) as exc:
        raise InputError(f"{path} is not a reviews file: {exc}") from exc


def add_review(run_dir: str | Path, review: ReviewIn) -> Review:
    """Append ``review`` to the run's reviews; returns the stored review."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise InputError(f"{run_dir} is not a run directory")
    stored = Review(
        **review.model_dump(),
        id=f"rev-{secrets.token_hex(4)}",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    with open(run_dir / ".reviews.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reviews = [*load_reviews(run_dir), stored]
        data = [r.model_dump(mode="json") for r in reviews]
        atomic_write_bytes(run_dir / REVIEWS_FILE, (json.dumps(data, indent=2) + "\n").encode())
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
