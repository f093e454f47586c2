"""Versioned prompt templates (``NAME.vN.md``), rendered with :func:`render`."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

PROMPT_VERSION = "v1"


def load(name: str, version: str = PROMPT_VERSION) -> str:
    """The text of prompt ``name`` at ``version``."""
    return (files(__package__) / f"{name}.{version}.md").read_text(encoding="utf-8")


def render(name: str, version: str = PROMPT_VERSION, **values: Any) -> str:
    """Prompt ``name`` with ``values`` filled in (``str.format`` fields)."""
    return load(name, version).format(**values)
