"""Run directories whose files were damaged: named errors, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from medloupe import ask
from medloupe.config import Settings
from medloupe.errors import InputError, RunStateError
from medloupe.runner import find_run
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
