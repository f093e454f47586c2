"""Appending one run's results to BENCHMARKS.md: a dated, machine-stamped table section.

Imported by the scripts of this folder, which run as `python benchmarks/bench_NAME.py`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "# Benchmarks\n\nEach section is one run of a script under `benchmarks/`.\n"


def machine(extra: str = "") -> str:
    """``arch, N CPU cores, Python x.y.z`` plus ``extra``."""
    text = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    return f"{text}, {extra}" if extra else text


def append_section(
    title: str,
    rows: Sequence[tuple[str, str, str]],
    *,
    columns: tuple[str, str, str] = ("measure", "result", "notes"),
    note: str = "",
    context: str = "",
) -> str:
    """Print and append ``## title (UTC time; context)`` with a three-column table of ``rows``
    and an optional ``note`` paragraph to BENCHMARKS.md; returns the text written."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {title} ({stamp}; {context or machine()})\n",
        f"| {' | '.join(columns)} |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if note:
        lines.append(f"\n{note}")
    text = "\n".join(lines) + "\n"
    print(text)
    path = ROOT / "BENCHMARKS.md"
    if not path.exists():
        path.write_text(HEADER)
    with path.open("a") as fh:
        fh.write(text)
    return text
