"""Settings read from the environment, once per call of :func:`Settings.from_env`.

No module-level mutable state: callers build a :class:`Settings` and pass it down.

Environment variables
---------------------
``MEDLOUPE_HOME``
    Root for runs (``$MEDLOUPE_HOME/runs``) and the run index. Default ``~/.medloupe``.
``MEDLOUPE_MAX_PIXELS``
    Largest image accepted at intake, in pixels (width x height x frames decoded). Default
    50,000,000.
``MEDLOUPE_TOOL_TIMEOUT``
    Default per-call tool timeout in seconds when a tool sets none. Default 60.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_TOOL_TIMEOUT_S = 60.0


def env_number(
    name: str, default: float, cast: type[int] | type[float], *, allow_zero: bool = False
) -> float:
    """A positive (or, with ``allow_zero``, non-negative) number from the environment, or
    ``default`` when unset or blank. Raises ``ValueError`` naming the variable otherwise."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = cast(raw)
    except ValueError as exc:
        raise ValueError(
            f"{name}={raw!r} is not {'an integer' if cast is int else 'a number'}"
        ) from exc
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={raw!r} must be {'non-negative' if allow_zero else 'positive'}")
    return value


@dataclass(frozen=True)
class Settings:
    """Process settings. Build with :meth:`from_env`; tests build them directly."""

    home: Path = field(default_factory=lambda: Path.home() / ".medloupe")
    max_pixels: int = DEFAULT_MAX_PIXELS
    tool_timeout_s: float = DEFAULT_TOOL_TIMEOUT_S

    @classmethod
    def from_env(cls) -> Settings:
        home = os.environ.get("MEDLOUPE_HOME")
        return cls(
            home=Path(home).expanduser() if home else Path.home() / ".medloupe",
            max_pixels=int(env_number("MEDLOUPE_MAX_PIXELS", DEFAULT_MAX_PIXELS, int)),
            tool_timeout_s=env_number("MEDLOUPE_TOOL_TIMEOUT", DEFAULT_TOOL_TIMEOUT_S, float),
        )

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def index_path(self) -> Path:
        return self.home / "runs.sqlite"
