"""Run directories whose files were damaged: named errors, never a traceback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from medloupe import ask
from medloupe.config import Settings
from medloupe.errors import InputError, RunStateError
from medloupe.io import load_image
from medloupe.runner import create_run, execute, find_run
from medloupe.trace import TraceRecorder


def test_damaged_run_files_are_named(settings: Settings, chest_dcm: Path, tmp_path: Path) -> None:
    ask(chest_dcm, "What body part is imaged?", out=tmp_path / "run", vlm="none", settings=settings)
    run = find_run(str(tmp_path / "run"), settings)
    (tmp_path / "run" / "trace.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "run" / f"trace.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(RunStateError, match="not a readable trace"):
        TraceRecorder(run.trace_path)
    (tmp_path / "run" / "run.json").write_text('{"run_id": "x", "question": ')
    with pytest.raises(RunStateError, match=r"run\.json"):
        find_run(str(tmp_path / "run"), settings)
    assert issubclass(RunStateError, InputError)  # the CLI exits 2 with the message


def test_resume_of_a_thread_that_ended_without_an_answer_starts_over(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    """A checkpoint with nothing left to run but no answer (what a kill can leave) is not a
    finished run: resume clears the thread and runs it again to an answer."""
    import asyncio

    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from medloupe.graphs.diagnose import builder
    from medloupe.io import load_image
    from medloupe.runner import create_run, execute

    run = create_run(
        load_image(chest_dcm),
        "What body part is imaged?",
        settings=settings,
        out_dir=tmp_path / "run",
    )

    async def leave_a_dead_end() -> None:
        async with AsyncSqliteSaver.from_conn_string(str(run.checkpoint_path)) as saver:
            app = builder.compile(checkpointer=saver)
            config = {"configurable": {"thread_id": run.run_id}}
            await app.aupdate_state(config, run.spec.graph_input(), as_node="answer")
            snapshot = await app.aget_state(config)
            assert not snapshot.next and "answer" not in snapshot.values

    asyncio.run(leave_a_dead_end())
    answer = asyncio.run(execute(run, settings=settings, resume=True))
    assert answer.claims and (tmp_path / "run" / "answer.json").is_file()


def test_resume_of_a_run_that_ended_but_was_not_marked_done_ends_it_once(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    """A worker killed after the run's end was traced but before the queue marked it done:
    the replica taking it over rewrites the outputs, and the trace still ends once."""
    run = create_run(
        load_image(chest_dcm), "What body part is imaged?", settings=settings,
        out_dir=tmp_path / "run",
    )  # fmt: skip
    first = asyncio.run(execute(run, settings=settings))
    (tmp_path / "run" / "answer.json").unlink()
    again = asyncio.run(execute(run, settings=settings, resume=True))
    assert again.short_answer == first.short_answer
    assert (tmp_path / "run" / "answer.json").is_file()
    with TraceRecorder(run.trace_path) as trace:
        kinds = [e.kind for e in trace.events()]
    assert kinds.count("run_end") == 1 and kinds.count("resume") == 1
