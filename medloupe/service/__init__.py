"""The medloupe HTTP service: ``medloupe serve``.

:func:`serve` checks the binding (a non-loopback address needs ``Settings.api_token``),
builds a :class:`~medloupe.service.manager.RunManager` and the FastAPI app
(:func:`~medloupe.service.app.create_app`) and runs them under uvicorn.
"""

from __future__ import annotations

import ipaddress
import logging

from medloupe.config import Settings, env_name
from medloupe.errors import InputError

log = logging.getLogger(__name__)

TOKEN_ENV = env_name("api_token")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume reachable from elsewhere


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a bearer token."""
    if not is_loopback(host) and not token:
        raise InputError(
            f"binding to {host} exposes the API beyond this machine: set {TOKEN_ENV} to a "
            "secret token (clients then send 'Authorization: Bearer <token>'), or bind "
            "127.0.0.1"
        )
    if token is not None and len(token) < 16:
        raise InputError(f"{TOKEN_ENV} is too short: use at least 16 random characters")


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    workers: int = 2,
    queue_size: int = 16,
    vlm: str | None = None,
    kb: str | None = None,
    settings: Settings | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API until interrupted (blocking). ``vlm``: the backend spec of every run
    (``None``: the settings' or the default, ``"none"``: the evidence-only path); ``kb``:
    ``"default"`` or a folder."""
    import uvicorn

    from medloupe.graphs.context import resolve_resources, shared_resources
    from medloupe.service.app import create_app
    from medloupe.service.manager import RunManager

    settings = settings or Settings.from_env()
    token = settings.api_token
    check_binding(host, token)
    resources = resolve_resources(vlm, kb, settings)
    # a bad spec or KB fails here, not in every run; the runs reuse what this loads
    shared_resources(resources)
    manager = RunManager(settings, workers=workers, queue_size=queue_size, resources=resources)
    app = create_app(manager, token=token, max_upload_bytes=settings.max_upload_bytes)
    log.info("medloupe serve on http://%s:%d (runs in %s)", host, port, settings.runs_dir)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["TOKEN_ENV", "check_binding", "is_loopback", "serve"]
