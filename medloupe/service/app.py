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

Authentication: when a token is configured (``Settings.api_token``; required to bind a
non-loopback address) every path but ``/healthz`` needs ``Authorization: Bearer <token>``
or ``?access_token=<token>`` (for pages and event streams opened by a browser); else 401.
Without a token (loopback only) the server answers only ``Host: localhost``/``127.0.0.1``/
``[::1]`` (421 otherwise: DNS rebinding). Body-carrying requests from another origin are
refused (403: CSRF), bodies over the upload limit get 413 however they are framed, and every
response carries ``nosniff``/``DENY`` framing/no-referrer headers and the review page's
Content-Security-Policy (:mod:`medloupe.asgi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI

from medloupe.asgi import LOOPBACK_HOSTS, BodyLimit, FrontDoor
from medloupe.config import env_name
from medloupe.review.page import content_security_policy
from medloupe.service.manager import RunManager
from medloupe.service.middleware import TokenAuth
from medloupe.service.routes import ROUTERS

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024


def create_app(
    manager: RunManager,
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    manage_lifecycle: bool = True,
    allowed_hosts: tuple[str, ...] | None = None,
) -> Any:
    """The ASGI application.

    Args:
        manager: executes the runs; started and stopped with the app when
            ``manage_lifecycle``.
        token: bearer token every request but ``/healthz`` must carry; ``None``: open
            (loopback only — :func:`medloupe.service.serve` enforces that).
        max_upload_bytes: largest request body accepted.
        allowed_hosts: host names the ``Host`` header may name besides the loopback ones
            (``None``: loopback names only without a token, any host with one).
    """

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
    app.state.manager = manager
    app.state.tool_catalogue = []
    for router in ROUTERS:
        app.include_router(router)
    limited = BodyLimit(
        TokenAuth(app, token=token),
        limit=max_upload_bytes,
        hint=f"set {env_name('max_upload_mb')} to raise it",
        require_length=True,
    )
    hosts = (
        LOOPBACK_HOSTS | frozenset(allowed_hosts)
        if allowed_hosts
        else (LOOPBACK_HOSTS if token is None else None)
    )
    return FrontDoor(limited, allowed_hosts=hosts, csp=content_security_policy())


def _version() -> str:
    try:
        return version("medloupe")
    except PackageNotFoundError:
        return "0"
