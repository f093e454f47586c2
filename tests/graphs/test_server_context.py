"""The compiled graph as LangGraph's server runs it: JSON input, a thread id, a context dict
(often ``{}``), schemas for Studio's forms, no blocking call on the event loop, and a fresh
question each time a thread gets new input. (The real ``langgraph dev`` is driven in
tests/interop/test_langgraph_server.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from medloupe.config import Settings
from medloupe.errors import InputError
from medloupe.graphs.diagnose import builder, graph
from medloupe.schemas import GroundedAnswer
from medloupe.trace import read_trace


def ask(question: str, image: Path, thread: str, context: Any = None, app: Any = graph) -> dict:
    return asyncio.run(
        app.ainvoke(
            {"question": question, "image_path": str(image)},
            {"configurable": {"thread_id": thread}},
            context=context,
        )
    )


@pytest.mark.parametrize("context", [None, {}], ids=["no-context", "empty-context"])
def test_the_graph_runs_with_no_or_an_empty_context(
    settings: Settings, chest_dcm: Path, monkeypatch: pytest.MonkeyPatch, context: Any
) -> None:
    """langgraph-api always passes ``context={}``: the nodes open the thread's default context
    from the settings (artifacts and trace under threads/THREAD_ID/)."""
    monkeypatch.delenv("MEDLOUPE_VLM", raising=False)
    monkeypatch.delenv("MEDLOUPE_KB", raising=False)
    out = ask("What body part is imaged?", chest_dcm, "studio-1", context)
    assert set(out) <= {"answer", "notes"}  # the output schema
    answer = GroundedAnswer.model_validate(out["answer"])
    assert answer.claims and not answer.abstained
    thread = settings.home / "threads" / "studio-1"
    assert list((thread / "artifacts").glob("*.png"))
    doc = read_trace(thread, "studio-1")
    started = [e.node for e in doc.events if e.kind == "node_start"]
    assert started[:3] == ["intake", "think", "plan"] and started[-1] == "answer"
    assert any(e.kind == "tool_call" for e in doc.events)


def test_a_partial_context_names_the_vlm_and_bad_ones_are_input_errors(
    settings: Settings, chest_dcm: Path
) -> None:
    out = ask("What body part is imaged?", chest_dcm, "t-none", {"vlm": "none"})
    answer = GroundedAnswer.model_validate(out["answer"])
    assert answer.provenance.vlm is None and answer.provenance.answer_source == "evidence-composer"
    with pytest.raises(InputError, match="context takes vlm, kb; not store"):
        ask("q", chest_dcm, "t-bad", {"store": "nope"})
    with pytest.raises(ValueError, match="image_path"):  # what the server shows its client
        asyncio.run(graph.ainvoke({"question": "q"}, {"configurable": {"thread_id": "t"}}))


def test_input_output_and_context_schemas_are_served() -> None:
    """What langgraph-api's /assistants/ID/schemas returns (null on Python 3.11 with
    ``typing.TypedDict``): Studio builds its forms from these."""
    inp = graph.get_input_jsonschema()
    assert inp["required"] == ["question"]
    assert {"question", "image_path", "image", "options"} <= set(inp["properties"])
    out = graph.get_output_jsonschema()
    assert {"answer", "notes"} == set(out["properties"])
    ctx = graph.get_context_jsonschema()
    assert ctx is not None and {"vlm", "kb"} == set(ctx["properties"])


def test_a_new_question_on_a_thread_starts_afresh(settings: Settings, chest_dcm: Path) -> None:
    """A second input on a checkpointed thread does not inherit the first question's
    evidence, rethink rounds or notes."""
    app = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "two-questions"}}
    ask("What body part is imaged?", chest_dcm, "two-questions", {"vlm": "none"}, app)
    first = app.get_state(config).values  # type: ignore[arg-type]
    ask("Is there a fracture?", chest_dcm, "two-questions", {"vlm": "none"}, app)
    second = app.get_state(config).values  # type: ignore[arg-type]
    assert second["question"] == "Is there a fracture?"
    assert len(second["rethinks"]) == len(first["rethinks"]) == 1
    first_ids = {e["id"] for e in first["evidence"]}
    assert {e["id"] for e in second["evidence"]} == first_ids  # same plan, not twice as many
    assert len(second["evidence"]) == len(first["evidence"])
    assert second["answer"]["question"] == "Is there a fracture?"
    assert second["image"] == first["image"]  # the same file is not read again


def test_no_blocking_call_on_the_event_loop(settings: Settings, chest_dcm: Path) -> None:
    """The blocking-call guard ``langgraph dev`` runs graphs under (blockbuster), stricter:
    file writes, renames, directory creation, SQLite and sleeps on the event loop all raise."""
    from blockbuster import BlockBuster

    bb = BlockBuster()
    allowed = ("os.path.", "os.stat", "os.listdir", "io.BufferedReader.read",
               "io.TextIOWrapper.read", "os.getcwd", "os.readlink", "os.scandir",
               "threading.Lock", "io.TextIOWrapper.write")
    for name in list(bb.functions):
        # reading files and stat calls happen in imports and lazy loaders, writes to stderr
        # in logging, lock waits in thread pools: langgraph dev allows them too
        if name.startswith(allowed):
            bb.functions.pop(name).deactivate()
    # warm the shared resources outside the guard (once per process, in a thread under it)
    ask("What body part is imaged?", chest_dcm, "warm", {"vlm": "none"})
    bb.activate()
    try:
        out = ask("Is there a fracture?", chest_dcm, "guarded", {"vlm": "none"})
    finally:
        bb.deactivate()
    assert GroundedAnswer.model_validate(out["answer"]).question == "Is there a fracture?"
