"""Settings: the one owner of every ``MEDLOUPE_*`` environment variable.

No module-level mutable state: :meth:`Settings.from_env` reads the environment each time it is
called and callers pass the :class:`Settings` down (or read it where a setting is used, at
call time, never at import). Every variable is listed in :data:`ENV_VARS` (variable -> the
field it sets) and in the README's "Configuration" table; a test checks the two agree and
that no other module names a ``MEDLOUPE_`` variable.

Other code that must name a variable in a message uses :func:`env_name` (``env_name(
"max_pixels")`` -> ``"MEDLOUPE_MAX_PIXELS"``) or :func:`weight_env` for checkpoint paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_TOOL_TIMEOUT_S = 60.0
PREFIX = "MEDLOUPE_"
TRUE_VALUES = ("1", "true", "yes", "on")
RedactMode = Literal["always", "never", "remote"]

#: variable -> Settings field it sets (checkpoint paths: :func:`weight_env`).
ENV_VARS: dict[str, str] = {
    "MEDLOUPE_HOME": "home",
    "MEDLOUPE_CACHE": "cache",
    "MEDLOUPE_MAX_PIXELS": "max_pixels",
    "MEDLOUPE_TOOL_TIMEOUT": "tool_timeout_s",
    "MEDLOUPE_VLM": "vlm",
    "MEDLOUPE_KB": "kb",
    "MEDLOUPE_MINI": "mini",
    "MEDLOUPE_OPENAI_API_KEY": "openai_api_key",
    "MEDLOUPE_VLM_TIMEOUT": "vlm_timeout_s",
    "MEDLOUPE_VLM_RETRIES": "vlm_retries",
    "MEDLOUPE_VLM_CONCURRENCY": "vlm_concurrency",
    "MEDLOUPE_VLM_MAX_IMAGE_PIXELS": "vlm_max_image_pixels",
    "MEDLOUPE_REDACT_TEXT": "redact_text",
    "MEDLOUPE_HF_DEVICE": "hf_device",
    "MEDLOUPE_IMAGE_EMBEDDER": "image_embedder",
    "MEDLOUPE_OFFLINE": "offline",
    "MEDLOUPE_DOWNLOAD_WEIGHTS": "download_weights",
    "MEDLOUPE_DETECTOR": "detector",
    "MEDLOUPE_CLASSIFIER": "classifier",
    "MEDLOUPE_API_TOKEN": "api_token",
    "MEDLOUPE_MAX_UPLOAD_MB": "max_upload_mb",
    "MEDLOUPE_ALLOWED_HOSTS": "allowed_hosts",
    "MEDLOUPE_MCP_SERVERS": "mcp_servers",
    "MEDLOUPE_MCP_ROOTS": "mcp_roots",
    "MEDLOUPE_LOG_LEVEL": "log_level",
    "MEDLOUPE_DATABASE_URL": "database_url",
}
#: variables read by medloupe that belong to other software
FOREIGN_VARS = ("OPENAI_API_KEY", "HF_HUB_OFFLINE")
_NAME_OF = {f: v for v, f in ENV_VARS.items()}


def env_name(setting: str) -> str:
    """The environment variable of a :class:`Settings` field (for messages and docs)."""
    return _NAME_OF[setting]


def weight_env(weights: str) -> str:
    """The variable that may hold the path of a checkpoint (``sam_vit_b`` ->
    ``MEDLOUPE_SAM_VIT_B``)."""
    return PREFIX + weights.upper()


def _number(
    env: Mapping[str, str],
    name: str,
    default: float,
    cast: type[int] | type[float],
    *,
    allow_zero: bool = False,
) -> float:
    raw = env.get(name)
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


def _text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in TRUE_VALUES


def _redact_mode(env: Mapping[str, str]) -> RedactMode:
    name = env_name("redact_text")
    mode = (env.get(name) or "remote").strip().lower() or "remote"
    if mode in ("always", "1", "on", "true", "yes"):
        return "always"
    if mode in ("never", "0", "off", "false", "no"):
        return "never"
    if mode != "remote":
        raise ValueError(f"{name}={mode!r}: use always, never or remote (the default)")
    return "remote"


def _log_level(env: Mapping[str, str]) -> str:
    name = env_name("log_level")
    level = (env.get(name) or "WARNING").strip().upper() or "WARNING"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"{name}={level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def hub_offline(env: Mapping[str, str] | None = None) -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``)."""
    return _flag(os.environ if env is None else env, "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class Settings:
    """Process settings. Build with :meth:`from_env`; tests build them directly.

    Attributes:
        home: runs, the run index, the service database, LangGraph threads.
        cache: the default knowledge base and downloaded weights.
        max_pixels: largest image accepted at intake (width x height x frames decoded).
        tool_timeout_s: per-call tool timeout when a tool sets none, seconds.
        vlm: VLM spec when none is given (``"none"``: no VLM); ``None``: medloupe-mini.
        kb: knowledge base of a graph run without a context (LangGraph's server).
        mini: a trained medloupe-mini folder (default: the copy shipped in the package).
        openai_api_key: bearer token of an OpenAI-compatible endpoint.
        vlm_timeout_s, vlm_retries, vlm_concurrency: OpenAI-compatible client limits.
        vlm_max_image_pixels: pixel cap per image sent to a model (``None``: the backend's).
        redact_text: paint over burned-in text before images go to an endpoint.
        hf_device: device of an ``hf:`` model (``None``: CUDA when present).
        image_embedder: KB image embedder when none is given (``None``: ``auto``).
        offline: no weight downloads (also when ``HF_HUB_OFFLINE`` is set).
        download_weights: an explicitly named SAM model may download its checkpoint.
        detector, classifier: the ``detect`` / ``classify`` tools' models.
        api_token: bearer token of ``medloupe serve``.
        max_upload_mb: largest request body ``medloupe serve`` accepts, MB.
        allowed_hosts: host names (comma-separated in the variable) ``medloupe serve``
            answers besides the loopback names; ``None``: loopback names only without a
            token, any host with one.
        mcp_servers: MCP servers whose tools join the registry: a JSON list or the path of
            a JSON file (:mod:`medloupe.tools.mcp`); ``None``: none.
        mcp_roots: folders ``medloupe mcp serve`` reads ``image_path`` files from
            (``os.pathsep``-separated in the variable); empty: the working directory.
        log_level: the command line's logging level (``DEBUG`` ... ``CRITICAL``).
        database_url: ``postgresql://...``: the run index, service queue, checkpoints,
            trace events and reviews live in this database, shared by replicas of
            ``medloupe serve`` (``home`` then on storage they share); ``None``: SQLite files
            under ``home``.
    """

    home: Path = field(default_factory=lambda: Path.home() / ".medloupe")
    cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "medloupe")
    max_pixels: int = DEFAULT_MAX_PIXELS
    tool_timeout_s: float = DEFAULT_TOOL_TIMEOUT_S
    vlm: str | None = None
    kb: str | None = None
    mini: Path | None = None
    openai_api_key: str | None = None
    vlm_timeout_s: float = 120.0
    vlm_retries: int = 3
    vlm_concurrency: int = 4
    vlm_max_image_pixels: int | None = None
    redact_text: RedactMode = "remote"
    hf_device: str | None = None
    image_embedder: str | None = None
    offline: bool = False
    download_weights: bool = False
    detector: str | None = None
    classifier: str | None = None
    api_token: str | None = None
    max_upload_mb: float = 64.0
    allowed_hosts: tuple[str, ...] | None = None
    mcp_servers: str | None = None
    mcp_roots: tuple[Path, ...] = ()
    log_level: str = "WARNING"
    database_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (default: ``os.environ``).

        Raises:
            ValueError: a variable holds a value it cannot take (the message names it).
        """
        e: Mapping[str, str] = os.environ if env is None else env
        home, cache, mini = (_text(e, env_name(k)) for k in ("home", "cache", "mini"))
        pixels_cap = int(_number(e, env_name("vlm_max_image_pixels"), 0, int, allow_zero=True))
        return cls(
            home=Path(home).expanduser() if home else Path.home() / ".medloupe",
            cache=Path(cache).expanduser() if cache else Path.home() / ".cache" / "medloupe",
            max_pixels=int(_number(e, env_name("max_pixels"), DEFAULT_MAX_PIXELS, int)),
            tool_timeout_s=_number(e, env_name("tool_timeout_s"), DEFAULT_TOOL_TIMEOUT_S, float),
            vlm=_text(e, env_name("vlm")),
            kb=_text(e, env_name("kb")),
            mini=Path(mini).expanduser() if mini else None,
            openai_api_key=_text(e, env_name("openai_api_key")) or _text(e, "OPENAI_API_KEY"),
            vlm_timeout_s=_number(e, env_name("vlm_timeout_s"), 120.0, float),
            vlm_retries=int(_number(e, env_name("vlm_retries"), 3, int, allow_zero=True)),
            vlm_concurrency=int(_number(e, env_name("vlm_concurrency"), 4, int)),
            vlm_max_image_pixels=pixels_cap or None,
            redact_text=_redact_mode(e),
            hf_device=_text(e, env_name("hf_device")),
            image_embedder=_text(e, env_name("image_embedder")),
            offline=_flag(e, env_name("offline")) or hub_offline(e),
            download_weights=(e.get(env_name("download_weights")) or "").strip() == "1",
            detector=_text(e, env_name("detector")),
            classifier=_text(e, env_name("classifier")),
            api_token=e.get(env_name("api_token")) or None,
            max_upload_mb=_number(e, env_name("max_upload_mb"), 64.0, float),
            allowed_hosts=tuple(
                h.strip().lower() for h in e[env_name("allowed_hosts")].split(",") if h.strip()
            )
            if (e.get(env_name("allowed_hosts")) or "").strip()
            else None,
            mcp_servers=_text(e, env_name("mcp_servers")),
            mcp_roots=tuple(
                Path(p).expanduser().resolve()
                for p in e.get(env_name("mcp_roots"), "").split(os.pathsep)
                if p.strip()
            ),
            log_level=_log_level(e),
            database_url=_text(e, env_name("database_url")),
        )

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def weights_dir(self) -> Path:
        return self.cache / "weights"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def weight_path(self, weights: str) -> str | None:
        """The path :func:`weight_env` of ``weights`` holds, read now (``None`` when unset)."""
        return _text(os.environ, weight_env(weights))


def redaction_wanted(base_url: str, mode: RedactMode | None = None) -> bool:
    """Whether to redact burned-in text for this endpoint: ``always``, ``never``, or
    ``remote``: when the endpoint's host is not a loopback address (default:
    ``Settings.redact_text``)."""
    import ipaddress
    from urllib.parse import urlsplit

    mode = mode or Settings.from_env().redact_text
    if mode != "remote":
        return mode == "always"
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True
