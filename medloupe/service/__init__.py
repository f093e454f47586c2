"""The medloupe HTTP service: ``medloupe serve``.

:func:`serve` checks the binding (a non-loopback address needs ``Settings.api_token``),
builds a :class:`~medloupe.service.manager.RunManager` and the FastAPI app
(:func:`~medloupe.service.app.create_app`) and runs them under uvicorn.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator

from medloupe.asgi import TokenLogFilter
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
    if token is not None and (
        len(token) < 16 or any(c.isspace() for c in token) or len(set(token)) < 8
    ):
        raise InputError(
            f"{TOKEN_ENV} is too weak: use at least 16 random characters without spaces "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
        )


@contextlib.contextmanager
def home_lock(settings: Settings) -> Iterator[None]:
    """Hold ``<home>/serve.lock`` while serving on SQLite: a second ``medloupe serve`` on the
    same home is refused (SQLite files are one machine's; replicas share a PostgreSQL
    database instead, ``Settings.database_url``).

    Raises:
        InputError: another server holds the home.
    """
    import fcntl

    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / "serve.lock"
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise InputError(
                f"another medloupe serve ({holder}) uses {settings.home}; stop it, or give this "
                f"one its own {env_name('home')}"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    workers: int = 2,
    queue_size: int = 16,
    vlm: str | None = None,
    kb: str | None = None,
    lease_s: float | None = None,
    settings: Settings | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API until interrupted (blocking). ``vlm``: the backend spec of every run
    (``None``: the settings' or the default, ``"none"``: the evidence-only path); ``kb``:
    ``"default"`` or a folder; ``lease_s``: see :class:`~medloupe.service.manager.RunManager`.
    """
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
    manager = RunManager(
        settings, workers=workers, queue_size=queue_size, resources=resources, lease_s=lease_s
    )
    app = create_app(
        manager,
        token=token,
        max_upload_bytes=settings.max_upload_bytes,
        allowed_hosts=settings.allowed_hosts,
    )
    log.info("medloupe serve on http://%s:%d (runs in %s)", host, port, settings.runs_dir)
    logging.getLogger("uvicorn.access").addFilter(TokenLogFilter())  # ?access_token= masked
    # SQLite: one server per home; PostgreSQL: replicas share the home and claim runs
    lock = home_lock(settings) if settings.database_url is None else contextlib.nullcontext()
    with lock:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["TOKEN_ENV", "check_binding", "home_lock", "is_loopback", "serve"]
