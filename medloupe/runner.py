"""Runs: directories, the run index, checkpointed execution, resume and final outputs.

A run directory holds ``run.json`` (question, options, image record, backend spec),
``checkpoints.sqlite`` (LangGraph's SQLite checkpointer; the run id is the thread id),
``trace.sqlite``, ``artifacts/``, and at the end ``answer.json``, ``trace.json`` and
``overlay.png`` (each written atomically). ``<Settings.home>/runs.sqlite`` indexes runs so
``medloupe resume RUN_ID`` and ``medloupe runs list`` find them wherever they were written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.types import Command
from pydantic import BaseModel, Field

from medloupe.artifacts import ArtifactStore, atomic_write_bytes, strict_json
from medloupe.config import Settings
from medloupe.db import (
    POSTGRES_ERRORS,
    DatabaseError,
    Table,
    check_database_url,
    first_line,
    safe_url,
)
from medloupe.errors import InputError, MedloupeError, RunNotFoundError, RunStateError
from medloupe.graphs.context import (
    Resources,
    ResourceSpec,
    RunContext,
    build_context,
    shared_resources,
)
from medloupe.graphs.diagnose import builder
from medloupe.io.intake import ingest_image
from medloupe.io.records import ImageRecord, LoadedImage
from medloupe.options import RunOptions
from medloupe.overlay import draw_overlay
from medloupe.schemas import GroundedAnswer
from medloupe.trace import TraceRecorder, read_trace

try:  # the `postgres` extra
    from langgraph.checkpoint.postgres import PostgresSaver
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
except ImportError:  # pragma: no cover - SQLite checkpoints need none of it
    AsyncPostgresSaver = PostgresSaver = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

ReviewCallback = Callable[[dict[str, Any]], dict[str, Any]]


def new_run_id() -> str:
    return f"run-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (strict_json(data, indent=2) + "\n").encode())


class RunIndex(Table):
    """The run index: run id -> directory, question, status (``runs.sqlite`` under
    ``Settings.home``, or ``medloupe_runs`` in the shared database)."""

    SQLITE_FILE = "runs.sqlite"
    SQLITE_NAME = "runs"
    PG_NAME = "medloupe_runs"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS {t} (run_id TEXT PRIMARY KEY, dir TEXT NOT NULL, "
        "question TEXT, created DOUBLE PRECISION, updated DOUBLE PRECISION, status TEXT, "
        "answer TEXT, error TEXT)"
    )

    def add(self, run_id: str, run_dir: Path, question: str) -> None:
        now = time.time()
        self.run(
            "INSERT INTO {t} VALUES (?, ?, ?, ?, ?, 'created', NULL, NULL) "
            "ON CONFLICT (run_id) DO UPDATE SET dir=excluded.dir, question=excluded.question, "
            "created=excluded.created, updated=excluded.updated, status='created', "
            "answer=NULL, error=NULL",
            (run_id, str(run_dir.resolve()), question, now, now),
        )

    def update(
        self, run_id: str, status: str, answer: str | None = None, error: str | None = None
    ) -> None:
        self.run(
            "UPDATE {t} SET status=?, answer=?, error=?, updated=? WHERE run_id=?",
            (status, answer, error, time.time(), run_id),
        )

    def get(self, run_id: str) -> dict[str, Any] | None:
        found = self.rows("SELECT * FROM {t} WHERE run_id=?", (run_id,))
        return found[0] if found else None

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM {t} ORDER BY created DESC LIMIT ?", (limit,))


class RunSpec(BaseModel):
    """``run.json``: what a run is asked and with what, written once before it starts."""

    run_id: str
    question: str
    options: RunOptions = Field(default_factory=RunOptions)
    image: ImageRecord
    vlm: str | None = None
    vlm_default: bool = False
    kb: str | None = None
    created: str = ""

    def resources(self) -> ResourceSpec:
        """The resources the run uses, by name."""
        return ResourceSpec(vlm=self.vlm, vlm_default=self.vlm_default, kb=self.kb)

    def graph_input(self) -> dict[str, Any]:
        """The diagnose graph's input for this run."""
        return {
            "question": self.question,
            "image": self.image.model_dump(mode="json"),
            "options": self.options.model_dump(mode="json"),
        }


@dataclass
class Run:
    """A run directory and its specification."""

    dir: Path
    spec: RunSpec

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.dir)

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoints.sqlite"

    @property
    def trace_path(self) -> Path:
        return self.dir / "trace.sqlite"


def create_run(
    loaded: LoadedImage,
    question: str,
    *,
    settings: Settings,
    out_dir: Path | None = None,
    options: RunOptions | dict[str, Any] | None = None,
    resources: ResourceSpec = ResourceSpec(),
) -> Run:
    """Make the run directory, store the image, write ``run.json`` and index the run.

    Call it only after the image has been read successfully: bad input writes nothing.
    """
    if not question.strip():
        raise InputError("the question is empty")
    run_id = new_run_id()
    run_dir = out_dir if out_dir is not None else settings.runs_dir / run_id
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output directory {run_dir} is a file; choose a new --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(f"output directory {run_dir} is not empty; choose a new --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"cannot write the run directory {run_dir} ({exc.strerror or type(exc).__name__}); "
            "choose a --out where you can write"
        ) from None
    spec = RunSpec(
        run_id=run_id,
        question=question,
        options=RunOptions.of(options),
        image=ingest_image(loaded, ArtifactStore(run_dir)),
        vlm=resources.vlm,
        vlm_default=resources.vlm_default,
        kb=resources.kb,
        created=datetime.now(UTC).isoformat(),
    )
    write_json(run_dir / "run.json", spec.model_dump(mode="json"))
    RunIndex(settings).add(run_id, run_dir, question)
    return Run(dir=run_dir, spec=spec)


def find_run(ref: str, settings: Settings) -> Run:
    """A run by id (from the index) or by directory."""
    index = RunIndex(settings)
    entry = index.get(ref)
    run_dir = Path(entry["dir"]) if entry else Path(ref)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise RunNotFoundError(
            f"no run {ref!r}: not in the index at {index.where} and not a run directory"
        )
    try:
        spec = RunSpec.model_validate_json(meta_path.read_bytes())
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise RunStateError(
            f"{meta_path} is unreadable or not a medloupe run.json ({type(exc).__name__}); "
            "the run cannot be resumed or shown; start a new one"
        ) from None
    return Run(dir=run_dir, spec=spec)


async def execute(
    run: Run,
    *,
    settings: Settings,
    resources: Resources | None = None,
    resume: bool = False,
    review: ReviewCallback | None = None,
    on_event: Callable[[Any], None] | None = None,
) -> GroundedAnswer:
    """Run (or resume) the graph for ``run`` with its checkpointer; write the outputs.

    Args:
        resources: registry, backend and KB (default: the shared ones ``run.json`` names).
        review: called with the interrupt payload when ``review_plan`` pauses; returns the
            resume value (``{"action": "approve" | "edit" | "reject", "plan": ...}``).
        on_event: called with each trace event as it is recorded (progress display).

    On failure the run is marked failed in the index, the error is recorded, and
    ``trace.json`` is still written; ``answer.json`` is only written for a finished answer.
    """
    # the index, the trace and the outputs are files or a database: off the event loop
    index = await asyncio.to_thread(RunIndex, settings)
    trace = await asyncio.to_thread(
        TraceRecorder, run.trace_path, settings=settings, run_id=run.run_id
    )
    unsubscribe = trace.subscribe(on_event) if on_event else None
    spec = run.spec
    try:
        if resources is None:
            resources = await asyncio.to_thread(shared_resources, spec.resources())
        context = build_context(run.store, trace, resources, settings)
        trace.set_meta(
            run_id=run.run_id,
            question=spec.question,
            options=spec.options.model_dump(mode="json"),
            image=spec.image.model_dump(mode="json"),
            vlm=spec.vlm,
            kb=spec.kb,
        )
        trace.record("resume" if resume else "run_start", status="started")
        await asyncio.to_thread(index.update, run.run_id, "running")
        values = await _drive(run, context, settings, resume=resume, review=review)
        if "answer" not in values:
            raise MedloupeError("the graph ended without an answer")
        answer = GroundedAnswer.model_validate(values["answer"])
        await asyncio.to_thread(_write_outputs, run, answer)
        # a run ends once: a takeover of a run whose holder was killed after tracing its end
        # (before the queue marked it done) only publishes the outputs again
        if not await asyncio.to_thread(trace.events, {"run_end"}):
            trace.record("run_end", status="ok", abstained=answer.abstained)
        short = answer.short_answer or "(abstained)"
        await asyncio.to_thread(index.update, run.run_id, "done", answer=short)
        evidence = [*values.get("evidence", []), *values.get("passages", [])]
        await asyncio.to_thread(_write_trace, run, settings, values["answer"], evidence)
        return answer
    except BaseException as exc:
        trace.record("run_error", status="error", error=f"{type(exc).__name__}: {exc}")
        error = f"{type(exc).__name__}: {exc}"
        await asyncio.to_thread(index.update, run.run_id, "failed", error=error)
        await asyncio.to_thread(_write_trace, run, settings)
        raise
    finally:
        if unsubscribe:
            unsubscribe()
        await asyncio.to_thread(trace.close)


def _write_trace(
    run: Run,
    settings: Settings,
    answer: dict[str, Any] | None = None,
    evidence: list[dict[str, Any]] | None = None,
) -> None:
    """Write ``trace.json`` (every recorded event is written first)."""
    doc = read_trace(run.dir, run.run_id, answer, evidence, settings=settings)
    write_json(run.dir / "trace.json", doc.model_dump(mode="json"))


@contextlib.asynccontextmanager
async def checkpointer(run: Run, settings: Settings) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    """The run's LangGraph checkpointer (the run id is the thread id): ``checkpoints.sqlite``
    in its directory, or the shared PostgreSQL of ``settings.database_url`` (its tables
    created or migrated first, one replica at a time)."""
    if settings.database_url is None:
        async with AsyncSqliteSaver.from_conn_string(str(run.checkpoint_path)) as saver:
            yield saver
        return
    if AsyncPostgresSaver is None:
        raise DatabaseError(
            "checkpoints in PostgreSQL need langgraph-checkpoint-postgres; "
            "pip install 'medloupe[postgres]'"
        )
    url = check_database_url(settings.database_url)
    await asyncio.to_thread(_setup_checkpoints, url)
    async with AsyncPostgresSaver.from_conn_string(url) as pg:
        yield pg


@functools.cache  # once per process and database
def _setup_checkpoints(url: str) -> None:
    """Create or migrate LangGraph's checkpoint tables, one replica at a time."""
    with PostgresSaver.from_conn_string(url) as saver:
        conn: Any = saver.conn  # from_conn_string: one connection, not a pool
        conn.execute("SELECT pg_advisory_lock(hashtext('medloupe_checkpoints'))")
        try:
            saver.setup()
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('medloupe_checkpoints'))")


async def _drive(
    run: Run,
    context: RunContext,
    settings: Settings,
    *,
    resume: bool,
    review: ReviewCallback | None,
) -> dict[str, Any]:
    """Invoke (or resume) the checkpointed graph until it ends; the final state values."""
    try:
        return await _drive_graph(run, context, settings, resume=resume, review=review)
    except sqlite3.DatabaseError as exc:
        raise RunStateError(
            f"the checkpoints {run.checkpoint_path} are unreadable ({exc}); "
            "the run cannot go on from them; start a new one"
        ) from None
    except POSTGRES_ERRORS as exc:
        raise DatabaseError(
            f"the checkpoint database {safe_url(settings.database_url or '')} failed "
            f"({first_line(exc)}); the run can be resumed once it is reachable"
        ) from None


async def _drive_graph(
    run: Run,
    context: RunContext,
    settings: Settings,
    *,
    resume: bool,
    review: ReviewCallback | None,
) -> dict[str, Any]:
    config: RunnableConfig = {"configurable": {"thread_id": run.run_id}, "recursion_limit": 100}
    async with checkpointer(run, settings) as saver:
        app = builder.compile(checkpointer=saver)
        start: Any = run.spec.graph_input()
        payload: Any = start
        run_graph = True
        if resume:
            snapshot = await app.aget_state(config)
            if not snapshot.values:
                payload = start  # killed before the first checkpoint: start over
            elif snapshot.interrupts:
                payload = _reviewed(run, review, snapshot.interrupts[0].value)
            elif not snapshot.next and "answer" in snapshot.values:
                run_graph = False  # finished already: rewrite the outputs
            elif not snapshot.next:
                # nothing left to run yet no answer (a checkpoint a kill left behind): the
                # thread is cleared and the run starts over
                log.warning("run %s: its checkpoints hold no answer; starting over", run.run_id)
                await saver.adelete_thread(run.run_id)
                payload = start
            else:
                payload = None  # continue from the last checkpoint
        while True:
            if run_graph:
                await app.ainvoke(payload, config, context=context, durability="async")
            snapshot = await app.aget_state(config)
            if not snapshot.interrupts:
                return dict(snapshot.values)
            payload = _reviewed(run, review, snapshot.interrupts[0].value)
            run_graph = True


def _reviewed(run: Run, review: ReviewCallback | None, payload: dict[str, Any]) -> Command[Any]:
    """The resume command of a plan-review interrupt (the reviewer's decision)."""
    if review is None:
        raise InputError(
            "the run paused for plan review; resume it with "
            f"`medloupe resume {run.run_id}` in a terminal"
        )
    return Command(resume=review(payload))


def _write_outputs(run: Run, answer: GroundedAnswer) -> None:
    store = run.store
    image = run.spec.image
    assert image.display_artifact is not None
    px = store.load(image.display_artifact)
    rgb = px if px.ndim == 3 else px[:, :, None].repeat(3, axis=2)
    masks = {
        r.id: store.load(r.mask_artifact) > 0
        for r in answer.regions
        if r.mask_artifact and store.exists(r.mask_artifact)
    }
    overlay = draw_overlay(rgb, answer.regions, masks)
    overlay_id = store.put_png(overlay, kind="overlay")
    atomic_write_bytes(run.dir / "overlay.png", store.path(overlay_id).read_bytes())
    write_json(run.dir / "answer.json", answer.model_dump(mode="json"))
