"""The routes of ``medloupe serve`` (see :mod:`medloupe.service.app` for the endpoints): one
router per concern, the run manager from the app's state."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings
from medloupe.errors import InputError, UnsupportedImageError
from medloupe.io.intake import read_input
from medloupe.options import RunOptions
from medloupe.review.page import render_review_page
from medloupe.reviews import Review, ReviewIn, add_review, load_reviews
from medloupe.runner import Run, create_run
from medloupe.service.manager import TERMINAL, QueueFullError, RunManager
from medloupe.service.uploads import copy_upload, intake_status, problem_text, sniff_upload
from medloupe.tools import default_registry
from medloupe.trace import events_after, read_trace

MAX_QUESTION_CHARS = 2000
_RUN_ID = re.compile(r"^run-\d{8}-\d{6}-[0-9a-f]{6}$")


class RunLinks(BaseModel):
    self: str
    events: str
    trace: str
    page: str


class RunCreated(BaseModel):
    run_id: str
    status: str
    links: RunLinks


class RunInfo(BaseModel):
    run_id: str
    status: Literal["queued", "running", "done", "failed"]
    question: str | None = None
    created: float
    updated: float
    started: float | None = None
    finished: float | None = None
    resumes: int = 0
    error: str | None = Field(default=None, description="why the run failed")
    answer: dict[str, Any] | None = Field(default=None, description="the GroundedAnswer")
    reviews: list[Review] = Field(default_factory=list)
    links: RunLinks


def _manager(request: Request) -> RunManager:
    manager: RunManager = request.app.state.manager
    return manager


Manager = Annotated[RunManager, Depends(_manager)]
service = APIRouter(tags=["service"])
runs = APIRouter(prefix="/v1/runs", tags=["runs"])
reviews = APIRouter(prefix="/v1/runs", tags=["reviews"])
tools = APIRouter(prefix="/v1/tools", tags=["tools"])
pages = APIRouter(tags=["pages"])


def links(run_id: str) -> RunLinks:
    return RunLinks(
        self=f"/v1/runs/{run_id}",
        events=f"/v1/runs/{run_id}/events",
        trace=f"/v1/runs/{run_id}/trace",
        page=f"/runs/{run_id}",
    )


def _row(manager: RunManager, run_id: str) -> dict[str, Any]:
    row = manager.db.get(run_id) if _RUN_ID.match(run_id) else None
    if row is None:
        raise HTTPException(404, f"no run {run_id!r} on this server")
    return row


def _info(row: dict[str, Any], settings: Settings) -> RunInfo:
    run_dir = Path(row["dir"])
    question = None
    with contextlib.suppress(OSError, ValueError):
        question = json.loads((run_dir / "run.json").read_text()).get("question")
    answer = None
    if row["status"] == "done":
        with contextlib.suppress(OSError, ValueError):
            answer = json.loads((run_dir / "answer.json").read_text())
    return RunInfo(
        run_id=row["run_id"],
        status=row["status"],
        question=question,
        created=row["created"],
        updated=row["updated"],
        started=row["started"],
        finished=row["finished"],
        resumes=row["resumes"],
        error=row["error"],
        answer=answer,
        reviews=load_reviews(run_dir, settings),
        links=links(row["run_id"]),
    )


@service.get("/healthz")
def healthz(manager: Manager) -> dict[str, Any]:
    """Liveness and load: workers, queue, runs by status."""
    return {
        "status": "ok",
        "workers": manager.workers,
        "queue_size": manager.queue_size,
        "capacity_left": manager.capacity_left(),
        "runs": manager.db.counts(),
    }


def _options(options: str) -> RunOptions:
    try:
        opts = RunOptions.model_validate_json(options or "{}")
    except ValidationError as exc:
        raise HTTPException(422, f"bad options: {exc.errors(include_url=False)}") from None
    if opts.review_plan:
        raise HTTPException(
            422, "bad options: review_plan pauses for a terminal reviewer; not over HTTP"
        )
    return opts


def _create(loaded: Any, question: str, options: RunOptions, manager: RunManager) -> Run:
    return create_run(
        loaded, question, settings=manager.settings, options=options, resources=manager.resources
    )


@runs.post("", status_code=202, response_model=RunCreated)
async def create_run_endpoint(
    manager: Manager,
    image: UploadFile = File(description="PNG/JPEG/TIFF, DICOM or NIfTI"),  # noqa: B008
    question: str = Form(description="the diagnostic question"),
    options: str = Form(default="{}", description="JSON object of RunOptions"),
) -> RunCreated:
    """Start a run. Returns at once (202); follow ``links.events`` or poll ``links.self``."""
    question = question.strip()
    if not question or len(question) > MAX_QUESTION_CHARS:
        raise HTTPException(
            422, f"question must be 1 to {MAX_QUESTION_CHARS} characters after trimming"
        )
    opts = _options(options)
    tmp: Path | None = None
    admitted = False
    try:
        head = await image.read(512)
        try:
            suffix = sniff_upload(head)
        except UnsupportedImageError as exc:
            raise HTTPException(415, str(exc)) from None
        await image.seek(0)
        tmp = await asyncio.to_thread(_upload_dir, manager.uploads_dir)
        target = tmp / f"upload{suffix}"
        await asyncio.to_thread(copy_upload, image, target)
        # read the image before admission: a bad upload is a 4xx whatever the load
        loaded = await asyncio.to_thread(read_input, target, opts, manager.settings.max_pixels)
        try:
            await asyncio.to_thread(manager.admit)
        except QueueFullError as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "5"}) from None
        admitted = True
        run = await asyncio.to_thread(_create, loaded, question, opts, manager)
    except InputError as exc:
        if admitted:
            manager.release()
        raise HTTPException(intake_status(exc), problem_text(exc, tmp)) from None
    except BaseException:
        if admitted:
            manager.release()
        raise
    finally:
        if tmp is not None:
            await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)
    await asyncio.to_thread(manager.submit, run)
    return RunCreated(run_id=run.run_id, status="queued", links=links(run.run_id))


def _upload_dir(uploads: Path) -> Path:
    """A new private folder for one upload (removed after intake; leftovers of a killed
    server are removed at its next start)."""
    uploads.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=uploads))


@runs.get("", response_model=list[RunInfo])
def list_runs(manager: Manager, limit: int = 50, status: str | None = None) -> list[RunInfo]:
    """Runs this server accepted, newest first (also those of earlier server processes)."""
    limit = max(1, min(limit, 500))
    return [_info(r, manager.settings) for r in manager.db.recent(limit, status)]


@runs.get("/{run_id}", response_model=RunInfo)
def get_run(manager: Manager, run_id: str) -> RunInfo:
    """Status, failure reason, answer and reviews of one run."""
    return _info(_row(manager, run_id), manager.settings)


@runs.get("/{run_id}/trace")
def get_trace(manager: Manager, run_id: str) -> JSONResponse:
    """The run's trace document (events so far, evidence, answer, reviews)."""
    row = _row(manager, run_id)
    doc = read_trace(row["dir"], run_id, settings=manager.settings)
    return JSONResponse(doc.model_dump(mode="json"))


@runs.get("/{run_id}/artifacts/{artifact_id}")
def get_artifact(manager: Manager, run_id: str, artifact_id: str) -> FileResponse:
    """An image, crop, mask or overlay of the run (``.png``) or raw values (``.npy``)."""
    store = ArtifactStore(Path(_row(manager, run_id)["dir"]))
    try:
        path = store.path(artifact_id)  # the id is checked against the artifact pattern
    except KeyError:
        raise HTTPException(404, f"no artifact {artifact_id!r} in run {run_id}") from None
    media = "image/png" if artifact_id.endswith(".png") else "application/octet-stream"
    return FileResponse(path, media_type=media)


@runs.get("/{run_id}/events")
async def events(manager: Manager, run_id: str, request: Request) -> StreamingResponse:
    """Server-sent events of the run, from the start or after ``Last-Event-ID``."""
    row = await asyncio.to_thread(_row, manager, run_id)
    try:
        after = int(request.headers.get("last-event-id") or 0)
    except ValueError:
        after = 0
    trace_path = Path(row["dir"]) / "trace.sqlite"
    return StreamingResponse(
        _event_stream(manager, run_id, trace_path, after, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_stream(
    manager: RunManager, run_id: str, trace_path: Path, after: int, request: Request
) -> AsyncIterator[str]:
    seq = after
    quiet = 0.0
    yield "retry: 1000\n\n"
    while True:
        if await request.is_disconnected():
            return
        # the status is read before the events: a run is marked done or failed only
        # after its last event is written, so this read then drains the trace
        current = await asyncio.to_thread(manager.db.get, run_id) or {}
        finished = current.get("status") in TERMINAL
        batch = await asyncio.to_thread(
            events_after, trace_path, seq, settings=manager.settings, run_id=run_id
        )
        for e in batch:
            seq = e.seq
            yield f"id: {e.seq}\nevent: {e.kind}\ndata: {e.model_dump_json()}\n\n"
        if batch:
            quiet = 0.0
            continue
        if finished:
            info = await asyncio.to_thread(_info, current, manager.settings)
            if info.status == "done":
                yield f"event: answer\ndata: {json.dumps(info.answer)}\n\n"
            else:
                yield f"event: failed\ndata: {json.dumps({'error': info.error})}\n\n"
            yield f"event: end\ndata: {json.dumps({'status': info.status})}\n\n"
            return
        await asyncio.sleep(0.25)
        quiet += 0.25
        if quiet >= 15.0:
            quiet = 0.0
            yield ": keep-alive\n\n"


@reviews.get("/{run_id}/reviews", response_model=list[Review])
def get_reviews(manager: Manager, run_id: str) -> list[Review]:
    return load_reviews(_row(manager, run_id)["dir"], manager.settings)


@reviews.post("/{run_id}/reviews", response_model=Review, status_code=201)
def post_review(manager: Manager, run_id: str, review: ReviewIn) -> Review:
    """Record a reviewer's verdict (agree/disagree) and comment with the run."""
    return add_review(_row(manager, run_id)["dir"], review, manager.settings)


@tools.get("")
def list_tools(request: Request) -> list[dict[str, Any]]:
    """Every registered tool: description, input JSON schema, modalities, availability."""
    catalogue: list[dict[str, Any]] = request.app.state.tool_catalogue
    if not catalogue:
        for t in default_registry():
            av = t.available()
            catalogue.append({**t.describe(), "available": av.ok, "availability": av.reason})
    return catalogue


@pages.get("/runs/{run_id}", response_class=HTMLResponse)
def review_page(manager: Manager, run_id: str) -> HTMLResponse:
    """The trace-review page of a run (image with overlays, timeline, claims, reviews)."""
    row = _row(manager, run_id)
    page = render_review_page(
        read_trace(row["dir"], run_id, settings=manager.settings),
        row["dir"],
        status=row["status"],
        error=row["error"],
        review_url=f"/v1/runs/{run_id}/reviews",
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})


@pages.get("/", response_class=HTMLResponse)
def index_page(manager: Manager) -> HTMLResponse:
    """Recent runs, linked to their review pages."""
    rows = "".join(
        f"<tr><td><a href='/runs/{html.escape(r['run_id'])}'>{html.escape(r['run_id'])}"
        f"</a></td><td>{html.escape(r['status'])}</td>"
        f"<td>{html.escape(_info(r, manager.settings).question or '')}</td></tr>"
        for r in manager.db.recent(100)
    )
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>medloupe runs</title>"
        "</head><body style='font-family:system-ui,sans-serif'><h1>medloupe runs</h1>"
        "<p>A research tool, not a medical device. API: <a href='/docs'>/docs</a></p>"
        f"<table><tr><th>run</th><th>status</th><th>question</th></tr>{rows}</table>"
        "</body></html>"
    )


ROUTERS = (service, runs, reviews, tools, pages)
