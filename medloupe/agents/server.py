"""An OpenAI-compatible server around any medloupe VLM backend (``medloupe serve-vlm``).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (text and ``image_url`` parts
with base64 data URIs; ``response_format`` of type ``json_schema`` or ``json_object`` when the
backend can constrain decoding; ``n`` choices; ``stop`` sequences; ``stream`` as server-sent
``chat.completion.chunk`` events, with a usage chunk when ``stream_options.include_usage``; the
reply is generated whole, then sent in chunks), ``GET /health``. Request bodies above
``max_body_bytes`` (declared or streamed) get 413. Errors, on every route, come back in
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

So a lab without vLLM can host a model with transformers and point agents at it with
``--vlm openai:http://HOST:PORT/v1#NAME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from medloupe.agents.images import store_data_uri
from medloupe.agents.messages import ChatMessage, ImagePart, TextPart
from medloupe.agents.protocol import VLMBackend
from medloupe.artifacts import ArtifactStore
from medloupe.asgi import BodyLimit
from medloupe.errors import BackendError, InputError, validation_text

log = logging.getLogger(__name__)


class _ImageURL(BaseModel):
    url: str


class _Part(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | None = None


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[_Part]


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request this server honours."""

    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=8)
    stop: str | list[str] | None = None
    # accepted as OpenAI clients send them; a classifier or greedy decoder has no use for them
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    user: str | None = None


MAX_BODY_BYTES = 48 * 1024 * 1024  # a 32 MiB image as base64, and the rest of the request


def default_served_name(model: str) -> str:
    """A model's served name: the folder name for a local path, else the hub id."""
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model


def _error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error(status: int, message: str, kind: str, code: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content=_error_body(message, kind, code))


def _cut(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    """``text`` up to the first stop sequence; whether one was found."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [i for s in stops if s and (i := text.find(s)) != -1]
    return (text[: min(cuts)], True) if cuts else (text, False)


def create_app(
    backend: VLMBackend,
    *,
    served_name: str,
    max_tokens_limit: int = 4096,
    store_dir: Path | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Any:
    """A FastAPI app serving ``backend`` (its :meth:`~VLMBackend.complete`)
    under the model name ``served_name``. Images of requests are kept, content-addressed, in
    ``store_dir`` (default: a temporary folder removed when the app shuts down)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    tmp: tempfile.TemporaryDirectory[str] | None = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="medloupe-serve-")
        store_dir = Path(tmp.name)
    store = ArtifactStore(store_dir, durable=False)  # scratch: request images

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        if tmp is not None:
            tmp.cleanup()

    app = FastAPI(title="medloupe serve-vlm", lifespan=lifespan)
    app.add_middleware(
        BodyLimit,
        limit=max_body_bytes,
        error=lambda status, message: _error_body(
            message, "invalid_request_error", "request_too_large" if status == 413 else None
        ),
    )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Any:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = (
            f"no route {request.method} {request.url.path}; this server has GET /v1/models, "
            "POST /v1/chat/completions and GET /health"
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        return _error(exc.status_code, message, kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        problems = validation_text(exc, root="body", skip=1)
        return _error(400, f"invalid request: {problems}", "invalid_request_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": served_name, "object": "model", "created": 0, "owned_by": "medloupe"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> Any:
        if req.model != served_name:
            return _error(
                404,
                f"model {req.model!r} is not served here; served models: [{served_name!r}]",
                "invalid_request_error",
                "model_not_found",
            )
        try:
            json_schema = _requested_schema(req.response_format, backend.profile.supports_schema)
        except _Refusal as exc:
            return _error(400, exc.message, "invalid_request_error", exc.code)
        max_tokens = min(req.max_completion_tokens or req.max_tokens or 512, max_tokens_limit)
        try:
            choices, usage = await _choices(backend, store, req, json_schema, max_tokens)
        except InputError as exc:
            return _error(400, str(exc), "invalid_request_error")
        except BackendError as exc:
            log.error("generation failed: %s", exc)
            return _error(500, str(exc), "server_error")
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": served_name,
        }
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _chunks(head, choices, usage if include_usage else None),
                media_type="text/event-stream",
            )
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": c["index"],
                    "message": {"role": "assistant", "content": c["text"]},
                    "finish_reason": c["finish_reason"],
                }
                for c in choices
            ],
            "usage": usage,
        }

    return app


async def _choices(
    backend: VLMBackend,
    store: ArtifactStore,
    req: ChatCompletionRequest,
    json_schema: dict[str, Any] | None,
    max_tokens: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``req.n`` completions (cut at ``req.stop``) and their summed usage.

    Raises:
        InputError: the request's messages are unusable; BackendError: generation failed.
    """
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    messages = await asyncio.to_thread(_to_messages, req.messages, store)
    for index in range(req.n):
        comp = await backend.complete(
            messages,
            store=store,
            json_schema=json_schema,
            max_tokens=max_tokens,
            temperature=req.temperature,
        )
        text, stopped = _cut(comp.text, req.stop)
        prompt_tokens = comp.usage.prompt_tokens  # the same prompt for every choice
        completion_tokens += comp.usage.completion_tokens
        finish = "stop" if stopped else comp.finish_reason
        choices.append({"index": index, "text": text, "finish_reason": finish})
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return choices, usage


CHUNK_CHARS = 16  # characters of content per streamed chunk


async def _chunks(
    head: dict[str, Any], choices: list[dict[str, Any]], usage: dict[str, int] | None
) -> Any:
    """Server-sent ``chat.completion.chunk`` events of finished choices, then ``[DONE]``."""

    def event(choices_part: list[dict[str, Any]], **extra: Any) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": choices_part, **extra}
        if usage is not None and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    for c in choices:
        i = c["index"]
        yield event(
            [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
        for start in range(0, len(c["text"]), CHUNK_CHARS):
            piece = c["text"][start : start + CHUNK_CHARS]
            yield event([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
        yield event([{"index": i, "delta": {}, "finish_reason": c["finish_reason"]}])
    if usage is not None:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


class _Refusal(Exception):
    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _requested_schema(
    response_format: dict[str, Any] | None, supported: bool
) -> dict[str, Any] | None:
    """The JSON schema a request's ``response_format`` asks for (``None``: plain text).

    Raises:
        _Refusal: the format is unsupported here, unknown, or its schema is missing.
    """
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if not supported:
        raise _Refusal(
            f"response_format {kind!r} is not supported by this server "
            "(constrained decoding needs xgrammar)",
            "response_format_unsupported",
        )
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise _Refusal(f"unknown response_format type {kind!r}")
    schema = (response_format.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise _Refusal("response_format.json_schema.schema is missing")
    return schema


def _to_messages(messages: list[_Message], store: ArtifactStore) -> list[ChatMessage]:
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append(ChatMessage.text(m.role, m.content))
            continue
        parts: list[TextPart | ImagePart] = []
        for p in m.content:
            if p.type == "text":
                parts.append(TextPart(text=p.text or ""))
            else:
                if p.image_url is None:
                    raise InputError("an image_url part needs image_url.url")
                parts.append(ImagePart(artifact=store_data_uri(store, p.image_url.url)))
        out.append(ChatMessage(role=m.role, content=parts))
    return out


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields the ``/v1`` base URL.

    ``port=0`` picks a free port. The server stops when the block exits.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(backend: Any, *, host: str, port: int, served_name: str) -> None:
    """Run the server in the foreground (``medloupe serve-vlm``)."""
    import uvicorn

    uvicorn.run(create_app(backend, served_name=served_name), host=host, port=port)
