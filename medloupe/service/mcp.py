"""medloupe's instruments over MCP: ``medloupe mcp serve`` (the official SDK's low-level
server, stdio or streamable HTTP).

Every available registry tool is an MCP tool with its own input schema (from its pydantic
model) plus the image it works on, and its output model as the output schema; ``diagnose``
runs the whole graph on an image and a question. The image of a call is one of:

- ``image_path``: a file under the allowed roots (``--root``, the ``mcp_roots`` setting; the
  working directory by default);
- ``image_base64``: PNG, JPEG, TIFF, DICOM or NIfTI bytes (sniffed, never trusted by name);
- ``image_artifact``: an artifact id an earlier call of this server returned (a crop, a
  mask, ...).

Images go through the same intake as every run (header values by allow-list, the pixel
limit); artifacts come back as image content and stay addressable for later calls while the
server runs (in a scratch folder under the home's ``mcp/``, removed at exit). A tool
failure is an MCP tool error (``isError``) carrying medloupe's message; an unknown tool is a
protocol error. The HTTP transport binds loopback unless the ``api_token`` setting is set, as
``medloupe serve`` does, and then needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Literal

import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, Field

from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings, env_name
from medloupe.errors import InputError, MedloupeError
from medloupe.graphs.context import Resources
from medloupe.io.intake import ingest_image, read_input
from medloupe.io.records import ImageRecord
from medloupe.options import RunOptions
from medloupe.runner import create_run, execute
from medloupe.schemas import Evidence, GroundedAnswer
from medloupe.service.uploads import problem_text, sniff_upload
from medloupe.tools.base import Tool, ToolContext, ToolResult
from medloupe.version import __version__

log = logging.getLogger(__name__)

DIAGNOSE = "diagnose"
IMAGE_FIELDS = ("image_path", "image_base64", "image_artifact")
IMAGE_PROPERTIES: dict[str, Any] = {
    "image_path": {
        "type": "string",
        "description": "path of a PNG/JPEG/TIFF/DICOM/NIfTI file under the server's allowed roots",
    },
    "image_base64": {
        "type": "string",
        "description": "the image file's bytes, base64 (PNG, JPEG, TIFF, DICOM or NIfTI)",
    },
    "image_artifact": {
        "type": "string",
        "description": "an artifact id an earlier call returned (e.g. a crop), as the image",
    },
}
_IMAGE_NOTE = " The image: exactly one of image_path, image_base64 or image_artifact."
_MAX_IMAGES = 64


class DiagnoseResult(BaseModel):
    """What ``diagnose`` returns as structured content."""

    run_id: str
    review_uri: str = Field(description="the run's review page (resources/read)")
    answer: GroundedAnswer


class McpBridge:
    """The tools, images and runs of one ``medloupe mcp serve`` process.

    Args:
        settings: process settings (home, pixel and upload limits, tool timeout).
        resources: the registry, backend and KB every call uses (loaded once).
        roots: folders ``image_path`` may name files under (resolved).
    """

    def __init__(self, settings: Settings, resources: Resources, roots: list[Path]) -> None:
        self.settings = settings
        self.resources = resources
        self.roots = [r.expanduser().resolve() for r in roots]
        self.scratch = settings.home / "mcp" / f"session-{uuid.uuid4().hex[:12]}"
        self.store = ArtifactStore(self.scratch, durable=False)
        self._images: collections.OrderedDict[str, ImageRecord] = collections.OrderedDict()
        self._runs: dict[str, Path] = {}

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    # --- the catalogue --------------------------------------------------------------
    def tools(self) -> list[types.Tool]:
        """``diagnose`` and every registry tool that is available here."""
        out = [self._diagnose_tool()]
        for t in self.resources.registry:
            if t.available().ok:
                out.append(self._mcp_tool(t))
        return out

    def _mcp_tool(self, t: Tool) -> types.Tool:
        schema = _object_schema(t.input_model.model_json_schema())
        schema["properties"] = {**IMAGE_PROPERTIES, **(schema.get("properties") or {})}
        return types.Tool(
            name=t.name,
            description=t.description + _IMAGE_NOTE,
            input_schema=schema,
            output_schema=_object_schema(t.output_model.model_json_schema()),
        )

    def _diagnose_tool(self) -> types.Tool:
        options = RunOptions.model_json_schema()
        options.get("properties", {}).pop("review_plan", None)
        return types.Tool(
            name=DIAGNOSE,
            description=(
                "Answer a diagnostic question about a medical image with medloupe's whole "
                "workflow (first look, instruments, a second look at the regions found, the "
                "knowledge base): a grounded answer whose claims cite regions and pages, with "
                "a confidence, or an abstention; the run's review page is a resource."
                + _IMAGE_NOTE
            ),
            input_schema={
                "type": "object",
                "properties": {
                    **IMAGE_PROPERTIES,
                    "question": {"type": "string", "minLength": 1},
                    "options": options,
                },
                "required": ["question"],
            },
            output_schema=DiagnoseResult.model_json_schema(),
        )

    # --- calls ----------------------------------------------------------------------
    async def call(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """One ``tools/call``. Raises :class:`MCPError` only for an unknown tool."""
        if name != DIAGNOSE and name not in self.resources.registry:
            raise MCPError(
                types.INVALID_PARAMS,
                f"unknown tool {name!r}; tools/list names those this server has",
            )
        args = dict(arguments or {})
        image = {k: args.pop(k) for k in IMAGE_FIELDS if k in args}
        try:
            if name == DIAGNOSE:
                return await self._diagnose(image, args)
            record = await asyncio.to_thread(self._image, image, RunOptions())
            ev = await self.resources.registry.call(
                name,
                args,
                ToolContext(image=record, store=self.store),
                default_timeout_s=self.settings.tool_timeout_s,
            )
        except MedloupeError as exc:
            return _tool_error(str(exc))
        return await asyncio.to_thread(self._tool_result, self.resources.registry.get(name), ev)

    def _tool_result(self, t: Tool, ev: Evidence) -> types.CallToolResult:
        if ev.status != "ok":
            return _tool_error(ev.error or ev.summary)
        structured: dict[str, Any] = dict(ev.output or {})
        if issubclass(t.output_model, ToolResult):
            structured["regions"] = [r.model_dump(mode="json") for r in ev.regions]
            structured["artifacts"] = list(ev.artifacts)
        content: list[types.ContentBlock] = [types.TextContent(text=ev.summary)]
        for artifact_id in ev.artifacts:
            content.extend(self._artifact_content(artifact_id))
        return types.CallToolResult(content=content, structured_content=structured)

    def _artifact_content(self, artifact_id: str) -> list[types.ContentBlock]:
        if not artifact_id.endswith(".png") or not self.store.exists(artifact_id):
            return [types.TextContent(text=f"artifact {artifact_id}")]
        data = self.store.path(artifact_id).read_bytes()
        return [
            types.TextContent(text=f"artifact {artifact_id} (image_artifact for later calls)"),
            types.ImageContent(data=base64.b64encode(data).decode("ascii"), mime_type="image/png"),
        ]

    async def _diagnose(
        self, image: dict[str, Any], args: dict[str, Any]
    ) -> types.CallToolResult:
        question = str(args.get("question") or "").strip()
        if not question:
            raise InputError("diagnose needs a question")
        raw_options = args.get("options") or {}
        if not isinstance(raw_options, dict):
            raise InputError("options must be an object of run options")
        if raw_options.get("review_plan"):
            raise InputError("review_plan pauses for a reviewer: use medloupe serve for that")
        opts = RunOptions.of(raw_options)
        run = await asyncio.to_thread(self._new_run, image, question, opts)
        answer = await execute(run, settings=self.settings, resources=self.resources)
        self._runs[run.spec.run_id] = run.dir
        result = DiagnoseResult(
            run_id=run.spec.run_id, review_uri=_review_uri(run.spec.run_id), answer=answer
        )
        return await asyncio.to_thread(self._diagnose_result, result, run.dir)

    def _diagnose_result(self, result: DiagnoseResult, run_dir: Path) -> types.CallToolResult:
        a = result.answer
        text = (
            f"abstained: {a.abstention_reason}"
            if a.abstained
            else f"{a.short_answer} (confidence {a.confidence:.2f}). {a.explanation}".strip()
        )
        content: list[types.ContentBlock] = [types.TextContent(text=text)]
        overlay = run_dir / "overlay.png"
        if overlay.is_file():
            content.append(
                types.ImageContent(
                    data=base64.b64encode(overlay.read_bytes()).decode("ascii"),
                    mime_type="image/png",
                )
            )
        content.append(
            types.ResourceLink(
                uri=result.review_uri,
                name=f"review page of {result.run_id}",
                mime_type="text/html",
            )
        )
        return types.CallToolResult(
            content=content, structured_content=result.model_dump(mode="json")
        )

    def _new_run(self, image: dict[str, Any], question: str, opts: RunOptions) -> Any:
        with self._image_file(image) as (path, shown):
            try:
                loaded = read_input(path, opts, self.settings.max_pixels)
            except InputError as exc:
                raise InputError(problem_text(exc, shown)) from None
        return create_run(
            loaded, question, settings=self.settings, options=opts, resources=self.resources.spec
        )

    # --- images ---------------------------------------------------------------------
    def _image(self, image: dict[str, Any], opts: RunOptions) -> ImageRecord:
        """The call's image read and stored in the scratch store (cached by content)."""
        with self._image_file(image) as (path, shown):
            key = hashlib.sha256(path.read_bytes()).hexdigest()
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
            try:
                loaded = read_input(path, opts, self.settings.max_pixels)
            except InputError as exc:
                raise InputError(problem_text(exc, shown)) from None
        record = ingest_image(loaded, self.store)
        self._images[key] = record
        while len(self._images) > _MAX_IMAGES:
            self._images.popitem(last=False)
        return record

    def _image_file(self, image: dict[str, Any]) -> _ImageFile:
        given = [k for k in IMAGE_FIELDS if image.get(k) not in (None, "")]
        if len(given) != 1:
            raise InputError(
                "give the image as exactly one of image_path, image_base64 or image_artifact"
                + (f" (got {', '.join(given)})" if given else "")
            )
        kind, value = given[0], image[given[0]]
        if not isinstance(value, str):
            raise InputError(f"{kind} must be a string")
        if kind == "image_artifact":
            try:
                return _ImageFile(self.store.path(value), None)
            except KeyError:
                raise InputError(
                    f"no artifact {value!r} on this server (artifacts live while it runs)"
                ) from None
        if kind == "image_path":
            return _ImageFile(self._allowed(value), None)
        return _ImageFile.from_base64(value, self.scratch / "uploads", self.settings)

    def _allowed(self, value: str) -> Path:
        path = Path(value).expanduser()
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise InputError(
                f"{value} is outside the folders this server reads ("
                + ", ".join(str(r) for r in self.roots)
                + f"): add its folder with --root or {env_name('mcp_roots')}, or send "
                "image_base64"
            )
        if not resolved.is_file():
            raise InputError(f"no file {value}")
        return resolved


class _ImageFile:
    """A context manager giving ``(path, shown)``: a temporary file for base64 bytes is
    removed at exit; ``shown`` is the path to hide in messages."""

    def __init__(self, path: Path, tmp: Path | None) -> None:
        self.path = path
        self.tmp = tmp

    @classmethod
    def from_base64(cls, value: str, uploads: Path, settings: Settings) -> _ImageFile:
        limit = settings.max_upload_bytes
        if len(value) > limit * 4 // 3 + 4:
            raise InputError(
                f"image_base64 is over the {settings.max_upload_mb:g} MB limit "
                f"({env_name('max_upload_mb')})"
            )
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image_base64 is not valid base64") from None
        if not data:
            raise InputError("image_base64 is empty")
        suffix = sniff_upload(data[:512])
        uploads.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=uploads))
        path = tmp / f"image{suffix}"
        path.write_bytes(data)
        return cls(path, tmp)

    def __enter__(self) -> tuple[Path, Path | None]:
        return self.path, self.tmp

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    schema.setdefault("type", "object")
    return schema


def _review_uri(run_id: str) -> str:
    return f"medloupe://runs/{run_id}/review"


def build_server(bridge: McpBridge) -> Server[Any]:
    """The low-level MCP server answering from ``bridge``."""
    from medloupe.review.page import export_review_html

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=await asyncio.to_thread(bridge.tools))

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await bridge.call(params.name, dict(params.arguments or {}))

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri=_review_uri(run_id), name=f"review page of {run_id}", mime_type="text/html"
                )
                for run_id in bridge._runs
            ]
        )

    async def read_resource(
        ctx: Any, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        run_id = uri.removeprefix("medloupe://runs/").removesuffix("/review")
        run_dir = bridge._runs.get(run_id)
        if run_dir is None or uri != _review_uri(run_id):
            raise MCPError(types.INVALID_PARAMS, f"no resource {uri!r} on this server")

        def page() -> str:
            with tempfile.TemporaryDirectory(dir=bridge.scratch.parent) as tmp:
                target = Path(tmp) / "review.html"
                return export_review_html(run_dir, target, bridge.settings).read_text()

        html = await asyncio.to_thread(page)
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, mime_type="text/html", text=html)]
        )

    return Server(
        "medloupe",
        version=__version__,
        instructions=(
            "medloupe's instruments for medical images (segmenters, grounder, crop/zoom, "
            "windowing, measurement, OCR, knowledge search) and `diagnose`, the whole "
            "grounded-answer workflow. A research tool, not a medical device."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )


def serve_mcp(
    transport: Literal["stdio", "http"] = "stdio",
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    roots: list[Path] | None = None,
    vlm: str | None = None,
    kb: str | None = None,
    settings: Settings | None = None,
) -> None:
    """Serve medloupe over MCP until the client leaves (stdio) or interrupted (HTTP)."""
    from medloupe.graphs.context import resolve_resources, shared_resources
    from medloupe.service import check_binding

    settings = settings or Settings.from_env()
    if transport == "http":
        check_binding(host, settings.api_token)
    resources = shared_resources(resolve_resources(vlm, kb, settings))
    bridge = McpBridge(settings, resources, roots or list(settings.mcp_roots) or [Path.cwd()])
    server = build_server(bridge)
    try:
        if transport == "stdio":
            asyncio.run(_serve_stdio(server))
        else:
            _serve_http(server, host, port, settings)
    finally:
        bridge.close()


async def _serve_stdio(server: Server[Any]) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def _serve_http(server: Server[Any], host: str, port: int, settings: Settings) -> None:
    import uvicorn

    from medloupe.service.middleware import TokenAuth

    app = server.streamable_http_app(
        host=host, max_request_body_size=settings.max_upload_bytes * 4 // 3 + 65536
    )
    log.info("medloupe mcp serve on http://%s:%d/mcp", host, port)
    uvicorn.run(
        TokenAuth(app, token=settings.api_token),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
