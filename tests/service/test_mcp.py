"""``medloupe mcp serve`` driven by the official MCP SDK's client: in process (the low-level
server object), over stdio (a client starting the command) and over streamable HTTP."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from medloupe.config import Settings
from medloupe.graphs.context import ResourceSpec, load_resources
from medloupe.service.mcp import IMAGE_FIELDS, McpBridge, build_server
from tests.interop.servers import free_port

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402


@pytest.fixture
def bridge(settings: Settings, dicom_dir: Path) -> Iterator[McpBridge]:
    resources = load_resources(ResourceSpec(vlm=None))
    b = McpBridge(settings, resources, [dicom_dir])
    yield b
    b.close()


def texts(result: Any) -> str:
    return " ".join(c.text for c in result.content if c.type == "text")


async def four_calls(client: Any, image: Path) -> None:
    """List the tools, then crop, segment (classical) the crop, ground and diagnose."""
    names = {t.name for t in (await client.list_tools()).tools}
    assert {"diagnose", "crop", "segment", "ground"} <= names
    crop = await client.call_tool("crop", {"image_path": str(image), "box_xyxy": [0, 0, 256, 256]})
    assert not crop.is_error, texts(crop)
    seg = await client.call_tool(
        "segment",
        {"image_artifact": crop.structured_content["crop_artifact"],
         "boxes_xyxy": [[40, 40, 400, 400]], "model": "classical"},
    )
    assert not seg.is_error and seg.structured_content["masks"], texts(seg)
    ground = await client.call_tool("ground", {"image_path": str(image), "target": "heart"})
    assert not ground.is_error, texts(ground)
    diag = await client.call_tool(
        "diagnose", {"image_path": str(image), "question": "Is this a radiograph?"}
    )
    assert not diag.is_error, texts(diag)
    assert diag.structured_content["run_id"].startswith("run-")


def test_catalogue_calls_artifacts_and_errors_in_process(
    bridge: McpBridge, ct_dcm: Path, chest_dcm: Path
) -> None:
    async def session() -> None:
        async with Client(build_server(bridge)) as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
            assert {"diagnose", "crop", "segment", "ground", "image_info"} <= set(listed)
            crop_tool = listed["crop"]
            props = crop_tool.input_schema["properties"]
            assert set(IMAGE_FIELDS) <= set(props) and "box_xyxy" in props
            assert crop_tool.output_schema and "crop_artifact" in crop_tool.output_schema["properties"]
            assert listed["diagnose"].input_schema["required"] == ["question"]

            # crop of a DICOM named by path: structured output, the crop as image content
            crop = await client.call_tool(
                "crop", {"image_path": str(ct_dcm), "box_xyxy": [100, 100, 300, 300]}
            )
            assert not crop.is_error, texts(crop)
            art = crop.structured_content["crop_artifact"]
            assert art in crop.structured_content["artifacts"]
            images = [c for c in crop.content if c.type == "image"]
            assert images and images[0].mime_type == "image/png"
            assert base64.b64decode(images[0].data).startswith(b"\x89PNG")

            # the crop as the image of the next calls: classical segmentation, then ground
            seg = await client.call_tool(
                "segment",
                {"image_artifact": art, "boxes_xyxy": [[50, 50, 400, 400]], "model": "classical"},
            )
            assert not seg.is_error, texts(seg)
            assert seg.structured_content["model"] == "classical"
            assert seg.structured_content["masks"]
            ground = await client.call_tool(
                "ground", {"image_base64": base64.b64encode(chest_dcm.read_bytes()).decode(),
                           "target": "left lung"}
            )
            assert not ground.is_error, texts(ground)
            assert "regions" in ground.structured_content

            # diagnose without a VLM (the evidence-only path): an answer or an abstention
            diag = await client.call_tool(
                "diagnose", {"image_path": str(chest_dcm), "question": "Is this a radiograph?",
                             "options": {"max_steps": 1}}
            )
            assert not diag.is_error, texts(diag)
            answer = diag.structured_content["answer"]
            assert answer["abstained"] or answer["short_answer"]
            links = [c for c in diag.content if c.type == "resource_link"]
            assert links and links[0].uri == diag.structured_content["review_uri"]
            page = await client.read_resource(links[0].uri)
            assert "<html" in page.contents[0].text.lower()
            assert "Is this a radiograph?" in page.contents[0].text

            # errors: tool errors carry medloupe's message; an unknown tool is a protocol error
            outside = await client.call_tool(
                "crop", {"image_path": "/etc/hostname", "box_xyxy": [0, 0, 1, 1]}
            )
            assert outside.is_error and "outside the folders" in texts(outside)
            junk = await client.call_tool(
                "crop", {"image_base64": base64.b64encode(b"hello").decode(),
                         "box_xyxy": [0, 0, 1, 1]}
            )
            assert junk.is_error and "not an image medloupe reads" in texts(junk)
            bad = await client.call_tool("crop", {"image_path": str(ct_dcm), "box_xyxy": [5]})
            assert bad.is_error and "invalid arguments for tool 'crop'" in texts(bad)
            assert "errors.pydantic.dev" not in texts(bad)
            none = await client.call_tool("crop", {"box_xyxy": [0, 0, 1, 1]})
            assert none.is_error and "exactly one of image_path" in texts(none)
            gone = await client.call_tool(
                "image_info", {"image_artifact": "crop-0123456789abcdef.png"}
            )
            assert gone.is_error and "no artifact" in texts(gone)
            with pytest.raises(MCPError, match="unknown tool 'nope'"):
                await client.call_tool("nope", {})
            with pytest.raises(MCPError, match="no resource"):
                await client.read_resource("medloupe://runs/run-x/review")

    asyncio.run(session())


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "MEDLOUPE_HOME": str(home), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_stdio_transport_lists_and_calls(tmp_path: Path, ct_dcm: Path, dicom_dir: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "medloupe", "mcp", "serve", "--vlm", "none", "--root", str(dicom_dir)],
        env=_env(tmp_path / "home"),
    )

    async def session() -> None:
        async with Client(params) as client:
            await four_calls(client, ct_dcm)

    asyncio.run(session())
    # the scratch store of the session is gone with the server
    assert not list((tmp_path / "home" / "mcp").glob("session-*"))


@contextmanager
def _http_server(home: Path, port: int, *args: str, env: dict[str, str] | None = None
                 ) -> Iterator[subprocess.Popen[bytes]]:
    log = home.parent / f"mcp-{port}.log"
    home.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medloupe", "mcp", "serve", "--transport", "http",
             "--port", str(port), *args],
            env={**_env(home), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mcp serve exited {proc.returncode}: {log.read_text()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"mcp serve not listening: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_streamable_http_transport_with_a_token(tmp_path: Path, chest_dcm: Path) -> None:
    import httpx
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    token = "Xq3-vT9pL2mZ8rW5kY7b-mcp"
    port = free_port()
    with _http_server(tmp_path / "home", port, "--vlm", "none", "--root", str(chest_dcm.parent),
                      env={"MEDLOUPE_API_TOKEN": token}):
        url = f"http://127.0.0.1:{port}/mcp"
        refused = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert refused.status_code == 401

        async def session() -> None:
            http = httpx2.AsyncClient(  # the SDK's own timeouts: a long read for the stream
                headers={"Authorization": f"Bearer {token}"},
                timeout=httpx2.Timeout(30.0, read=300.0),
            )
            async with Client(streamable_http_client(url, http_client=http)) as client:
                await four_calls(client, chest_dcm)

        asyncio.run(session())


@pytest.mark.slow
def test_http_off_loopback_needs_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in _env(tmp_path / "home").items() if k != "MEDLOUPE_API_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "medloupe", "mcp", "serve", "--transport", "http",
         "--host", "0.0.0.0", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "MEDLOUPE_API_TOKEN" in done.stderr
