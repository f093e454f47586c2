"""The run manager behind ``medloupe serve``: a bounded worker pool over durable runs.

Runs execute on one background event loop (its own thread, so the HTTP loop never waits on
a graph), at most ``workers`` at a time; at most ``queue_size`` more wait. Every accepted
run is a row of ``<Settings.home>/service.sqlite`` before the client hears its id, and its
status moves ``queued -> running -> done | failed``. A server that stops (crash, kill,
restart) leaves rows ``queued`` or ``running``; the next start resumes each from its last
LangGraph checkpoint (the run id is the thread id), or marks it failed with the reason —
a run is never lost.

The VLM backend, knowledge base and tool registry are loaded once, on the worker loop, and
shared by the runs; each run has its own artifact store and trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from medloupe.config import Settings
from medloupe.errors import InputError, MedloupeError, RunStateError
from medloupe.graphs.context import Resources, ResourceSpec, shared_resources
from medloupe.runner import Run, SqliteTable, execute, find_run

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed")
MAX_RESUMES = 3  # a run interrupted this many times is failed instead of resumed again


class QueueFullError(MedloupeError):
    """Every worker is busy and the queue is full (HTTP 429)."""


class ServiceDB(SqliteTable):
    """``service.sqlite``: the runs this service accepted and where each stands."""

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, dir TEXT NOT NULL, "
        "status TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, "
        "started REAL, finished REAL, resumes INTEGER NOT NULL DEFAULT 0, error TEXT)"
    )
    ROWS_AS_DICTS = True

    def add(self, run_id: str, run_dir: Path) -> None:
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT INTO runs(run_id, dir, status, created, updated) "
                "VALUES (?, ?, 'queued', ?, ?)",
                (run_id, str(run_dir.resolve()), now, now),
            )

    def set(self, run_id: str, status: str, error: str | None = None) -> None:
        now = time.time()
        with self._conn() as c:
            c.execute(
                "UPDATE runs SET status=?, error=?, updated=?, "
                "started=CASE WHEN ?='running' THEN ? ELSE started END, "
                "finished=CASE WHEN ? IN ('done','failed') THEN ? ELSE finished END "
                "WHERE run_id=?",
                (status, error, now, status, now, status, now, run_id),
            )

    def bump_resumes(self, run_id: str) -> int:
        with self._conn() as c:
            c.execute("UPDATE runs SET resumes = resumes + 1 WHERE run_id=?", (run_id,))
            row = c.execute("SELECT resumes FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return int(row["resumes"]) if row else 0

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._conn() as c:
            row = c.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return dict(row) if row else None

    def recent(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        with self._conn() as c:
            if status:
                rows = c.execute(
                    "SELECT * FROM runs WHERE status=? ORDER BY created DESC LIMIT ?",
                    (status, limit),
                ).fetchall()
            else:
                rows = c.execute(
                    "SELECT * FROM runs ORDER BY created DESC LIMIT ?", (limit,)
                ).fetchall()
        return [dict(r) for r in rows]

    def unfinished(self) -> list[dict[str, Any]]:
        with self._conn() as c:
            rows = c.execute(
                "SELECT * FROM runs WHERE status NOT IN ('done', 'failed') ORDER BY created"
            ).fetchall()
        return [dict(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._conn() as c:
            rows = c.execute("SELECT status, COUNT(*) AS n FROM runs GROUP BY status").fetchall()
        return {r["status"]: int(r["n"]) for r in rows}


class RunManager:
    """Accepts runs, executes them on a bounded pool, and recovers them after a restart.

    Args:
        settings: where runs live (``settings.home``).
        workers: runs executing at once.
        queue_size: accepted runs that may wait for a worker; beyond it :meth:`submit`
            raises :class:`QueueFullError`.
        resources: the backend and knowledge base of every run, by name.

    The registry, backend and knowledge base come from
    :func:`medloupe.graphs.context.shared_resources`: built once per process and shared by
    the runs.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int = 2,
        queue_size: int = 16,
        resources: ResourceSpec = ResourceSpec(),
    ) -> None:
        if workers < 1 or queue_size < 0:
            raise InputError("workers must be >= 1 and queue_size >= 0")
        self.settings = settings
        self.workers = workers
        self.queue_size = queue_size
        self.resources = resources
        self.db = ServiceDB(settings.home / "service.sqlite")
        self._lock = threading.Lock()
        self._pending = 0  # queued + running, counted here so admission is race-free
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sem: asyncio.Semaphore | None = None
        self._shared: Resources | None = None
        self._shared_lock: asyncio.Lock | None = None
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Start the worker loop and recover the runs a previous process left unfinished;
        returns the ids resumed. Uploads a killed process left half taken in (raw files,
        with whatever PHI they hold) are removed first."""
        leftovers = self.settings.home / "uploads"
        if leftovers.is_dir():
            shutil.rmtree(leftovers, ignore_errors=True)
        ready = threading.Event()

        def loop_main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._sem = asyncio.Semaphore(self.workers)
            self._shared_lock = asyncio.Lock()
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=loop_main, name="medloupe-runs", daemon=True)
        self._thread.start()
        ready.wait()
        return self._recover()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker loop. Runs still executing stay ``running`` in the database and
        are resumed by the next :meth:`start`."""
        loop = self._loop
        if loop is None:
            return
        self._stopping = True

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._loop = None

    def _recover(self) -> list[str]:
        resumed: list[str] = []
        for row in self.db.unfinished():
            run_id = row["run_id"]
            n = self.db.bump_resumes(run_id)
            if n > MAX_RESUMES:
                reason = f"interrupted by {n} server restarts; not resumed again"
                self.db.set(run_id, "failed", reason)
                log.warning("run %s: %s", run_id, reason)
                continue
            try:
                find_run(row["dir"], self.settings)
            except RunStateError as exc:  # one unreadable run never holds up the others
                self.db.set(run_id, "failed", f"cannot be resumed: {exc}")
                continue
            except InputError as exc:
                self.db.set(run_id, "failed", f"lost its run directory: {exc}")
                continue
            log.info("resuming run %s (was %s)", run_id, row["status"])
            self._schedule(run_id, row["dir"], resume=True, admitted=False)
            resumed.append(run_id)
        return resumed

    # -- admission --------------------------------------------------------------------------

    def capacity_left(self) -> int:
        with self._lock:
            return self.workers + self.queue_size - self._pending

    def admit(self) -> None:
        """Reserve a slot or raise :class:`QueueFullError` (call before writing a run)."""
        with self._lock:
            if self._pending >= self.workers + self.queue_size:
                raise QueueFullError(
                    f"all {self.workers} workers are busy and {self.queue_size} runs are "
                    "queued; retry later"
                )
            self._pending += 1

    def release(self) -> None:
        """Give back a slot reserved by :meth:`admit` that was not used (bad upload)."""
        with self._lock:
            self._pending -= 1

    def submit(self, run: Run) -> None:
        """Queue an admitted run (its directory is written); executes when a worker frees."""
        self.db.add(run.run_id, run.dir)
        self._schedule(run.run_id, str(run.dir), resume=False, admitted=True)

    def _schedule(self, run_id: str, run_dir: str, *, resume: bool, admitted: bool) -> None:
        if self._loop is None:
            raise MedloupeError("the run manager is not started")
        if not admitted:
            with self._lock:
                self._pending += 1
        asyncio.run_coroutine_threadsafe(self._execute(run_id, run_dir, resume), self._loop)

    # -- execution ------------------------------------------------------------------------

    async def _shared_resources(self) -> Resources:
        """The runs' resources; the first run loads them (off the loop: opening a KB reads
        its index), the others wait for that."""
        assert self._shared_lock is not None
        async with self._shared_lock:
            if self._shared is None:
                self._shared = await asyncio.to_thread(shared_resources, self.resources)
            return self._shared

    async def _execute(self, run_id: str, run_dir: str, resume: bool) -> None:
        assert self._sem is not None
        try:
            async with self._sem:
                self.db.set(run_id, "running")
                run = find_run(run_dir, self.settings)
                resources = await self._shared_resources()
                await execute(run, settings=self.settings, resources=resources, resume=resume)
                self.db.set(run_id, "done")
        except asyncio.CancelledError:
            # the server is stopping: the row stays 'running'/'queued' and is resumed later
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is recorded with the run
            if self._stopping:  # cancelled mid-step by the stop: resumed by the next start
                log.info("run %s interrupted by the server stopping", run_id)
                return
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("run %s failed: %s", run_id, reason)
            self.db.set(run_id, "failed", reason)
        finally:
            with self._lock:
                self._pending -= 1
