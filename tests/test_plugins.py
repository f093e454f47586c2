from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env

pytestmark = pytest.mark.slow  # real subprocesses of the CLI



def test_installed_plugin_tool_is_listed_by_the_cli(plugin_site: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", plugin_site)
    out = subprocess.run(
        [sys.executable, "-m", "medloupe", "tools", "list"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "slow_probe" in out and "medloupe-testplugin" in out
    described = subprocess.run(
        [sys.executable, "-m", "medloupe", "tools", "describe", "slow_probe"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"seconds"' in described and '"mean_intensity"' in described


def test_plugin_tool_used_in_a_run(plugin_site: Path, chest_dcm: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", plugin_site)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medloupe",
            "ask",
            str(chest_dcm),
            "What is the mean intensity?",
            "--vlm",
            "scripted:0",
            "--out",
            str(tmp_path / "run"),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    answer = json.loads(proc.stdout)
    assert answer["short_answer"] == "scripted answer"
    assert answer["claims"][0]["evidence_ids"][0].startswith("ev-slow_probe-")
    assert "slow_probe" in answer["provenance"]["tools"]
    assert answer["provenance"]["vlm"] == "scripted:0"


def test_plugin_visible_in_process(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(plugin_site))
    importlib.invalidate_caches()
    from medloupe.tools import default_registry

    reg = default_registry()
    assert "slow_probe" in reg and reg.origin("slow_probe").endswith("medloupe-testplugin")
    from medloupe.errors import DuplicateToolError
    from medloupe.tools.registry import ToolRegistry

    clash = ToolRegistry(list(reg))
    with pytest.raises(DuplicateToolError):
        clash.load_entry_points()
