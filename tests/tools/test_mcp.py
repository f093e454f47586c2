"""MCP servers' tools in medloupe's registry: ``MEDLOUPE_MCP_SERVERS`` parsed, a server
written with the SDK's ``MCPServer`` (tests/tools/mcp_lab_server.py) connected over stdio
and streamable HTTP, its tools listed, validated and called by a reviewed plan."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medloupe.config import Settings
from medloupe.errors import InputError
from medloupe.tools import default_registry
from medloupe.tools.mcp import parse_mcp_servers
from tests.interop.servers import free_port

LAB = Path(__file__).with_name("mcp_lab_server.py")


def lab_servers(**extra: object) -> str:
    return json.dumps([{"name": "lab", "command": [sys.executable, str(LAB)], **extra}])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[{", "is not JSON"),
        ('{"name": "x"}', "must be a JSON list"),
        ('[{"name": "lab"}]', "exactly one of 'command'"),
        ('[{"name": "lab", "command": ["a"], "url": "http://x/mcp"}]', "exactly one of"),
        ('[{"name": "Lab!", "command": ["a"]}]', "entry 0: name"),
        ('[{"name": "lab", "url": "ftp://x"}]', "entry 0: url"),
        ('[{"name": "lab", "command": ["a"], "colour": 1}]', "colour"),
        ('[{"name": "a", "command": ["x"]}, {"name": "a", "url": "http://h/mcp"}]', "two servers"),
        ("/no/such/servers.json", "cannot read /no/such/servers.json"),
    ],
)
def test_malformed_server_lists_are_named(text: str, problem: str) -> None:
    with pytest.raises(InputError, match="MEDLOUPE_MCP_SERVERS") as info:
        parse_mcp_servers(text)
    assert problem in str(info.value)


def test_a_config_file_form(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": [{"name": "pacs", "url": "http://127.0.0.1:1/mcp"}]}))
    (spec,) = parse_mcp_servers(str(path))
    assert spec.name == "pacs" and spec.url == "http://127.0.0.1:1/mcp"
    assert parse_mcp_servers("") == [] and parse_mcp_servers(None) == []


@pytest.mark.slow
def test_lab_tools_join_the_registry_and_a_reviewed_plan_calls_them(
    settings: Settings, chest_dcm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medloupe.api import ask_async
    from medloupe.trace import read_trace

    monkeypatch.setenv("MEDLOUPE_MCP_SERVERS", lab_servers(timeout_s=3))
    registry = default_registry()
    names = {"lab_brightness", "lab_inverted", "lab_broken", "lab_stuck"}
    assert names <= set(registry.names())
    assert registry.origin("lab_brightness").startswith("MCP server lab")
    described = registry.get("lab_brightness").describe()
    # the image is medloupe's to give: not a property the planner fills
    assert "image_path" not in described["input_schema"]["properties"]
    assert described["image_arguments"] == ["image_path"]
    assert not registry.problems

    plans: list[dict] = []

    def reviewer(payload: dict) -> dict:
        plans.append(payload)
        return {"action": "edit", "plan": {"calls": [
            {"tool": "lab_brightness", "arguments": {"threshold": 100}},
            {"tool": "lab_inverted", "arguments": {}},
            {"tool": "lab_broken", "arguments": {"reason": "no calibration"}},
            {"tool": "lab_stuck", "arguments": {}},
        ]}}

    started = time.monotonic()
    answer = asyncio.run(ask_async(
        chest_dcm, "Is this image bright?", out=tmp_path / "run", vlm="none",
        settings=settings, review=reviewer, registry=registry, review_plan=True,
    ))
    assert time.monotonic() - started < 60
    assert plans and answer.question == "Is this image bright?"
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    doc = read_trace(tmp_path / "run", run_id)
    ev = {e["tool"]: e for e in doc.evidence if e.get("tool", "").startswith("lab_")}
    assert ev["lab_brightness"]["status"] == "ok"
    out = ev["lab_brightness"]["output"]
    assert out["server"] == "lab" and 0 < out["structured"]["bright_fraction"] < 1
    assert out["structured"]["width"] > 0
    assert ev["lab_inverted"]["status"] == "ok" and ev["lab_inverted"]["artifacts"]
    assert (tmp_path / "run" / "artifacts" / ev["lab_inverted"]["artifacts"][0]).is_file()
    assert ev["lab_broken"]["status"] == "error"
    assert "lab tool broke: no calibration" in ev["lab_broken"]["error"]
    assert ev["lab_stuck"]["status"] == "error" and "timed out" in ev["lab_stuck"]["error"]
    assert ev["lab_stuck"]["duration_ms"] < 10_000

    # arguments the server's schema refuses never reach it
    bad = registry.validate
    with pytest.raises(InputError, match="threshold"):
        bad("lab_brightness", {"threshold": "high"})


@pytest.mark.slow
def test_tools_list_shows_origins_and_a_dead_server(tmp_path: Path) -> None:
    import os

    dead = {"name": "dead", "command": [sys.executable, "-c", "import sys; sys.exit(3)"]}
    servers = [*json.loads(lab_servers()), dead]
    env = {**os.environ, "MEDLOUPE_HOME": str(tmp_path), "MEDLOUPE_MCP_SERVERS": json.dumps(servers)}
    done = subprocess.run(
        [sys.executable, "-m", "medloupe", "tools", "list", "--json"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["lab_brightness"]["origin"].startswith("MCP server lab")
    assert rows["lab_brightness"]["available"]
    assert "MCP server dead" in done.stderr  # listed as a problem, the rest still listed
    env["MEDLOUPE_MCP_SERVERS"] = "[{"
    done = subprocess.run(
        [sys.executable, "-m", "medloupe", "tools", "list"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 2 and "MEDLOUPE_MCP_SERVERS is not JSON" in done.stderr


@pytest.mark.slow
def test_a_streamable_http_server(settings: Settings, chest_dcm: Path, tmp_path: Path) -> None:
    from medloupe.artifacts import ArtifactStore
    from medloupe.io.intake import ingest_image, read_input
    from medloupe.options import RunOptions
    from medloupe.tools.base import ToolContext
    from medloupe.tools.registry import ToolRegistry

    port = free_port()
    log = (tmp_path / "lab.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(LAB), "http", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "lab.log").read_text()
            time.sleep(0.2)
        registry = ToolRegistry()
        added = registry.load_mcp_servers(
            json.dumps([{"name": "labhttp", "url": f"http://127.0.0.1:{port}/mcp"}])
        )
        assert "labhttp_brightness" in added
        store = ArtifactStore(tmp_path / "scratch")
        image = ingest_image(read_input(chest_dcm, RunOptions(), settings.max_pixels), store)
        ev = asyncio.run(registry.call("labhttp_brightness", {}, ToolContext(image, store),
                                       default_timeout_s=30))
        assert ev.status == "ok", ev.error
        assert ev.output["structured"]["height"] == image.height
        # the server goes away: calls become error evidence, not a hang
        proc.terminate()
        proc.wait(timeout=30)
        ev = asyncio.run(registry.call("labhttp_brightness", {}, ToolContext(image, store),
                                       default_timeout_s=10))
        assert ev.status == "error"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
