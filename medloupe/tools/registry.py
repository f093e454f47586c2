"""The tool registry and the execution of tool calls into evidence.

Names are unique: registering a second tool under a taken name raises
:class:`~medloupe.errors.DuplicateToolError`; asking for an unknown name raises
:class:`~medloupe.errors.UnknownToolError` with a "did you mean" hint. Arguments are validated
against the tool's input model (:class:`~medloupe.errors.ToolArgumentsError` carries pydantic's
message). A call that fails validation, is unavailable, raises or times out becomes an evidence
item with ``status: "error"``; the run goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from medloupe.errors import (
    DuplicateToolError,
    PluginLoadError,
    ToolArgumentsError,
    ToolExecutionError,
    ToolTimeoutError,
    ToolUnavailableError,
    UnknownToolError,
    validation_text,
)
from medloupe.schemas import Evidence, Region
from medloupe.tools.base import Tool, ToolContext, ToolResult

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "medloupe.tools"


@dataclass(frozen=True)
class PluginProblem:
    """An entry point that could not be loaded; listed by ``medloupe tools list``."""

    entry_point: str
    distribution: str | None
    error: str


def _canonical(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)


def evidence_id(tool_name: str, arguments: dict[str, Any], image_hash: str) -> str:
    """Stable evidence id of a tool call: the same call on the same image gives the same id."""
    digest = hashlib.sha256(f"{tool_name}\n{_canonical(arguments)}\n{image_hash}".encode())
    return f"ev-{tool_name}-{digest.hexdigest()[:10]}"


class ToolRegistry:
    """Tools by name. Build one per run (or per process) and pass it in the run context."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._origin: dict[str, str] = {}
        self.problems: list[PluginProblem] = []
        for t in tools:
            self.register(t)

    # --- registration ----------------------------------------------------------------
    def register(self, tool: Tool, *, origin: str = "medloupe") -> Tool:
        """Add ``tool``. Raises :class:`DuplicateToolError` when its name is taken."""
        if not isinstance(tool, Tool):
            raise TypeError(f"{tool!r} is not a medloupe Tool (use the @tool decorator)")
        if tool.name in self._tools:
            raise DuplicateToolError(
                f"a tool named {tool.name!r} is already registered "
                f"(from {self._origin[tool.name]}); "
                f"the one from {origin} clashes with it: rename one of them"
            )
        self._tools[tool.name] = tool
        self._origin[tool.name] = origin
        return tool

    def tool(self, fn: Any = None, **options: Any) -> Any:
        """Decorator: make a tool from a typed function and register it here."""
        from medloupe.tools.base import tool as make_tool

        def wrap(f: Any) -> Tool:
            return self.register(make_tool(f, **options))

        return wrap(fn) if fn is not None else wrap

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Register the tools that installed distributions expose in ``group``.

        An entry point may name a :class:`Tool`, an iterable of tools, or a zero-argument
        callable returning either. One that fails to import is recorded in :attr:`problems`
        (and logged) without stopping the others; a name clash raises.

        Returns:
            The names registered.
        """
        added: list[str] = []
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            origin = _origin_of(ep)
            try:
                tools = _tools_from_entry_point(ep)
            except PluginLoadError as exc:
                log.warning("tool plugin %s failed to load: %s", ep.value, exc)
                self.problems.append(PluginProblem(ep.value, _dist_name(ep), str(exc)))
                continue
            for t in tools:
                self.register(t, origin=origin)
                added.append(t.name)
        return added

    def load_mcp_servers(self, servers: str | None, *, logs: Path | None = None) -> list[str]:
        """Register the tools of the MCP servers ``servers`` names (the ``mcp_servers`` setting's
        form, :func:`medloupe.tools.mcp.parse_mcp_servers`), connecting to each now; a
        server that does not answer is recorded in :attr:`problems`. ``logs``: where stdio
        servers' stderr goes. Returns the names registered.

        Raises:
            medloupe.errors.InputError: ``servers`` is malformed.
        """
        from medloupe.tools.mcp import mcp_tools, parse_mcp_servers

        def problem(spec: Any, reason: str) -> None:
            self.problems.append(PluginProblem(f"MCP server {spec.name}", None, reason))

        added = []
        for t in mcp_tools(parse_mcp_servers(servers), on_problem=problem, errlog_dir=logs):
            self.register(t, origin=t.describe()["origin"])
            added.append(t.name)
        return added

    def adopt_connected(self, other: ToolRegistry) -> None:
        """Register ``other``'s tools that speak to servers (MCP) here: they hold a
        connection and no per-run state, so a fresh registry shares them."""
        from medloupe.tools.mcp import McpTool

        for t in other:
            if isinstance(t, McpTool) and t.name not in self._tools:
                self.register(t, origin=other.origin(t.name))
        self.problems.extend(p for p in other.problems if p not in self.problems)

    # --- lookup ----------------------------------------------------------------------
    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownToolError(name, list(self._tools)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(sorted(self._tools.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def origin(self, name: str) -> str:
        return self._origin[name]

    def validate(self, name: str, arguments: dict[str, Any] | None) -> BaseModel:
        """Validate ``arguments`` for tool ``name``; raises :class:`ToolArgumentsError`."""
        tool = self.get(name)
        try:
            return tool.input_model.model_validate(arguments or {})
        except ValidationError as exc:
            raise ToolArgumentsError(
                f"invalid arguments for tool {name!r}: {validation_text(exc, root='arguments')}"
            ) from None

    def catalogue(self, modality: str | None = None) -> list[dict[str, Any]]:
        """JSON descriptions of the tools that are available here and suit ``modality``."""
        out = []
        for t in self:
            if t.suits(modality) and t.available().ok:
                d = t.describe()
                d.pop("output_schema")
                out.append(d)
        return out

    # --- execution -------------------------------------------------------------------
    async def call(
        self,
        name: str,
        arguments: dict[str, Any] | None,
        ctx: ToolContext,
        *,
        default_timeout_s: float,
        step: int = 0,
    ) -> Evidence:
        """Run one tool call and return its evidence item (never raises for tool failures).

        Sync tools run in a worker thread; each call is bounded by the tool's ``timeout_s``
        or ``default_timeout_s``. Unknown tools, invalid arguments, unavailability, errors
        and timeouts all give ``status="error"`` with a message naming the problem.
        """
        arguments = dict(arguments or {})
        ev_id = evidence_id(name, arguments, ctx.image.content_hash)
        started = time.perf_counter()

        def failed(exc: Exception) -> Evidence:
            return Evidence(
                id=ev_id,
                kind="tool",
                step=step,
                tool=name,
                arguments=arguments,
                status="error",
                error=f"{type(exc).__name__}: {exc}",
                summary=f"{name} failed: {exc}"[:300],
                duration_ms=(time.perf_counter() - started) * 1000.0,
            )

        try:
            tool = self.get(name)
            args = self.validate(name, arguments)
            availability = tool.available()
            if not availability.ok:
                raise ToolUnavailableError(f"tool {name!r} is unavailable: {availability.reason}")
            timeout = tool.timeout_s or default_timeout_s
            coro = tool.run(args, ctx) if tool.is_async else asyncio.to_thread(tool.run, args, ctx)
            try:
                result = await asyncio.wait_for(coro, timeout=timeout)  # type: ignore[arg-type]
            except TimeoutError:
                raise ToolTimeoutError(f"tool {name!r} timed out after {timeout:g} s") from None
            except (UnknownToolError, ToolArgumentsError, ToolUnavailableError):
                raise
            except Exception as exc:
                log.warning("tool %s raised %s: %s", name, type(exc).__name__, exc)
                log.debug("tool %s traceback", name, exc_info=True)
                raise ToolExecutionError(f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(result, tool.output_model):
                raise ToolExecutionError(
                    f"tool {name!r} returned {type(result).__name__}, "
                    f"not its declared {tool.output_model.__name__}"
                )
        except (
            UnknownToolError,
            ToolArgumentsError,
            ToolUnavailableError,
            ToolTimeoutError,
            ToolExecutionError,
        ) as exc:
            return failed(exc)
        regions: list[Region] = []
        artifacts: list[str] = []
        summary = ""
        if isinstance(result, ToolResult):
            for i, r in enumerate(result.regions):
                regions.append(
                    r.model_copy(update={"id": f"{ev_id}-r{i}", "tool": name, "evidence_id": ev_id})
                )
            artifacts = list(result.artifacts)
            summary = result.summary()
        output = result.model_dump(mode="json", exclude={"regions", "artifacts"})
        return Evidence(
            id=ev_id,
            kind="tool",
            step=step,
            tool=name,
            arguments=args.model_dump(mode="json"),
            status="ok",
            summary=summary or json.dumps(output)[:300],
            output=output,
            regions=regions,
            artifacts=artifacts,
            duration_ms=(time.perf_counter() - started) * 1000.0,
        )


def _dist_name(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) if dist is not None else None


def _origin_of(ep: EntryPoint) -> str:
    dist = _dist_name(ep)
    return f"entry point {ep.name!r} of {dist or 'an unknown distribution'}"


def _tools_from_entry_point(ep: EntryPoint) -> list[Tool]:
    try:
        obj = ep.load()
    except Exception as exc:
        raise PluginLoadError(
            f"entry point {ep.name} = {ep.value} of {_dist_name(ep)} failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obj, Tool) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise PluginLoadError(f"entry point {ep.value} raised when called: {exc}") from exc
    items = [obj] if isinstance(obj, Tool) else list(obj) if isinstance(obj, Iterable) else []
    bad = [o for o in items if not isinstance(o, Tool)]
    if bad or not items:
        raise PluginLoadError(
            f"entry point {ep.value} gave {obj!r}; expected a medloupe Tool or a list of them"
        )
    return items
