"""The bearer-token check of ``medloupe serve`` (ASGI, before any parsing); the body limit,
host allow-list, cross-origin refusal and security headers are :mod:`medloupe.asgi`'s."""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs

from medloupe.asgi import ASGIApp, Receive, Scope, Send, send_json


class TokenAuth:
    """401 for every request but ``/healthz`` without the bearer token (``Authorization:
    Bearer <token>`` or ``?access_token=<token>``); ``token=None``: open."""

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.token
            and scope["path"] != "/healthz"
            and not self._authorised(scope)
        ):
            await send_json(
                send,
                401,
                {"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                [(b"www-authenticate", b"Bearer")],
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
