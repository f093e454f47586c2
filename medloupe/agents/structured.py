"""Structured output helpers: the schema spelled out in a prompt, and replies parsed and
validated against a pydantic schema (code fences and prose around the JSON tolerated).

:meth:`medloupe.agents.protocol.VLMBackend.generate` builds on these.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from medloupe.agents.messages import ChatMessage, TextPart


def schema_instruction(schema: type[BaseModel]) -> str:
    """The text that asks for JSON matching ``schema`` when decoding cannot enforce it."""
    return (
        "Reply with one JSON object only, no prose and no code fence, matching this JSON "
        f"schema:\n{json.dumps(schema.model_json_schema(), separators=(',', ':'))}"
    )


def extract_json(text: str) -> Any:
    """The first JSON object in ``text`` (code fences and surrounding prose ignored).

    Control characters inside strings are accepted (``strict=False``): models emit raw
    newlines in strings.

    Raises:
        ValueError: no complete JSON object in the text.
    """
    decoder = json.JSONDecoder(strict=False)
    start = text.find("{")
    last_error = "no '{' in the reply"
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            return obj
        except json.JSONDecodeError as exc:
            last_error = f"{exc.msg} at character {exc.pos}"
        start = text.find("{", start + 1)
    raise ValueError(f"no JSON object in the reply ({last_error})")


def parse_reply(text: str, schema: type[BaseModel]) -> BaseModel:
    """Parse and validate a reply against ``schema``.

    Raises:
        ValueError: not JSON, or not matching the schema (the message says which field).
    """
    obj = extract_json(text)
    try:
        return schema.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"the JSON does not match {schema.__name__}: {problems}") from None


def with_instruction(messages: list[ChatMessage], instruction: str) -> list[ChatMessage]:
    """Append ``instruction`` to the last user message (a copy)."""
    out = [m.model_copy(deep=True) for m in messages]
    for m in reversed(out):
        if m.role == "user":
            m.content.append(TextPart(text=instruction))
            return out
    return [*out, ChatMessage.text("user", instruction)]
