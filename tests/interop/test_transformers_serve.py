"""medloupe against `transformers serve` (Hugging Face's OpenAI-compatible server, CPU): it
ignores `response_format` and, without a preloaded model, lists none in /v1/models. medloupe
notices the first and spells the schema out in the prompt (visible in the server's own prompt
token counts); the second is a warning, not a refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medloupe.agents import prompts
from medloupe.agents.structured import schema_instruction
from medloupe.schemas import Draft
from medloupe.tools.builtin import MODALITY_NAMES
from tests.interop.servers import free_port, running

pytestmark = pytest.mark.interop


def serve(args: list[str], log: Path):
    port = free_port()
    exe = str(Path(sys.executable).parent / "transformers")
    cmd = [exe, "serve", *args, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    return running(cmd, ready=f"http://127.0.0.1:{port}/health", log=log,
                   env={"HF_HUB_OFFLINE": "1"}), f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("preloaded", [True, False], ids=["preloaded", "on-demand"])
def test_schema_reaches_a_server_that_ignores_response_format(
    preloaded: bool, tiny_vlm: Path, chest_dcm: Path, tmp_path: Path
) -> None:
    ctx, url = serve([str(tiny_vlm)] if preloaded else [], tmp_path / "serve.log")
    with ctx as server:
        done = subprocess.run(
            [sys.executable, "-m", "medloupe", "ask", str(chest_dcm), "Is there a nodule?",
             "--vlm", f"openai:{url}#{tiny_vlm}"],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "MEDLOUPE_HOME": str(tmp_path / "home")},
        )
        log = server.output()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "response_format" in log  # the server says it ignores it ...
    assert "ignores response_format" in done.stderr  # ... and medloupe noticed
    if not preloaded:
        assert "lists no models" in done.stderr
    (run,) = (tmp_path / "home" / "runs").glob("run-*")
    trace = json.loads((run / "trace.json").read_text())
    think = next(e for e in trace["events"] if e["kind"] == "model_call" and e["node"] == "think")
    image = trace["meta"]["image"]
    text = prompts.render(
        "think",
        question="Is there a nodule?",
        width=image["width"],
        height=image["height"],
        modality_name=MODALITY_NAMES.get(image["modality"], image["modality"]),
        body_part=f" of the {image['body_part'].lower()}" if image.get("body_part") else "",
    )
    # the byte-level tiny tokenizer counts every prompt byte: the first look was asked twice
    # (under response_format, then with the schema spelled out, ~1 KB), so the server's
    # prompt tokens hold both prompts and the schema (an image is at most 64 tokens here)
    assert think["payload"]["prompt_tokens"] >= 2 * len(text) + len(schema_instruction(Draft))
