"""The run manager behind ``medloupe serve``: a bounded worker pool over a durable queue.

Runs execute on one background event loop (its own thread, so the HTTP loop never waits on
a graph), at most ``workers`` at a time. Every accepted run is a row of the service table
(:class:`ServiceDB`: ``<Settings.home>/service.sqlite``, or PostgreSQL shared by replicas)
before the client hears its id, and its status moves ``queued -> running -> done |
failed``. A replica claims a run with a lease it keeps alive by a heartbeat; a replica that
dies (crash, kill) leaves its runs ``running`` until the lease runs out, then any replica
claims them and resumes each from its last LangGraph checkpoint (the run id is the thread
id), or marks it failed with the reason — a run is never lost, and only its current owner
can finish it. A clean stop hands its runs back at once.

The VLM backend, knowledge base and tool registry are loaded once per process, on the
worker loop, and shared by the runs; each run has its own artifact store and trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from medloupe.config import Settings
from medloupe.db import DatabaseError, Table
from medloupe.errors import InputError, MedloupeError, RunStateError
from medloupe.graphs.context import Resources, ResourceSpec, shared_resources
from medloupe.runner import Run, execute, find_run

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed")
MAX_RESUMES = 3  # a run interrupted this many times is failed instead of resumed again
LEASE_S = 20.0  # a claim without a heartbeat for this long passes to another replica


class QueueFullError(MedloupeError):
    """Every worker is busy and the queue is full (HTTP 429)."""


class ServiceDB(Table):
    """The runs the service accepted and where each stands (``service.sqlite`` under the
    home, or ``medloupe_service_runs`` in the shared database).

    A replica *claims* a run (``queued``, or ``running`` under a lease that has run out) in
    one statement, skipping rows another replica is claiming (``FOR UPDATE SKIP LOCKED`` in
    PostgreSQL; SQLite's write lock serialises claims). The claim writes the replica as
    ``owner`` with ``lease_until`` ahead; the owner's heartbeat extends it, and only the
    owner can finish the run. ``attempts`` counts claims, ``resumes`` takeovers.
    """

    SQLITE_FILE = "service.sqlite"
    SQLITE_NAME = "runs"
    PG_NAME = "medloupe_service_runs"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS {t} (run_id TEXT PRIMARY KEY, dir TEXT NOT NULL, "
        "status TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, "
        "updated DOUBLE PRECISION NOT NULL, started DOUBLE PRECISION, "
        "finished DOUBLE PRECISION, resumes INTEGER NOT NULL DEFAULT 0, error TEXT, "
        "owner TEXT, lease_until DOUBLE PRECISION, attempts INTEGER NOT NULL DEFAULT 0)"
    )
    COLUMNS_ADDED = (
        ("owner", "TEXT"),
        ("lease_until", "DOUBLE PRECISION"),
        ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    )
    _CLAIMABLE = (
        "status='queued' OR (status='running' AND (lease_until IS NULL OR lease_until < ?))"
    )

    def add(self, run_id: str, run_dir: Path) -> None:
        now = time.time()
        self.run(
            "INSERT INTO {t}(run_id, dir, status, created, updated) VALUES (?, ?, 'queued', ?, ?)",
            (run_id, str(run_dir.resolve()), now, now),
        )

    def claim(self, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Take the oldest claimable run for ``owner`` (``None``: none); its row after."""
        now = time.time()
        lock = " FOR UPDATE SKIP LOCKED" if self.postgres else ""
        found = self.rows(
            "UPDATE {t} SET status='running', owner=?, lease_until=?, updated=?, "
            "started=COALESCE(started, ?), attempts=attempts+1, "
            "resumes=resumes + CASE WHEN status='running' THEN 1 ELSE 0 END "
            "WHERE run_id = (SELECT run_id FROM {t} WHERE " + self._CLAIMABLE
            + " ORDER BY created LIMIT 1" + lock + ") RETURNING *",
            (owner, now + lease_s, now, now, now),
        )
        return found[0] if found else None

    def heartbeat(self, owner: str, lease_s: float) -> set[str]:
        """Extend every lease ``owner`` holds; the ids of the runs it still owns."""
        rows = self.rows(
            "UPDATE {t} SET lease_until=? WHERE owner=? AND status='running' RETURNING run_id",
            (time.time() + lease_s, owner),
        )
        return {r["run_id"] for r in rows}

    def finish(self, run_id: str, owner: str, status: str, error: str | None = None) -> bool:
        """End ``owner``'s run as ``done`` or ``failed``; ``False`` when ``owner`` no longer
        holds it (its lease ran out and another replica took it over)."""
        now = time.time()
        return (
            self.run(
                "UPDATE {t} SET status=?, error=?, updated=?, finished=?, lease_until=NULL "
                "WHERE run_id=? AND owner=? AND status='running'",
                (status, error, now, now, run_id, owner),
            )
            == 1
        )

    def release(self, owner: str) -> int:
        """Let other replicas take over ``owner``'s runs at once (a clean stop)."""
        return self.run(
            "UPDATE {t} SET lease_until=0 WHERE owner=? AND status='running'", (owner,)
        )

    def expire_leases(self) -> int:
        """End every lease now (a lone SQLite server starting: no other process holds one)."""
        return self.run("UPDATE {t} SET lease_until=0 WHERE status='running'")

    def get(self, run_id: str) -> dict[str, Any] | None:
        found = self.rows("SELECT * FROM {t} WHERE run_id=?", (run_id,))
        return found[0] if found else None

    def recent(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        if status:
            return self.rows(
                "SELECT * FROM {t} WHERE status=? ORDER BY created DESC LIMIT ?", (status, limit)
            )
        return self.rows("SELECT * FROM {t} ORDER BY created DESC LIMIT ?", (limit,))

    def claimable(self) -> list[str]:
        """Ids of the runs a replica could claim now, oldest first."""
        rows = self.rows(
            "SELECT run_id FROM {t} WHERE " + self._CLAIMABLE + " ORDER BY created",
            (time.time(),),
        )
        return [r["run_id"] for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.rows("SELECT status, COUNT(*) AS n FROM {t} GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}


class RunManager:
    """Accepts runs, claims them from the shared queue, executes them on a bounded pool, and
    takes over runs whose replica died.

    Args:
        settings: where runs live (``settings.home``) and the database
            (``settings.database_url``; ``None``: SQLite under the home).
        workers: runs executing at once in this process.
        queue_size: accepted runs that may wait for a worker; beyond it :meth:`admit`
            raises :class:`QueueFullError`.
        resources: the backend and knowledge base of every run, by name.
        lease_s: how long a claim holds without a heartbeat, seconds (``None``:
            :data:`LEASE_S`); a replica killed mid-run leaves its runs to the others after
            this long.
        poll_s: how often an idle replica looks for runs others accepted, seconds.

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
        lease_s: float | None = None,
        poll_s: float = 0.5,
    ) -> None:
        lease_s = LEASE_S if lease_s is None else lease_s
        if workers < 1 or queue_size < 0 or lease_s <= 0 or poll_s <= 0:
            raise InputError("workers must be >= 1, queue_size >= 0, lease_s and poll_s > 0")
        self.settings = settings
        self.workers = workers
        self.queue_size = queue_size
        self.resources = resources
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.db = ServiceDB(settings)
        self._lock = threading.Lock()
        self._reserved = 0  # admitted, not yet in the database
        self._tasks: dict[str, asyncio.Task[None]] = {}  # run id -> its execution here
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake: asyncio.Event | None = None
        self._claimer: asyncio.Task[None] | None = None
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._shared: Resources | None = None
        self._shared_lock: asyncio.Lock | None = None
        self._stopping = False

    @property
    def uploads_dir(self) -> Path:
        """This process's folder for uploads being taken in."""
        return self.settings.home / "uploads" / self.owner.replace(":", "-")

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Start the worker loop, the claimer and the heartbeat; returns the ids of the runs
        waiting to be claimed (earlier processes' unfinished runs among them)."""
        self._remove_stale_uploads()
        if not self.db.postgres:
            # a lone server (the home lock): runs marked running belong to a dead process
            self.db.expire_leases()
        ready = threading.Event()

        def loop_main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._wake = asyncio.Event()
            self._shared_lock = asyncio.Lock()
            ready.set()
            self._claimer = loop.create_task(self._claim_loop())  # stop() cancels it
            loop.run_forever()
            loop.close()

        waiting = self.db.claimable()
        self._thread = threading.Thread(target=loop_main, name="medloupe-runs", daemon=True)
        self._thread.start()
        ready.wait()
        self._beat = threading.Thread(target=self._heartbeat, name="medloupe-lease", daemon=True)
        self._beat.start()
        return waiting

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop claiming and executing. Runs still executing stay ``running`` with their
        lease ended, so another replica (or the next :meth:`start`) resumes them from their
        last checkpoint at once."""
        loop = self._loop
        if loop is None:
            return
        self._stopping = True
        self._beat_stop.set()

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
        if self._beat is not None:
            self._beat.join(timeout_s)
        self._loop = None
        try:
            self.db.release(self.owner)
        except DatabaseError as exc:  # the leases then run out by themselves
            log.warning("could not hand back this replica's runs: %s", exc)

    def _remove_stale_uploads(self) -> None:
        """Remove uploads a killed process left half taken in (raw files, with whatever PHI
        they hold): all of them under a lone SQLite server; with a shared database, those
        older than an hour (other replicas' current uploads are younger)."""
        root = self.settings.home / "uploads"
        if not root.is_dir():
            return
        cutoff = time.time() - (3600 if self.db.postgres else -1)
        for entry in root.iterdir():
            with contextlib.suppress(OSError):
                if entry.lstat().st_mtime < cutoff:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink()

    def _heartbeat(self) -> None:
        """Extend this replica's leases every quarter lease (its own thread, so a busy
        worker loop never lets them run out); cancel a run whose lease was lost."""
        while not self._beat_stop.wait(self.lease_s / 4):
            try:
                owned = self.db.heartbeat(self.owner, self.lease_s)
            except DatabaseError as exc:
                log.warning("lease heartbeat failed: %s", exc)
                continue
            with self._lock:
                lost = [t for run_id, t in self._tasks.items() if run_id not in owned]
            loop = self._loop
            for task in lost:
                if loop is not None and not task.done():
                    log.warning("a run's lease passed to another replica; stopping it here")
                    loop.call_soon_threadsafe(task.cancel)

    # -- admission --------------------------------------------------------------------------

    def _slots_left(self, queued: int) -> int:
        """Slots left with ``queued`` runs in the shared queue (hold ``self._lock``)."""
        return self.workers + self.queue_size - self._reserved - len(self._tasks) - queued

    def capacity_left(self) -> int:
        """Runs this replica would still accept (blocking: reads the shared queue)."""
        queued = self.db.counts().get("queued", 0)
        with self._lock:
            return self._slots_left(queued)

    def admit(self) -> None:
        """Reserve a slot or raise :class:`QueueFullError` (call before writing a run;
        blocking: reads the shared queue)."""
        queued = self.db.counts().get("queued", 0)
        with self._lock:
            if self._slots_left(queued) <= 0:
                raise QueueFullError(
                    f"all {self.workers} workers are busy and {self.queue_size} runs are "
                    "queued; retry later"
                )
            self._reserved += 1

    def release(self) -> None:
        """Give back a slot reserved by :meth:`admit` that was not used (bad upload)."""
        with self._lock:
            self._reserved -= 1

    def submit(self, run: Run) -> None:
        """Queue an admitted run (its directory is written) for whichever replica claims
        it first (blocking: writes the database)."""
        try:
            self.db.add(run.run_id, run.dir)
        finally:
            self.release()
        self._poke()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            raise MedloupeError("the run manager is not started")
        loop.call_soon_threadsafe(wake.set)

    # -- execution ------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        """Claim runs while a worker is free; otherwise wait for a finish, a submit here,
        or ``poll_s`` (runs other replicas accepted, leases that ran out)."""
        assert self._wake is not None
        while not self._stopping:
            self._wake.clear()
            row = None
            if len(self._tasks) < self.workers:
                try:
                    row = await asyncio.to_thread(self.db.claim, self.owner, self.lease_s)
                except DatabaseError as exc:
                    log.warning("could not claim a run: %s", exc)
            if row is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                continue
            task = asyncio.create_task(self._execute(row))
            with self._lock:
                self._tasks[row["run_id"]] = task

    async def _shared_resources(self) -> Resources:
        """The runs' resources; the first run loads them (off the loop: opening a KB reads
        its index), the others wait for that."""
        assert self._shared_lock is not None
        async with self._shared_lock:
            if self._shared is None:
                self._shared = await asyncio.to_thread(shared_resources, self.resources)
            return self._shared

    async def _execute(self, row: dict[str, Any]) -> None:
        run_id = row["run_id"]
        outcome: tuple[str, str | None] | None = None
        try:
            outcome = await self._outcome(row)
        except asyncio.CancelledError:
            # stopping, or the lease was lost: the row stays 'running' for the next owner
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is recorded with the run
            if self._stopping:  # cancelled mid-step by the stop: resumed by the next owner
                log.info("run %s interrupted by the server stopping", run_id)
            else:
                outcome = ("failed", f"{type(exc).__name__}: {exc}")
                log.warning("run %s failed: %s", run_id, outcome[1])
        finally:
            if outcome is not None:
                await self._finish(run_id, *outcome)
            with self._lock:
                self._tasks.pop(run_id, None)
            if self._wake is not None:
                self._wake.set()

    async def _outcome(self, row: dict[str, Any]) -> tuple[str, str | None]:
        """Execute a claimed run (resumed when an earlier claim started it)."""
        run_id = row["run_id"]
        if row["resumes"] > MAX_RESUMES:
            reason = f"interrupted {row['resumes']} times (server restarts); not resumed again"
            log.warning("run %s: %s", run_id, reason)
            return "failed", reason
        try:
            run = await asyncio.to_thread(find_run, row["dir"], self.settings)
        except RunStateError as exc:  # one unreadable run never holds up the others
            return "failed", f"cannot be resumed: {exc}"
        except InputError as exc:
            return "failed", f"lost its run directory: {exc}"
        resume = row["attempts"] > 1
        if resume:
            log.info("resuming run %s (claim %d)", run_id, row["attempts"])
        resources = await self._shared_resources()
        await execute(run, settings=self.settings, resources=resources, resume=resume)
        return "done", None

    async def _finish(self, run_id: str, status: str, error: str | None) -> None:
        try:
            if not await asyncio.to_thread(self.db.finish, run_id, self.owner, status, error):
                log.warning("run %s ended here after another replica took it over", run_id)
        except DatabaseError as exc:  # its lease runs out; another replica redoes the end
            log.warning("run %s: could not record its end (%s)", run_id, exc)
