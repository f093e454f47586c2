"""Agents: the VLM backend protocol, the thinker/planner/rethinker/answerer, and the
evidence composer used when no VLM is configured."""

from __future__ import annotations

from medloupe.agents.protocol import (
    ChatMessage,
    Generation,
    ImagePart,
    TextPart,
    Usage,
    VLMBackend,
    load_backend,
)

__all__ = [
    "ChatMessage",
    "Generation",
    "ImagePart",
    "TextPart",
    "Usage",
    "VLMBackend",
    "load_backend",
]
