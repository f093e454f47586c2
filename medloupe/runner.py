"""Runs: directories, the run index, checkpointed execution, resume and final outputs.

A run directory holds ``run.json`` (question, options, image record, backend spec),
``checkpoints.sqlite`` (LangGraph's SQLite checkpointer; the run id is the thread id),
``trace.sqlite``, ``artifacts/``, and at the end ``answer.json``, ``trace.json`` and
``overlay.png`` (each written atomically). ``$MEDLOUPE_HOME/runs.sqlite`` indexes runs so
``medloupe resume RUN_ID`` and ``medloupe runs list`` find them wherever they were written.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medloupe.artifacts import ArtifactStore, atomic_write_bytes
from medloupe.config import Settings
from medloupe.errors import InputError, MedloupeError, RunNotFoundError
from medloupe.io.records import ImageRecord, LoadedImage
from medloupe.schemas import GroundedAnswer
from medloupe.trace import TraceRecorder, read_trace

log = logging.getLogger(__name__)

ReviewCallback = Callable[[dict[str, Any]], dict[str, Any]]


def ingest_image(loaded: LoadedImage, store: ArtifactStore) -> ImageRecord:
    """Store the display image (and raw values) as artifacts; returns the record with their ids."""
    display_id = store.put_png(loaded.display, kind="image")
    raw_id = store.put_array(loaded.raw, kind="raw") if loaded.raw is not None else None
    return loaded.record.model_copy(update={"display_artifact": display_id, "raw_artifact": raw_id})


def new_run_id() -> str:
    return f"run-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def connect_wal(path: Path, *, rows_as_dicts: bool = False) -> sqlite3.Connection:
    """A SQLite connection in WAL mode (readers never block the writer), 30 s busy timeout."""
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    if rows_as_dicts:
        conn.row_factory = sqlite3.Row
    return conn


class SqliteTable:
    """A SQLite file holding one table, created on first use (``SCHEMA``)."""

    SCHEMA = ""
    ROWS_AS_DICTS = False

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.execute(self.SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        return connect_wal(self.path, rows_as_dicts=self.ROWS_AS_DICTS)


class RunIndex(SqliteTable):
    """``runs.sqlite`` under ``MEDLOUPE_HOME``: run id -> directory, question, status."""

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, dir TEXT NOT NULL, "
        "question TEXT, created REAL, updated REAL, status TEXT, answer TEXT, error TEXT)"
    )

    def add(self, run_id: str, run_dir: Path, question: str) -> None:
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, 'created', NULL, NULL)",
                (run_id, str(run_dir.resolve()), question, now, now),
            )

    def update(
        self, run_id: str, status: str, answer: str | None = None, error: str | None = None
    ) -> None:
        with self._conn() as c:
            c.execute(
                "UPDATE runs SET status=?, answer=?, error=?, updated=? WHERE run_id=?",
                (status, answer, error, time.time(), run_id),
            )

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._conn() as c:
            c.row_factory = sqlite3.Row
            row = c.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return dict(row) if row else None

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._conn() as c:
            c.row_factory = sqlite3.Row
            rows = c.execute(
                "SELECT * FROM runs ORDER BY created DESC LIMIT ?", (limit,)
            ).fetchall()
        return [dict(r) for r in rows]


@dataclass
class Run:
    """A run directory and its metadata."""

    run_id: str
    dir: Path
    meta: dict[str, Any]

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
    options: dict[str, Any] | None = None,
    vlm_spec: str | None = None,
    vlm_default: bool = False,
    kb_path: str | None = None,
) -> Run:
    """Make the run directory, store the image, write ``run.json`` and index the run.

    Call it only after the image has been read successfully: bad input writes nothing.
    """
    if not question.strip():
        raise InputError("the question is empty")
    run_id = new_run_id()
    run_dir = out_dir if out_dir is not None else settings.runs_dir / run_id
    if run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(f"output directory {run_dir} is not empty; choose a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(run_dir)
    record = ingest_image(loaded, store)
    meta = {
        "run_id": run_id,
        "question": question,
        "options": options or {},
        "image": record.model_dump(mode="json"),
        "vlm": vlm_spec,
        "vlm_default": vlm_default,
        "kb": kb_path,
        "created": datetime.now(UTC).isoformat(),
    }
    write_json(run_dir / "run.json", meta)
    RunIndex(settings.index_path).add(run_id, run_dir, question)
    return Run(run_id=run_id, dir=run_dir, meta=meta)


def find_run(ref: str, settings: Settings) -> Run:
    """A run by id (from the index) or by directory."""
    entry = RunIndex(settings.index_path).get(ref) if settings.index_path.exists() else None
    run_dir = Path(entry["dir"]) if entry else Path(ref)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise RunNotFoundError(
            f"no run {ref!r}: not in the index at {settings.index_path} and not a run directory"
        )
    meta = json.loads(meta_path.read_text())
    return Run(run_id=meta["run_id"], dir=run_dir, meta=meta)


def run_context(
    run: Run, trace: TraceRecorder, settings: Settings, registry: Any = None
) -> Any:
    """The :class:`~medloupe.graphs.state.RunContext` of ``run`` built from its
    ``run.json`` (backend, knowledge base) with ``registry`` (default: the default one)."""
    from medloupe.graphs.state import RunContext
    from medloupe.tools import default_registry

    vlm = None
    if run.meta.get("vlm"):
        from medloupe.agents.protocol import load_backend

        vlm = load_backend(run.meta["vlm"])
    retriever = None
    if run.meta.get("kb"):
        from medloupe.knowledge_base import open_knowledge_base

        retriever = open_knowledge_base(run.meta["kb"])
    from medloupe.knowledge_base.tool import registry_with_retriever

    return RunContext(
        store=run.store,
        trace=trace,
        registry=registry_with_retriever(
            registry if registry is not None else default_registry(), retriever
        ),
        vlm=vlm,
        vlm_default=bool(run.meta.get("vlm_default")),
        retriever=retriever,
        settings=settings,
    )


async def execute(
    run: Run,
    *,
    settings: Settings,
    resume: bool = False,
    context: Any = None,
    review: ReviewCallback | None = None,
    on_event: Callable[[Any], None] | None = None,
    registry: Any = None,
) -> GroundedAnswer:
    """Run (or resume) the graph for ``run`` with a SQLite checkpointer; write the outputs.

    Args:
        context: a :class:`~medloupe.graphs.state.RunContext`; built from ``run.json`` when
            ``None`` (the CLI path). Its ``trace`` must be the run's trace.
        review: called with the interrupt payload when ``review_plan`` pauses; returns the
            resume value (``{"action": "approve" | "edit" | "reject", "plan": ...}``).
        on_event: called with each trace event as it is recorded (progress display).
        registry: the tools of a context built here (default: the default registry).

    On failure the run is marked failed in the index, the error is recorded, and
    ``trace.json`` is still written; ``answer.json`` is only written for a finished answer.
    """
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.types import Command

    from medloupe.graphs.diagnose import builder

    index = RunIndex(settings.index_path)
    own_trace = context is None
    trace = context.trace if context is not None else TraceRecorder(run.trace_path)
    unsubscribe = trace.subscribe(on_event) if on_event else None
    try:
        if context is None:
            context = run_context(run, trace, settings, registry)
        trace.set_meta(
            run_id=run.run_id,
            question=run.meta["question"],
            options=run.meta.get("options", {}),
            image=run.meta["image"],
            vlm=run.meta.get("vlm"),
            kb=run.meta.get("kb"),
        )
        trace.record("resume" if resume else "run_start", status="started")
        index.update(run.run_id, "running")
        config: RunnableConfig = {"configurable": {"thread_id": run.run_id}, "recursion_limit": 100}
        async with AsyncSqliteSaver.from_conn_string(str(run.checkpoint_path)) as saver:
            app = builder.compile(checkpointer=saver)
            start: Any = {
                "question": run.meta["question"],
                "image": run.meta["image"],
                "options": run.meta.get("options", {}),
            }
            payload: Any = start
            run_graph = True
            if resume:
                snapshot = await app.aget_state(config)
                if not snapshot.values:
                    payload = start  # killed before the first checkpoint: start over
                elif snapshot.interrupts:
                    if review is None:
                        raise InputError(
                            f"run {run.run_id} waits for plan review; resume it in a terminal"
                        )
                    payload = Command(resume=review(snapshot.interrupts[0].value))
                elif not snapshot.next:
                    run_graph = False  # finished already: rewrite the outputs
                else:
                    payload = None  # continue from the last checkpoint
            while True:
                if run_graph:
                    await app.ainvoke(payload, config, context=context, durability="async")
                snapshot = await app.aget_state(config)
                if snapshot.interrupts:
                    if review is None:
                        raise InputError(
                            "the run paused for plan review; resume it with "
                            f"`medloupe resume {run.run_id}` in a terminal"
                        )
                    payload = Command(resume=review(snapshot.interrupts[0].value))
                    run_graph = True
                    continue
                break
            values = snapshot.values
        if "answer" not in values:
            raise MedloupeError("the graph ended without an answer")
        answer = GroundedAnswer.model_validate(values["answer"])
        _write_outputs(run, answer, trace)
        trace.record("run_end", status="ok", abstained=answer.abstained)
        index.update(run.run_id, "done", answer=answer.short_answer or "(abstained)")
        write_json(
            run.dir / "trace.json",
            read_trace(
                run.dir,
                run.run_id,
                values["answer"],
                [*values.get("evidence", []), *values.get("passages", [])],
            ).model_dump(mode="json"),
        )
        return answer
    except BaseException as exc:
        trace.record("run_error", status="error", error=f"{type(exc).__name__}: {exc}")
        index.update(run.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        write_json(run.dir / "trace.json", read_trace(run.dir, run.run_id).model_dump(mode="json"))
        raise
    finally:
        if unsubscribe:
            unsubscribe()
        if own_trace:
            trace.close()


def _write_outputs(run: Run, answer: GroundedAnswer, trace: TraceRecorder) -> None:
    from medloupe.overlay import draw_overlay

    store = run.store
    image = ImageRecord.model_validate(run.meta["image"])
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
