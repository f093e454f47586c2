"""``medloupe serve``: the HTTP API (FastAPI) over the run manager.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

``POST /v1/runs``
    multipart ``image`` (PNG/JPEG/TIFF, DICOM, NIfTI; sniffed from the bytes, the client's
    file name is never used) + ``question`` + optional ``options`` (JSON object) ->
    ``202`` with the run id. ``429`` when every worker is busy and the queue is full,
    ``413`` over the upload limit, ``411`` without a Content-Length, ``415`` not an image,
    ``400`` an unreadable image, ``422`` a bad question or options.
``GET /v1/runs``, ``GET /v1/runs/{id}``
    status and, when done, the grounded answer.
``GET /v1/runs/{id}/events``
    server-sent events: every trace event (node and tool start/end, model calls, rethink
    rounds, retrieval) as ``event: <kind>`` with ``id: <seq>`` (``Last-Event-ID`` resumes),
    then ``answer`` or ``failed``, then ``end``.
``GET /v1/runs/{id}/trace``, ``GET /v1/runs/{id}/artifacts/{artifact_id}``
    the trace document; images, crops, masks and overlays by artifact id.
``GET|POST /v1/runs/{id}/reviews``
    reviewers' verdicts (agree/disagree with a comment), stored with the run.
``GET /v1/tools``
    the tool catalogue with JSON schemas and availability.
``GET /runs/{id}``
    the trace-review page.

Authentication: when a token is configured (``MEDLOUPE_API_TOKEN``; required to bind a
non-loopback address) every path but ``/healthz`` needs ``Authorization: Bearer <token>``
or ``?access_token=<token>`` (for pages and event streams opened by a browser); else 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import re
import shutil
import tempfile
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from medloupe.errors import (
    ImageIntakeError,
    ImageTooLargeError,
    InputError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)
from medloupe.review.store import Review, ReviewIn, add_review, load_reviews
from medloupe.service.manager import TERMINAL, QueueFullError, RunManager
from medloupe.trace import events_after

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_QUESTION_CHARS = 2000
_RUN_ID = re.compile(r"^run-\d{8}-\d{6}-[0-9a-f]{6}$")
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")
_NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RunOptionsIn(BaseModel):
    """Options a client may set for one run (all optional)."""

    model_config = {"extra": "forbid"}

    max_steps: int | None = Field(default=None, ge=1, le=10, description="rethink rounds")
    time_budget_s: float | None = Field(default=None, gt=0, le=3600)
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    rethink: bool | None = Field(default=None, description="second look at cropped regions")
    frame: int | None = Field(default=None, ge=0, description="multi-frame DICOM / 4D index")
    slice_index: int | None = Field(default=None, ge=0, description="NIfTI slice")
    axis: Literal[0, 1, 2] | None = Field(default=None, description="NIfTI axis cut across")
    modality: str | None = Field(default=None, pattern=r"^[A-Z]{2,4}$", description="e.g. CT")


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


def _links(run_id: str) -> RunLinks:
    return RunLinks(
        self=f"/v1/runs/{run_id}",
        events=f"/v1/runs/{run_id}/events",
        trace=f"/v1/runs/{run_id}/trace",
        page=f"/runs/{run_id}",
    )


def sniff_upload(head: bytes) -> str:
    """The file suffix the reader needs for an upload whose first bytes are ``head``
    (352 bytes or more), judged from content only.

    Raises:
        UnsupportedImageError: not PNG/JPEG/TIFF/BMP, DICOM (with preamble) or NIfTI.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ".dcm"
    if len(head) >= 348 and head[344:348] in _NIFTI_MAGIC:
        return ".nii"
    if head.startswith(b"\x1f\x8b"):
        with contextlib.suppress(zlib.error):
            inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 348)
            if len(inner) >= 348 and inner[344:348] in _NIFTI_MAGIC:
                return ".nii.gz"
    if head.startswith(_RASTER_MAGIC):
        return ".img"
    raise UnsupportedImageError(
        "the upload",
        "not an image medloupe reads",
        "send PNG, JPEG, TIFF, DICOM (with its 128-byte preamble) or NIfTI (.nii, .nii.gz)",
    )


def _intake_status(exc: InputError) -> int:
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, (UnsupportedImageError, UnsupportedTransferSyntaxError)):
        return 415
    if isinstance(exc, ImageIntakeError):
        return 400
    return 422


def _problem(exc: InputError, tmp: Path | None) -> str:
    text = str(exc)
    if tmp is not None:  # never echo the server's own paths
        text = text.replace(str(tmp), "the upload")
    return text


class _LimitAndAuth:
    """ASGI middleware: bearer-token check and request-body limit (before any parsing)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.token and scope["path"] != "/healthz" and not self._authorised(scope):
            await _send_json(
                send,
                401,
                {"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is None:
                await _send_json(send, 411, {"detail": "a Content-Length header is required"})
                return
            try:
                n = int(length)
            except ValueError:
                await _send_json(send, 400, {"detail": "Content-Length is not a number"})
                return
            if n > self.max_body:
                await _send_json(
                    send,
                    413,
                    {
                        "detail": f"request body of {n} bytes is over the limit of "
                        f"{self.max_body} bytes (MEDLOUPE_MAX_UPLOAD_MB)"
                    },
                )
                return
        await self.app(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        assert self.token is not None
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip(), self.token):
            return True
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = (query.get("access_token") or [""])[0]
        return bool(given) and hmac.compare_digest(given, self.token)


async def _send_json(
    send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": data})


def create_app(
    manager: RunManager,
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    manage_lifecycle: bool = True,
) -> Any:
    """The ASGI application.

    Args:
        manager: executes the runs; started and stopped with the app when
            ``manage_lifecycle``.
        token: bearer token every request but ``/healthz`` must carry; ``None``: open
            (loopback only — :func:`medloupe.service.serve` enforces that).
        max_upload_bytes: largest request body accepted.
    """
    settings = manager.settings

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            resumed = await asyncio.to_thread(manager.start)
            if resumed:
                log.info("resumed %d run(s) interrupted by the last stop", len(resumed))
        try:
            yield
        finally:
            if manage_lifecycle:
                await asyncio.to_thread(manager.stop)

    app = FastAPI(
        title="medloupe",
        version=_version(),
        description="Grounded, traced answers to diagnostic questions about medical images. "
        "A research tool, not a medical device.",
        lifespan=lifespan,
    )
    tool_catalogue: list[dict[str, Any]] = []

    def _row(run_id: str) -> dict[str, Any]:
        row = manager.db.get(run_id) if _RUN_ID.match(run_id) else None
        if row is None:
            raise HTTPException(404, f"no run {run_id!r} on this server")
        return row

    def _info(row: dict[str, Any]) -> RunInfo:
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
            reviews=load_reviews(run_dir),
            links=_links(row["run_id"]),
        )

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness and load: workers, queue, runs by status."""
        return {
            "status": "ok",
            "workers": manager.workers,
            "queue_size": manager.queue_size,
            "capacity_left": manager.capacity_left(),
            "runs": manager.db.counts(),
        }

    @app.post("/v1/runs", status_code=202, response_model=RunCreated, tags=["runs"])
    async def create_run_endpoint(
        image: UploadFile = File(description="PNG/JPEG/TIFF, DICOM or NIfTI"),  # noqa: B008
        question: str = Form(description="the diagnostic question"),
        options: str = Form(default="{}", description="JSON object of RunOptionsIn"),
    ) -> RunCreated:
        """Start a run. Returns at once (202); follow ``links.events`` or poll ``links.self``."""
        question = question.strip()
        if not question or len(question) > MAX_QUESTION_CHARS:
            raise HTTPException(
                422, f"question must be 1 to {MAX_QUESTION_CHARS} characters after trimming"
            )
        try:
            opts = RunOptionsIn.model_validate_json(options or "{}")
        except ValidationError as exc:
            raise HTTPException(422, f"bad options: {exc.errors(include_url=False)}") from None
        tmp: Path | None = None
        admitted = False
        try:
            head = await image.read(512)
            try:
                suffix = sniff_upload(head)
            except UnsupportedImageError as exc:
                raise HTTPException(415, str(exc)) from None
            await image.seek(0)
            uploads = settings.home / "uploads"
            uploads.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=uploads))
            target = tmp / f"upload{suffix}"
            await asyncio.to_thread(_copy_upload, image, target)
            # read the image before admission: a bad upload is a 4xx whatever the load
            loaded = await asyncio.to_thread(_load, target, opts, manager)
            try:
                manager.admit()
            except QueueFullError as exc:
                raise HTTPException(429, str(exc), headers={"Retry-After": "5"}) from None
            admitted = True
            run = await asyncio.to_thread(
                _create, loaded, question, opts.model_dump(exclude_none=True), manager
            )
        except InputError as exc:
            if admitted:
                manager.release()
            raise HTTPException(_intake_status(exc), _problem(exc, tmp)) from None
        except BaseException:
            if admitted:
                manager.release()
            raise
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        manager.submit(run)
        return RunCreated(run_id=run.run_id, status="queued", links=_links(run.run_id))

    @app.get("/v1/runs", response_model=list[RunInfo], tags=["runs"])
    def list_runs(limit: int = 50, status: str | None = None) -> list[RunInfo]:
        """Runs this server accepted, newest first (also those of earlier server processes)."""
        limit = max(1, min(limit, 500))
        return [_info(r) for r in manager.db.recent(limit, status)]

    @app.get("/v1/runs/{run_id}", response_model=RunInfo, tags=["runs"])
    def get_run(run_id: str) -> RunInfo:
        """Status, failure reason, answer and reviews of one run."""
        return _info(_row(run_id))

    @app.get("/v1/runs/{run_id}/trace", tags=["runs"])
    def get_trace(run_id: str) -> JSONResponse:
        """The run's trace document (events so far, evidence, answer, reviews)."""
        from medloupe.trace import read_trace

        row = _row(run_id)
        doc = read_trace(row["dir"], run_id)
        return JSONResponse(doc.model_dump(mode="json"))

    @app.get("/v1/runs/{run_id}/artifacts/{artifact_id}", tags=["runs"])
    def get_artifact(run_id: str, artifact_id: str) -> FileResponse:
        """An image, crop, mask or overlay of the run (``.png``) or raw values (``.npy``)."""
        from medloupe.artifacts import ArtifactStore

        row = _row(run_id)
        store = ArtifactStore(Path(row["dir"]))
        try:
            path = store.path(artifact_id)  # the id is checked against the artifact pattern
        except KeyError:
            raise HTTPException(404, f"no artifact {artifact_id!r} in run {run_id}") from None
        media = "image/png" if artifact_id.endswith(".png") else "application/octet-stream"
        return FileResponse(path, media_type=media)

    @app.get("/v1/runs/{run_id}/reviews", response_model=list[Review], tags=["reviews"])
    def get_reviews(run_id: str) -> list[Review]:
        return load_reviews(_row(run_id)["dir"])

    @app.post("/v1/runs/{run_id}/reviews", response_model=Review, status_code=201, tags=["reviews"])
    def post_review(run_id: str, review: ReviewIn) -> Review:
        """Record a reviewer's verdict (agree/disagree) and comment with the run."""
        row = _row(run_id)
        return add_review(row["dir"], review)

    @app.get("/v1/runs/{run_id}/events", tags=["runs"])
    async def events(run_id: str, request: Request) -> StreamingResponse:
        """Server-sent events of the run, from the start or after ``Last-Event-ID``."""
        row = _row(run_id)
        try:
            after = int(request.headers.get("last-event-id") or 0)
        except ValueError:
            after = 0
        trace_path = Path(row["dir"]) / "trace.sqlite"

        async def stream() -> AsyncIterator[str]:
            seq = after
            quiet = 0.0
            yield "retry: 1000\n\n"
            while True:
                if await request.is_disconnected():
                    return
                # the status is read before the events: a run is marked done or failed only
                # after its last event is written, so this read then drains the trace
                current = manager.db.get(run_id) or {}
                finished = current.get("status") in TERMINAL
                events = await asyncio.to_thread(events_after, trace_path, seq)
                for e in events:
                    seq = e.seq
                    yield f"id: {e.seq}\nevent: {e.kind}\ndata: {e.model_dump_json()}\n\n"
                if events:
                    quiet = 0.0
                    continue
                if finished:
                    info = _info(current)
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

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/tools", tags=["tools"])
    def list_tools() -> list[dict[str, Any]]:
        """Every registered tool: description, input JSON schema, modalities, availability."""
        if not tool_catalogue:
            from medloupe.tools import default_registry

            for t in default_registry():
                av = t.available()
                d = t.describe()
                tool_catalogue.append({**d, "available": av.ok, "availability": av.reason})
        return tool_catalogue

    @app.get("/runs/{run_id}", response_class=HTMLResponse, tags=["pages"])
    def review_page(run_id: str) -> HTMLResponse:
        """The trace-review page of a run (image with overlays, timeline, claims, reviews)."""
        from medloupe.review.page import render_review_page
        from medloupe.trace import read_trace

        row = _row(run_id)
        doc = read_trace(row["dir"], run_id)
        page = render_review_page(
            doc,
            row["dir"],
            status=row["status"],
            error=row["error"],
            review_url=f"/v1/runs/{run_id}/reviews",
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/", response_class=HTMLResponse, tags=["pages"])
    def index_page() -> HTMLResponse:
        """Recent runs, linked to their review pages."""
        rows = "".join(
            f"<tr><td><a href='/runs/{html.escape(r['run_id'])}'>{html.escape(r['run_id'])}"
            f"</a></td><td>{html.escape(r['status'])}</td>"
            f"<td>{html.escape(_info(r).question or '')}</td></tr>"
            for r in manager.db.recent(100)
        )
        return HTMLResponse(
            "<!doctype html><html><head><meta charset='utf-8'><title>medloupe runs</title>"
            "</head><body style='font-family:system-ui,sans-serif'><h1>medloupe runs</h1>"
            "<p>A research tool, not a medical device. API: <a href='/docs'>/docs</a></p>"
            f"<table><tr><th>run</th><th>status</th><th>question</th></tr>{rows}</table>"
            "</body></html>"
        )

    return _LimitAndAuth(app, token=token, max_body=max_upload_bytes)


def _copy_upload(upload: UploadFile, target: Path) -> None:
    upload.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, 1024 * 1024)


def _load(target: Path, opts: RunOptionsIn, manager: RunManager) -> Any:
    from medloupe.io import load_image

    return load_image(
        target,
        frame=opts.frame,
        slice_index=opts.slice_index,
        axis=opts.axis if opts.axis is not None else 2,
        modality=opts.modality,
        max_pixels=manager.settings.max_pixels,
    )


def _create(loaded: Any, question: str, options: dict[str, Any], manager: RunManager) -> Any:
    from medloupe.runner import create_run

    return create_run(
        loaded,
        question,
        settings=manager.settings,
        options=options,
        vlm_spec=manager.vlm_spec,
        vlm_default=manager.vlm_default,
        kb_path=manager.kb,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medloupe")
    except PackageNotFoundError:
        return "0"
