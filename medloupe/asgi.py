"""ASGI front-door pieces shared by medloupe's two HTTP servers (``medloupe serve``: the API
and review pages; ``medloupe serve-vlm``: the OpenAI-compatible model server), applied before
any parsing:

- :class:`BodyLimit` — a request body over the limit gets 413 whether its size is declared
  (``Content-Length``) or not (chunked: the bytes are counted as they arrive); a request with
  both headers is refused (400: the framing is ambiguous, the classic smuggling shape).
- :class:`FrontDoor` — the ``Host`` header must name this server (a loopback server answers
  only ``localhost``/``127.0.0.1``/``[::1]``: DNS rebinding), a browser request from another
  origin is refused (CSRF: a form POST needs no preflight), and every response carries
  security headers.
- :class:`TokenLogFilter` — ``access_token`` values are masked in access-log lines.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ErrorBody = Callable[[int, str], dict[str, Any]]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def detail_body(status: int, message: str) -> dict[str, Any]:
    """FastAPI's error shape, ``{"detail": message}``."""
    return {"detail": message}


async def send_json(
    send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a request body over ``limit`` bytes, declared or streamed (see the module
    docstring); with ``require_length``, 411 for a body-carrying request without
    ``Content-Length``.

    Args:
        limit: largest body in bytes.
        error: the JSON body of an error response from ``(status, message)``.
        hint: appended to the 413 message (how to raise the limit).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        error: ErrorBody = detail_body,
        hint: str = "",
        require_length: bool = False,
    ) -> None:
        self.app, self.limit, self.error, self.hint = app, limit, error, hint
        self.require_length = require_length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if declared is not None and chunked:
            await self._refuse(send, 400, "Content-Length and Transfer-Encoding together")
            return
        if declared is not None and not declared.strip().isdigit():
            await self._refuse(send, 400, "Content-Length is not a number")
            return
        if declared is not None and int(declared) > self.limit:
            await self._too_large(send, int(declared))
            return
        if self.require_length and declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            await self._refuse(send, 411, "a Content-Length header is required")
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._too_large(send, seen)

    async def _too_large(self, send: Send, n: int) -> None:
        message = f"request body of {n} bytes or more is over the limit of {self.limit} bytes"
        await self._refuse(send, 413, message + (f" ({self.hint})" if self.hint else ""))

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        await send_json(send, status, self.error(status, message))


def host_name(host_header: str) -> str:
    """The host of a ``Host`` header value, without the port (IPv6 in brackets)."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class FrontDoor:
    """Host allow-list, cross-origin refusal and security headers (module docstring).

    Args:
        allowed_hosts: host names (no port) the ``Host`` header may carry; ``None``: any
            (a server bound beyond loopback behind a token, whose name is not known here).
        error: the JSON body of an error response.
        csp: a Content-Security-Policy for every response (``None``: none).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: frozenset[str] | None,
        error: ErrorBody = detail_body,
        csp: str | None = None,
    ) -> None:
        self.app, self.allowed, self.error = app, allowed_hosts, error
        self.extra = SECURITY_HEADERS + (
            [(b"content-security-policy", csp.encode())] if csp else []
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed is not None and host_name(host) not in self.allowed:
            await send_json(
                send,
                421,
                self.error(421, f"this server does not answer for host {host[:100]!r}"),
            )
            return
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
            if origin == b"null" or netloc != host.strip().lower():
                await send_json(
                    send,
                    403,
                    self.error(
                        403, "cross-origin requests are refused (the Origin is not this server)"
                    ),
                )
                return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((k, v) for k, v in self.extra if k not in present),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


_TOKEN_IN_LINE = re.compile(r"(access_token=)[^&\s\"']+")


class TokenLogFilter(logging.Filter):
    """Masks ``access_token=...`` in log records (uvicorn's access log prints query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(
                _TOKEN_IN_LINE.sub(r"\1***", a) if isinstance(a, str) else a
                for a in (record.args if isinstance(record.args, tuple) else (record.args,))
            )
        if isinstance(record.msg, str):
            record.msg = _TOKEN_IN_LINE.sub(r"\1***", record.msg)
        return True
