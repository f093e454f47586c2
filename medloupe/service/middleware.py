"""ASGI middleware of ``medloupe serve``: the bearer-token check and the request-body limit,
before any parsing."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from medloupe.config import env_name

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LimitAndAuth:
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
                        f"{self.max_body} bytes ({env_name('max_upload_mb')})"
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
