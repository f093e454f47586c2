"""The diagnose graph under LangGraph's own server (`langgraph dev`, in-memory runtime, with
its blocking-call guard on: no --allow-blocking), driven by the official langgraph_sdk: the
README's "LangGraph server" section run as written, schemas for Studio, a plan-review
interrupt resumed, and an input error that reaches the client with its message."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
from langgraph_sdk import get_client

from tests.interop.servers import REPO, free_port, running

pytestmark = pytest.mark.interop


def readme_section() -> tuple[str, str]:
    """(the shell command, the Python script) of the README's LangGraph server section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## LangGraph server", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```bash\n(.*?)```", section, re.S)
    script = re.search(r"```python\n(.*?)```", section, re.S)
    assert shell and script, "the README's LangGraph server section needs a bash and a python block"
    return shell.group(1).strip(), script.group(1)


@pytest.fixture(scope="module")
def langgraph_dev(tmp_path_factory: pytest.TempPathFactory):
    shell, _ = readme_section()
    port = free_port()
    words = shell.replace("2024", str(port)).split()
    assert words[:2] == [".venv/bin/langgraph", "dev"], shell
    home = tmp_path_factory.mktemp("lg-home")
    cmd = [str(Path(sys.executable).parent / "langgraph"), *words[1:], "--no-reload"]
    assert "--allow-blocking" not in cmd
    log = home / "langgraph.log"
    env = {"MEDLOUPE_HOME": str(home), "LANGGRAPH_NO_VERSION_CHECK": "1"}
    with running(cmd, ready=f"http://127.0.0.1:{port}/ok", log=log, env=env) as server:
        yield server, port, home


def test_the_readme_section_runs_as_written(langgraph_dev) -> None:
    server, port, home = langgraph_dev
    _, script = readme_section()
    done = subprocess.run(
        [sys.executable, "-c", script.replace("2024", str(port))],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:] + server.output()[-3000:]
    lines = done.stdout.splitlines()
    nodes = [ln.split()[1] for ln in lines if ln.startswith("updates ")]
    assert nodes == ["intake", "think", "plan", "act", "retrieve", "rethink", "answer"], lines
    assert lines[-1].strip() and not lines[-1].startswith("updates")  # the short answer
    assert "BlockingError" not in server.output()
    assert list((home / "threads").glob("*/trace.sqlite"))  # each thread's own trace


def test_schemas_review_interrupt_and_input_errors(langgraph_dev, chest_dcm: Path) -> None:
    server, port, _ = langgraph_dev

    async def drive() -> None:
        client = get_client(url=f"http://127.0.0.1:{port}")
        (assistant,) = await client.assistants.search(graph_id="diagnose")
        schemas = await client.assistants.get_schemas(assistant["assistant_id"])
        assert "question" in schemas["input_schema"]["properties"]
        assert "image_path" in schemas["input_schema"]["properties"]
        assert "answer" in schemas["output_schema"]["properties"]
        assert {"vlm", "kb"} == set(schemas["context_schema"]["properties"])

        thread = await client.threads.create()
        tid = thread["thread_id"]
        await client.runs.wait(
            tid, "diagnose",
            input={"question": "What body part is imaged?", "image_path": str(chest_dcm),
                   "options": {"review_plan": True}},
            context={"vlm": "none"},
        )
        state = await client.threads.get_state(tid)
        (task,) = [t for t in state["tasks"] if t.get("interrupts")]
        assert task["name"] == "review_plan"
        assert "image_info" in task["interrupts"][0]["value"]["tools"]
        await client.runs.wait(tid, "diagnose", command={"resume": {"action": "approve"}},
                               context={"vlm": "none"})
        state = await client.threads.get_state(tid)
        answer = state["values"]["answer"]
        assert answer["short_answer"] and "chest" in answer["short_answer"].lower()

        bad = await client.threads.create()
        errors = [
            part.data
            async for part in client.runs.stream(
                bad["thread_id"], "diagnose", input={"question": "q"}, stream_mode="updates"
            )
            if part.event == "error"
        ]
        assert errors and "image_path" in errors[0]["message"], errors  # medloupe's message

    asyncio.run(drive())
    assert "An internal error occurred" not in server.output()
