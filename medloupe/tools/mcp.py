"""Tools of MCP servers in medloupe's registry (the ``mcp_servers`` setting).

The setting holds a JSON list, or the path of a JSON file holding one (or
``{"servers": [...]}``), of servers::

    [{"name": "lab", "command": ["python", "-m", "lab_tools"]},          # stdio
     {"name": "pacs", "url": "http://127.0.0.1:9000/mcp",                # streamable HTTP
      "headers": {"Authorization": "Bearer ..."}, "timeout_s": 60}]

Each server's tools become medloupe tools named ``NAME_TOOL`` whose arguments are validated
against the server's JSON schema. An input property named ``image_path`` or ``image_base64``
is not the planner's to fill: it receives the run's display image (a PNG file path, or its
bytes in base64; painted over where burned-in text is, for a server off this machine, as
the ``redact_text`` setting says). The reply becomes evidence: its text, its structured content
and its images (stored as artifacts). A tool error, a dead server or a hang is error
evidence within the tool's timeout.

Each server is connected once per registry, from a background thread with its own event
loop (so any caller's loop can use it); a server that cannot be reached when the registry is
built is a listed problem (``medloupe tools list``), not a failure of the run.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medloupe.config import env_name, redaction_wanted
from medloupe.errors import InputError, ToolExecutionError, ToolUnavailableError, validation_text
from medloupe.tools.base import Availability, Tool, ToolContext, ToolResult

log = logging.getLogger(__name__)

#: input properties medloupe fills with the run's image
IMAGE_FIELDS = ("image_path", "image_base64")
_TOOL_NAME = re.compile(r"[^a-z0-9_]+")
DEFAULT_CONNECT_TIMEOUT_S = 20.0


class McpServerSpec(BaseModel):
    """One MCP server of the ``mcp_servers`` setting.

    Attributes:
        name: prefix of its tools' names in medloupe (``NAME_TOOL``).
        command: argv of a server spoken to over stdio (exclusive with ``url``).
        url: streamable-HTTP endpoint (``http://host:port/mcp``).
        env: extra environment variables of a stdio server.
        headers: HTTP headers (e.g. ``Authorization``) of an HTTP server.
        timeout_s: bound of each call (default: the run's tool timeout).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9]{0,23}$")
    command: list[str] | None = Field(default=None, min_length=1)
    url: str | None = Field(default=None, pattern=r"^https?://")
    env: dict[str, str] | None = None
    headers: dict[str, str] | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of 'command' (stdio) or 'url' (streamable HTTP)")
        return self

    def target(self) -> str:
        """What it is, for messages (never its headers)."""
        return self.url or " ".join(self.command or [])


def parse_mcp_servers(text: str | None) -> list[McpServerSpec]:
    """The servers ``text`` names: a JSON list, or the path of a JSON file with one.

    Raises:
        InputError: not JSON, not a list, a bad entry or two servers with one name (the
            message names the variable and the entry).
    """
    var = env_name("mcp_servers")
    if not text or not text.strip():
        return []
    raw = text.strip()
    if not raw.startswith(("[", "{")):
        path = Path(raw).expanduser()
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{var}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{var} is not JSON ({exc.msg} at character {exc.pos})") from None
    if isinstance(data, dict) and "servers" in data:
        data = data["servers"]
    if not isinstance(data, list):
        raise InputError(f'{var} must be a JSON list of {{"name": ..., "command"|"url": ...}}')
    specs: list[McpServerSpec] = []
    for i, entry in enumerate(data):
        try:
            specs.append(McpServerSpec.model_validate(entry))
        except ValidationError as exc:
            raise InputError(f"{var} entry {i}: {validation_text(exc, root='entry')}") from None
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{var}: two servers are named {', '.join(dupes)}")
    return specs


class McpConnection:
    """A session with one MCP server, held by a background thread's event loop.

    Args:
        spec: the server.
        errlog: where a stdio server's stderr goes (default: ``os.devnull``).
    """

    def __init__(self, spec: McpServerSpec, *, errlog: TextIO | None = None) -> None:
        self.spec = spec
        self.problem: str | None = None
        self._errlog = errlog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._stop: asyncio.Event | None = None
        self._ready: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, name=f"mcp-{spec.name}", daemon=True
        )

    # --- life cycle -----------------------------------------------------------------
    def open(self, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> list[Any]:
        """Connect and list the server's tools (``mcp_types.Tool``); blocks up to
        ``timeout_s``.

        Raises:
            ToolUnavailableError: the server did not start, answer or list its tools.
        """
        self._thread.start()
        try:
            return self._ready.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            self.problem = f"no answer within {timeout_s:g} s"
            self.close()
        except ToolUnavailableError:
            pass  # the session thread recorded the problem
        raise ToolUnavailableError(
            f"MCP server {self.spec.name!r} ({self.spec.target()}): {self.problem}"
        )

    def close(self) -> None:
        """End the session (a stdio server's process ends with it)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _main(self) -> None:
        try:
            asyncio.run(self._session())
        # the session thread's boundary: whatever ended it (a spawn failure, a protocol
        # error, a dead server) is recorded as the reason, and open() gets it
        except BaseException as exc:  # noqa: BLE001
            self.problem = self.problem or _reason(exc)
            if not self._ready.done():
                self._ready.set_exception(ToolUnavailableError(self.problem))
        else:
            self.problem = self.problem or "the session ended"

    async def _session(self) -> None:
        from mcp import Client

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Client(self._transport()) as client:
            tools: list[Any] = []
            cursor: str | None = None
            while True:
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
            self._client = client
            self._ready.set_result(tools)
            await self._stop.wait()
        self._client = None

    def _transport(self) -> Any:
        spec = self.spec
        if spec.url is not None:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            http = httpx2.AsyncClient(
                headers=spec.headers or {}, timeout=httpx2.Timeout(30.0, read=300.0)
            )
            return streamable_http_client(spec.url, http_client=http)
        from mcp.client.stdio import StdioServerParameters, stdio_client

        assert spec.command is not None
        params = StdioServerParameters(command=spec.command[0], args=spec.command[1:], env=spec.env)
        errlog = self._errlog or open(os.devnull, "w")  # noqa: SIM115 - lives with the thread
        return stdio_client(params, errlog=errlog)

    # --- calls ----------------------------------------------------------------------
    async def call(self, name: str, arguments: dict[str, Any], timeout_s: float | None) -> Any:
        """``tools/call`` on the server from any event loop; the ``CallToolResult``.
        Cancelling the awaiting task cancels the call.

        Raises:
            ToolUnavailableError: the session is gone (the reason).
            TimeoutError: no reply within ``timeout_s`` (the call is cancelled).
        """
        loop, client = self._loop, self._client
        if client is None or loop is None or loop.is_closed():
            raise ToolUnavailableError(
                f"MCP server {self.spec.name!r} is not connected: {self.problem or 'not opened'}"
            )
        fut = asyncio.run_coroutine_threadsafe(
            client.call_tool(name, arguments, read_timeout_seconds=timeout_s), loop
        )
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            fut.cancel()
            raise


class McpToolResult(ToolResult):
    """What an MCP tool call returned: its text, its structured content and its images
    (as artifact ids)."""

    server: str
    tool: str
    text: str = ""
    structured: Any = None

    def summary(self) -> str:
        if self.text.strip():
            return self.text.strip()[:500]
        if self.structured is not None:
            return json.dumps(self.structured, default=str)[:500]
        return f"{len(self.artifacts)} image(s)" if self.artifacts else "(empty reply)"


def schema_model(name: str, schema: dict[str, Any]) -> type[BaseModel]:
    """A pydantic model that validates arguments against the JSON ``schema`` (2020-12) and
    reports that schema as its own.

    Raises:
        ValueError: ``schema`` is not a valid JSON schema of an object.
    """
    import jsonschema

    if schema.get("type", "object") != "object":
        raise ValueError(f"input schema of {name} is not an object schema")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"input schema of {name} is invalid: {exc.message}") from None
    validator = jsonschema.Draft202012Validator(schema)
    frozen = copy.deepcopy(schema)

    class McpArguments(BaseModel):
        model_config = ConfigDict(extra="allow")

        @model_validator(mode="before")
        @classmethod
        def _against_schema(cls, data: Any) -> Any:
            errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
            if errors:
                raise ValueError(
                    "; ".join(
                        f"{'/'.join(map(str, e.absolute_path)) or 'arguments'}: {e.message}"
                        for e in errors[:5]
                    )
                )
            return data

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return copy.deepcopy(frozen)

    McpArguments.__name__ = McpArguments.__qualname__ = f"{name}_arguments"
    return McpArguments


def medloupe_name(server: str, tool: str) -> str:
    """``SERVER_TOOL`` in medloupe's tool-name alphabet (a-z, 0-9, ``_``; 64 at most)."""
    return f"{server}_{_TOOL_NAME.sub('_', tool.lower()).strip('_') or 'tool'}"[:64]


class McpTool(Tool):
    """One tool of an MCP server, called through its :class:`McpConnection`."""

    output_model = McpToolResult

    def __init__(self, connection: McpConnection, remote: Any) -> None:
        spec = connection.spec
        self.connection = connection
        self.remote_name: str = remote.name
        self.name = medloupe_name(spec.name, remote.name)
        text = (remote.description or remote.title or remote.name).strip()
        self.description = f"{text[:800]} (MCP server {spec.name})"
        self.timeout_s = spec.timeout_s
        schema = copy.deepcopy(dict(remote.input_schema or {"type": "object"}))
        props = schema.get("properties") or {}
        self.image_fields = tuple(f for f in IMAGE_FIELDS if f in props)
        for f in self.image_fields:
            props.pop(f)
        if "required" in schema:
            schema["required"] = [r for r in schema["required"] if r not in self.image_fields]
        self.input_model = schema_model(self.name, schema)
        self._redact = spec.url is not None and redaction_wanted(spec.url)

    def available(self) -> Availability:
        problem = self.connection.problem
        if problem:
            return Availability(False, f"MCP server {self.connection.spec.name}: {problem}")
        return Availability(True, f"MCP server {self.connection.spec.name}")

    async def run(self, args: BaseModel, ctx: ToolContext) -> McpToolResult:
        arguments = args.model_dump(mode="json")
        if self.image_fields:
            arguments.update(await asyncio.to_thread(self._image_arguments, ctx))
        # the registry bounds the call by the tool's or the run's timeout and cancels it
        result = await self.connection.call(self.remote_name, arguments, self.timeout_s)
        texts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
        if result.is_error:
            raise RuntimeError(  # the registry makes it error evidence
                f"MCP server {self.connection.spec.name} tool {self.remote_name}: "
                + (" ".join(texts).strip()[:1000] or "an error without a message")
            )
        images = [c for c in result.content if getattr(c, "type", None) == "image"]
        artifacts = await asyncio.to_thread(_store_images, images, ctx)
        return McpToolResult(
            server=self.connection.spec.name,
            tool=self.remote_name,
            text="\n".join(texts)[:8000],
            structured=result.structured_content,
            artifacts=artifacts,
        )

    def _image_arguments(self, ctx: ToolContext) -> dict[str, str]:
        """The run's display image as the server's ``image_path`` / ``image_base64``."""
        if ctx.image.display_artifact is None:
            raise ToolExecutionError("the run's image has no display artifact")
        path = ctx.store.path(ctx.image.display_artifact)
        if self._redact:
            from medloupe.tools.ocr import OcrEngine, redact_burned_in_text

            clean, _ = redact_burned_in_text(ctx.rgb(), OcrEngine())
            path = ctx.store.path(ctx.store.put_png(clean, kind="image"))
        out: dict[str, str] = {}
        if "image_path" in self.image_fields:
            out["image_path"] = str(path)
        if "image_base64" in self.image_fields:
            out["image_base64"] = base64.b64encode(path.read_bytes()).decode("ascii")
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["origin"] = f"MCP server {self.connection.spec.name} ({self.connection.spec.target()})"
        d["image_arguments"] = list(self.image_fields)
        return d


def _store_images(images: list[Any], ctx: ToolContext) -> list[str]:
    from PIL import Image, UnidentifiedImageError

    ids = []
    for c in images:
        try:
            data = base64.b64decode(c.data, validate=True)
            with Image.open(io.BytesIO(data)) as img:
                arr = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
        except (ValueError, UnidentifiedImageError, OSError) as exc:
            log.warning("an MCP image reply could not be decoded (%s); left out", exc)
            continue
        ids.append(ctx.store.put_png(arr, kind="image"))
    return ids


def _reason(exc: BaseException) -> str:
    """The innermost message of ``exc`` (task groups wrap the real one)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


def mcp_tools(
    specs: list[McpServerSpec],
    *,
    on_problem: Callable[[McpServerSpec, str], None],
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    errlog_dir: Path | None = None,
) -> list[McpTool]:
    """Connect to each server and wrap its tools; a server that fails is reported to
    ``on_problem`` (with the reason) and contributes nothing."""
    out: list[McpTool] = []
    for spec in specs:
        errlog = None
        if errlog_dir is not None and spec.command is not None:
            errlog_dir.mkdir(parents=True, exist_ok=True)
            errlog = (errlog_dir / f"mcp-{spec.name}.log").open("a", encoding="utf-8")
        conn = McpConnection(spec, errlog=errlog)
        try:
            remote_tools = conn.open(connect_timeout_s)
        except ToolUnavailableError as exc:
            log.warning("%s", exc)
            on_problem(spec, str(exc))
            continue
        for remote in remote_tools:
            try:
                out.append(McpTool(conn, remote))
            except ValueError as exc:
                on_problem(spec, f"tool {remote.name!r} left out: {exc}")
    return out
