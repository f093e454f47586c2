"""Versioned prompt templates (``NAME.vN.md``), rendered with :func:`render`.

v2 (current): every role's prompt opens with a ``Question:`` line (what a short-answer model
served over the OpenAI API reads), and the plan prompt names the form of its tool catalogue
(full JSON schemas or compact signatures, by the role's prompt budget). v1 is kept for runs
that recorded it.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Any

PROMPT_VERSION = "v2"


@functools.lru_cache(maxsize=64)
def load(name: str, version: str = PROMPT_VERSION) -> str:
    """The text of prompt ``name`` at ``version`` (read once per process)."""
    return (files(__package__) / f"{name}.{version}.md").read_text(encoding="utf-8")


def render(name: str, version: str = PROMPT_VERSION, **values: Any) -> str:
    """Prompt ``name`` with ``values`` filled in (``str.format`` fields)."""
    return load(name, version).format(**values)
