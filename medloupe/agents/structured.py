"""Structured output helpers: the schema spelled out in a prompt, and replies parsed and
validated against a pydantic schema (code fences and prose around the JSON tolerated).

:meth:`medloupe.agents.protocol.VLMBackend.generate` builds on these.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from medloupe.agents.messages import ChatMessage, TextPart
from medloupe.errors import validation_text


def compact_schema(node: Any, *, root: bool = True) -> Any:
    """A JSON schema without what a model does not need to fill it: the ``title`` of every
    property and definition (the root's is kept: it names the reply) and ``default: null``;
    descriptions cut to 100 characters."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "title" and isinstance(value, str) and not root:
                continue
            if key == "default" and value is None:
                continue
            if key == "description" and isinstance(value, str):
                out[key] = value if len(value) <= 100 else value[:97] + "..."
                continue
            out[key] = compact_schema(value, root=False)
        return out
    if isinstance(node, list):
        return [compact_schema(v, root=False) for v in node]
    return node


def schema_instruction(schema: type[BaseModel]) -> str:
    """The text that asks for JSON matching ``schema`` (compactly spelled out): when decoding
    cannot enforce it, and in every repair round."""
    spelled = json.dumps(compact_schema(schema.model_json_schema()), separators=(",", ":"))
    return f"{SCHEMA_LEAD}\n{spelled}"


SCHEMA_LEAD = (
    "Reply with one JSON object only, no prose and no code fence, matching this JSON schema:"
)


def spelled_schema(messages: list[ChatMessage]) -> dict[str, Any] | None:
    """The schema :func:`schema_instruction` spelled out in the last user message, if any."""
    for m in reversed(messages):
        if m.role != "user":
            continue
        for part in reversed(m.content):
            if isinstance(part, TextPart) and SCHEMA_LEAD in part.text:
                try:
                    found = extract_json(part.text.rsplit(SCHEMA_LEAD, 1)[1])
                except ValueError:
                    return None
                return found if isinstance(found, dict) else None
        return None
    return None


def shaped_like(text: str, json_schema: dict[str, Any]) -> bool:
    """Whether ``text`` holds a JSON object with the schema's required top-level keys: what
    every complete reply decoded under the schema's constraint has. A complete reply without
    it came from a server that ignored the constraint."""
    try:
        obj = extract_json(text)
    except ValueError:
        return False
    required = json_schema.get("required") or []
    return isinstance(obj, dict) and all(k in obj for k in required)


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
        problems = validation_problems(exc)
        raise ValueError(f"the JSON does not match {schema.__name__}: {problems}") from None


def validation_problems(exc: ValueError) -> str:
    """A validation error as ``field: message`` pairs (no pydantic URLs or input dumps)."""
    return validation_text(exc)


def with_instruction(messages: list[ChatMessage], instruction: str) -> list[ChatMessage]:
    """Append ``instruction`` to the last user message (a copy)."""
    out = [m.model_copy(deep=True) for m in messages]
    for m in reversed(out):
        if m.role == "user":
            m.content.append(TextPart(text=instruction))
            return out
    return [*out, ChatMessage.text("user", instruction)]
