"""The data a backend exchanges: chat messages whose image parts are artifact ids, a raw
:class:`Completion`, and the validated :class:`Generation` the graph records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImagePart(BaseModel):
    type: Literal["image"] = "image"
    artifact: str = Field(description="artifact id of a PNG in the run's store")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: list[TextPart | ImagePart]

    @classmethod
    def text(cls, role: Literal["system", "user", "assistant"], text: str) -> ChatMessage:
        return cls(role=role, content=[TextPart(text=text)])


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class Generation(BaseModel):
    """A backend's reply: raw text, the validated object when a schema was given, usage."""

    text: str
    parsed: Any | None = None
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float = 0.0
    model: str = ""
    attempts: int = Field(default=1, description="requests made (1 + repair rounds)")


FinishReason = Literal["stop", "length", "error"]


@dataclass
class Completion:
    """One raw reply of a backend (:meth:`~medloupe.agents.protocol.VLMBackend.complete`)."""

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: FinishReason = "stop"
    model: str = ""
    constrained: bool = False  # the schema was enforced while decoding
