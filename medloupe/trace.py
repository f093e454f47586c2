"""Durable run traces, exported as ``trace.json``.

Every node entry and exit, tool call, model call, retrieval and rethink round is one row of
``events`` in ``<run>/trace.sqlite`` (WAL journal), or, with a shared database
(``Settings.database_url``), of ``medloupe_trace_events`` keyed by run id, so every replica
streams every run's events. :meth:`TraceRecorder.record` never blocks
its caller (an event loop, under LangGraph's server too): it numbers the event, tells the
listeners and hands the row to the recorder's writer thread, which commits rows in order as
they come; reads (:meth:`~TraceRecorder.events`, :meth:`~TraceRecorder.meta`) wait for the
rows queued before them. A killed process loses at most the rows still queued.
:func:`export_trace` writes the documented ``trace.json`` (schema: :class:`TraceDocument`,
``medloupe schema trace``).

Only technical data is recorded: image records carry no DICOM patient elements, and tool
arguments and outputs are the validated pydantic models.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from medloupe.artifacts import strict_json
from medloupe.config import Settings
from medloupe.db import SQL_ERRORS, Table, uses_database
from medloupe.errors import RunStateError
from medloupe.reviews import load_reviews

log = logging.getLogger(__name__)

EventKind = Literal[
    "run_start",
    "run_end",
    "run_error",
    "resume",
    "node_start",
    "node_end",
    "node_error",
    "tool_start",
    "tool_call",
    "model_call",
    "retrieval",
    "rethink_round",
    "plan",
    "review",
    "note",
]

TRACE_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    node TEXT,
    name TEXT,
    status TEXT,
    duration_ms REAL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


_SELECT_EVENTS = "SELECT seq, ts, kind, node, name, status, duration_ms, payload FROM events"


class TraceEvent(BaseModel):
    """One row of the trace."""

    seq: int = Field(description="1-based order of recording")
    ts: float = Field(description="UNIX time, seconds")
    kind: EventKind
    node: str | None = Field(default=None, description="graph node the event belongs to")
    name: str | None = Field(default=None, description="tool name, backend, or event subject")
    status: str | None = Field(default=None, description="ok | error | started | ...")
    duration_ms: float | None = None
    payload: dict[str, Any] = Field(default_factory=dict)


class TraceDocument(BaseModel):
    """``trace.json``: the whole recorded reasoning of one run."""

    schema_version: int = TRACE_SCHEMA_VERSION
    run_id: str
    meta: dict[str, Any] = Field(
        default_factory=dict, description="question, options, image record, backend, versions"
    )
    events: list[TraceEvent]
    answer: dict[str, Any] | None = Field(default=None, description="the GroundedAnswer, if any")
    evidence: list[dict[str, Any]] = Field(
        default_factory=list,
        description="every Evidence item of the run (tool results, observations, passages); "
        "claims cite these ids",
    )
    reviews: list[dict[str, Any]] = Field(
        default_factory=list, description="reviewers' verdicts on the answer (agree/disagree)"
    )


Listener = Callable[[TraceEvent], None]


def _to_event(row: tuple[Any, ...]) -> TraceEvent:
    seq, ts, kind, node, name, status, duration_ms, payload = row
    return TraceEvent(
        seq=seq,
        ts=ts,
        kind=kind,
        node=node,
        name=name,
        status=status,
        duration_ms=duration_ms,
        payload=json.loads(payload),
    )


class TraceEvents(Table):
    """Trace events of every run in the shared PostgreSQL (``settings.database_url``)."""

    PG_NAME = "medloupe_trace_events"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS {t} (run_id TEXT NOT NULL, seq INTEGER NOT NULL, "
        "ts DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, node TEXT, name TEXT, status TEXT, "
        "duration_ms DOUBLE PRECISION, payload TEXT NOT NULL, PRIMARY KEY (run_id, seq))"
    )


class TraceMeta(Table):
    """Trace metadata (question, options, image record, ...) of every run in PostgreSQL."""

    PG_NAME = "medloupe_trace_meta"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS {t} (run_id TEXT NOT NULL, key TEXT NOT NULL, "
        "value TEXT NOT NULL, PRIMARY KEY (run_id, key))"
    )


def _shared(settings: Settings | None, run_id: str | None) -> bool:
    """Whether a run's trace lives in the shared database rather than its own file."""
    if not uses_database(settings):
        return False
    if not run_id:
        raise RunStateError("a trace in the shared database needs the run id")
    return True


def events_after(
    path: str | Path,
    after: int = 0,
    limit: int = 500,
    *,
    settings: Settings | None = None,
    run_id: str | None = None,
) -> list[TraceEvent]:
    """Up to ``limit`` events with ``seq > after`` of the trace file ``path`` (read-only),
    or of run ``run_id`` in the shared database of ``settings``: for followers of a run
    another thread, process or replica is writing; empty while nothing is written yet."""
    if _shared(settings, run_id):
        assert settings is not None
        rows = TraceEvents(settings).rows(
            "SELECT seq, ts, kind, node, name, status, duration_ms, payload FROM {t} "
            "WHERE run_id=? AND seq > ? ORDER BY seq LIMIT ?",
            (run_id, after, limit),
        )
        return [_to_event(tuple(r.values())) for r in rows]
    path = Path(path)
    if not path.is_file():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return []
    try:
        sqlite_rows = conn.execute(
            _SELECT_EVENTS + " WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        conn.close()
    return [_to_event(r) for r in sqlite_rows]


class TraceRecorder:
    """Appends events to a run's trace from any thread without blocking; notifies
    listeners (see the module docstring). Opening it does I/O: from async code, open it
    in a worker thread.

    Args:
        path: the run's ``trace.sqlite`` file (created if absent), used without a shared
            database.
        settings: with ``settings.database_url`` the events and metadata go to the shared
            PostgreSQL under ``run_id`` instead (every replica reads them).
        run_id: the run the trace belongs to (required with a shared database).

    Raises:
        RunStateError: the trace file is not a trace database.
        DatabaseError: the shared database cannot be reached.
    """

    def __init__(
        self, path: str | Path, *, settings: Settings | None = None, run_id: str | None = None
    ) -> None:
        self.path = Path(path)
        self._pg = _shared(settings, run_id)
        self._key: tuple[Any, ...] = (run_id,) if self._pg else ()
        self._lock = threading.Lock()
        if self._pg:
            assert settings is not None
            events, meta = TraceEvents(settings), TraceMeta(settings)
            self._sql = {
                "events": events.sql(
                    "SELECT seq, ts, kind, node, name, status, duration_ms, payload FROM {t} "
                    "WHERE run_id=? ORDER BY seq"
                ),
                "insert": events.sql(
                    "INSERT INTO {t}(run_id, seq, ts, kind, node, name, status, duration_ms, "
                    "payload) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                "meta": meta.sql("SELECT key, value FROM {t} WHERE run_id=?"),
                "set_meta": meta.sql(
                    "INSERT INTO {t}(run_id, key, value) VALUES(?, ?, ?) "
                    "ON CONFLICT(run_id, key) DO UPDATE SET value=excluded.value"
                ),
                "last": events.sql("SELECT COALESCE(MAX(seq), 0) FROM {t} WHERE run_id=?"),
            }
            self._conn = events.open()
            last = self._conn.execute(self._sql["last"], self._key).fetchone()[0]
        else:
            self._sql = {
                "events": _SELECT_EVENTS + " ORDER BY seq",
                "insert": "INSERT INTO events(seq, ts, kind, node, name, status, duration_ms, "
                "payload) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                "meta": "SELECT key, value FROM meta",
                "set_meta": "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None
            )
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_SCHEMA)
                last = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                self._conn.close()
                raise RunStateError(
                    f"the trace {self.path} is not a readable trace database ({exc}); "
                    "the run's events cannot be shown or extended"
                ) from None
        self._seq = itertools.count(int(last) + 1)  # next() is atomic: numbers in any thread
        self._rows: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._writer: threading.Thread | None = None
        self._start = threading.Lock()
        self._listeners: list[Listener] = []

    def _submit(self, sql: str, params: tuple[Any, ...]) -> None:
        if self._writer is None:
            with self._start:
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_rows, name=f"trace-{self.path.parent.name}", daemon=True
                    )
                    self._writer.start()
        self._rows.put((sql, params))

    def _write_rows(self) -> None:
        while True:
            item = self._rows.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                with self._lock:
                    self._conn.execute(*item)
            except SQL_ERRORS as exc:
                log.error("trace %s: an event could not be written (%s)", self.path, exc)

    def flush(self) -> None:
        """Wait until every row recorded so far is written (blocks: not on an event loop)."""
        if self._writer is not None and self._writer.is_alive():
            done = threading.Event()
            self._rows.put(done)
            done.wait()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for each new event; returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def set_meta(self, **values: Any) -> None:
        for key, value in values.items():
            self._submit(self._sql["set_meta"], (*self._key, key, strict_json(value)))

    def meta(self) -> dict[str, Any]:
        self.flush()
        with self._lock:
            rows = self._conn.execute(self._sql["meta"], self._key).fetchall()
        return {k: json.loads(v) for k, v in rows}

    def record(
        self,
        kind: EventKind,
        *,
        node: str | None = None,
        name: str | None = None,
        status: str | None = None,
        duration_ms: float | None = None,
        **payload: Any,
    ) -> TraceEvent:
        """Append one event (numbered now, written by the writer thread)."""
        ts = time.time()
        body = strict_json(payload)
        seq = next(self._seq)
        self._submit(
            self._sql["insert"], (*self._key, seq, ts, kind, node, name, status, duration_ms, body)
        )
        event = _to_event((seq, ts, kind, node, name, status, duration_ms, body))
        for listener in list(self._listeners):
            listener(event)
        return event

    def events(self, kinds: set[str] | None = None) -> list[TraceEvent]:
        """Every event so far (blocks until the queued ones are written)."""
        self.flush()
        with self._lock:
            rows = self._conn.execute(self._sql["events"], self._key).fetchall()
        out = [_to_event(r) for r in rows]
        return [e for e in out if kinds is None or e.kind in kinds]

    def close(self) -> None:
        """Write what is queued, stop the writer thread and close the database."""
        if self._writer is not None:
            self._rows.put(None)
            self._writer.join()
            self._writer = None
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_trace(
    run_dir: str | Path,
    run_id: str,
    answer: dict[str, Any] | None = None,
    evidence: list[dict[str, Any]] | None = None,
    *,
    settings: Settings | None = None,
) -> TraceDocument:
    """Build the :class:`TraceDocument` of a run from its trace (``trace.sqlite``, or the
    shared database of ``settings``) and, when not given, its ``answer.json`` and the
    evidence of its last ``trace.json``; reviews from :func:`medloupe.reviews.load_reviews`."""

    run_dir = Path(run_dir)
    if answer is None and (run_dir / "answer.json").is_file():
        answer = json.loads((run_dir / "answer.json").read_text())
    if evidence is None:
        evidence = []
        old = run_dir / "trace.json"
        if old.is_file():
            try:
                evidence = list(json.loads(old.read_text()).get("evidence") or [])
            except ValueError:  # a trace.json cut short by a crash: rebuilt from the events
                evidence = []
    rec = TraceRecorder(run_dir / "trace.sqlite", settings=settings, run_id=run_id)
    try:
        return TraceDocument(
            run_id=run_id,
            meta=rec.meta(),
            events=rec.events(),
            answer=answer,
            evidence=evidence,
            reviews=[r.model_dump(mode="json") for r in load_reviews(run_dir, settings)],
        )
    finally:
        rec.close()
