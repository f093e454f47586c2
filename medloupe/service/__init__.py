"""The medloupe HTTP service: ``medloupe serve``.

:func:`serve` checks the binding (a non-loopback address needs ``MEDLOUPE_API_TOKEN``),
builds a :class:`~medloupe.service.manager.RunManager` and the FastAPI app
(:func:`~medloupe.service.app.create_app`) and runs them under uvicorn.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from medloupe.config import Settings, env_number
from medloupe.errors import InputError

log = logging.getLogger(__name__)

TOKEN_ENV = "MEDLOUPE_API_TOKEN"


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


def max_upload_bytes() -> int:
    """``MEDLOUPE_MAX_UPLOAD_MB`` (default 64) in bytes."""
    return int(env_number("MEDLOUPE_MAX_UPLOAD_MB", 64, float) * 1024 * 1024)


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    workers: int = 2,
    queue_size: int = 16,
    vlm: str | None = None,
    vlm_default: bool = False,
    kb: str | None = None,
    settings: Settings | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API until interrupted (blocking). ``vlm``: the backend spec of every run
    (``None``: the evidence-only path); ``vlm_default``: it is the default one."""
    import uvicorn

    from medloupe.service.app import create_app
    from medloupe.service.manager import RunManager

    token = os.environ.get(TOKEN_ENV) or None
    check_binding(host, token)
    settings = settings or Settings.from_env()
    if kb and kb != "default":
        kb = str(Path(kb).resolve())
    if vlm or kb:
        from medloupe.graphs.defaults import shared_resources

        # a bad spec or KB fails here, not in every run; the runs reuse what this loads
        shared_resources(vlm, kb)
    manager = RunManager(
        settings, workers=workers, queue_size=queue_size, vlm=vlm, vlm_default=vlm_default, kb=kb
    )
    app = create_app(manager, token=token, max_upload_bytes=max_upload_bytes())
    log.info("medloupe serve on http://%s:%d (runs in %s)", host, port, settings.runs_dir)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["TOKEN_ENV", "check_binding", "is_loopback", "serve"]
