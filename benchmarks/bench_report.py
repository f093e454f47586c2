"""Writing one run's results to BENCHMARKS.md: a dated, machine-stamped table section that
replaces the same benchmark's earlier section on the same kind of machine (history is git's).

Imported by the scripts of this folder, which run as `python benchmarks/bench_NAME.py`.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "# Benchmarks\n\nThe current figures of each script under `benchmarks/`, one section per "
    "benchmark and kind of\nmachine (`[cpu]`: this project's 2-core machines; `[gpu]`: a lent "
    "GPU machine), each with\nthe date and machine it was measured on. A run replaces its own "
    "section; earlier figures are\nin git history.\n"
)


def machine(extra: str = "") -> str:
    """``arch, N CPU cores, Python x.y.z`` plus ``extra``."""
    text = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    return f"{text}, {extra}" if extra else text


def machine_kind(context: str) -> str:
    """``gpu`` when the context names a GPU, else ``cpu``."""
    return "gpu" if re.search(r"cuda|GPU|H100|H200|A100", context) else "cpu"


def append_section(
    title: str,
    rows: Sequence[tuple[str, str, str]],
    *,
    columns: tuple[str, str, str] = ("measure", "result", "notes"),
    note: str = "",
    context: str = "",
) -> str:
    """Print ``## title [kind] (UTC time; context)`` with a three-column table of ``rows``
    and an optional ``note`` paragraph, and put it in BENCHMARKS.md in place of that
    benchmark's earlier section on the same kind of machine (else at the end); returns the
    text written."""
    context = context or machine()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    heading = f"## {title} [{machine_kind(context)}]"
    lines = [f"{heading} ({stamp}; {context})\n", f"| {' | '.join(columns)} |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if note:
        lines.append(f"\n{note}")
    text = "\n".join(lines) + "\n"
    print(text)
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else HEADER
    sections = re.split(r"\n(?=## )", current)
    mine = [i for i, s in enumerate(sections) if i and s.startswith(heading + " (")]
    if mine:
        sections[mine[0]] = text
        sections = [s for i, s in enumerate(sections) if i not in mine[1:]]
    else:
        sections.append(text)
    path.write_text("\n".join(s.rstrip() + "\n" for s in sections))
    return text
