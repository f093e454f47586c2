"""Structured output shared by the backends: schema-constrained requests, prompt-and-parse,
and a bounded repair round.

A backend implements one primitive, ``complete`` (see :class:`Completer`): messages in,
:class:`Completion` out, optionally constrained by a JSON schema. :func:`generate_structured`
builds :meth:`VLMBackend.generate` on it:

1. ask with the schema as a constraint (when the backend supports it), else with the schema
   spelled out in the prompt;
2. parse the reply (code fences and text around the JSON object are tolerated) and validate it;
3. if that fails, send the reply back with the validation message and ask again, at most
   ``max_repairs`` times; then raise :class:`~medloupe.errors.ModelReplyError`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from medloupe.agents.protocol import ChatMessage, Generation, TextPart, Usage
from medloupe.artifacts import ArtifactStore
from medloupe.errors import ModelReplyError, SchemaUnsupportedError

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "error"]


@dataclass
class Completion:
    """One raw reply of a backend."""

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: FinishReason = "stop"
    model: str = ""
    constrained: bool = False  # the schema was enforced while decoding


class Completer(Protocol):
    """The primitive a backend implements; ``json_schema`` is a JSON-schema dict or None."""

    @property
    def spec(self) -> str: ...

    @property
    def supports_schema(self) -> bool: ...

    async def complete(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Completion: ...


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


def _with_instruction(messages: list[ChatMessage], instruction: str) -> list[ChatMessage]:
    """Append ``instruction`` to the last user message (a copy)."""
    out = [m.model_copy(deep=True) for m in messages]
    for m in reversed(out):
        if m.role == "user":
            m.content.append(TextPart(text=instruction))
            return out
    return [*out, ChatMessage.text("user", instruction)]


async def generate_structured(
    backend: Completer,
    messages: list[ChatMessage],
    *,
    store: ArtifactStore,
    schema: type[BaseModel] | None,
    max_tokens: int,
    temperature: float,
    max_repairs: int = 1,
) -> Generation:
    """:meth:`VLMBackend.generate` on top of ``backend.complete`` (see the module docstring).

    Usage and latency add up over the repair rounds.

    Raises:
        ModelReplyError: no valid reply after ``max_repairs`` repair rounds.
        BackendError: the backend itself failed (transport, timeout).
    """
    t0 = time.perf_counter()
    usage = Usage()
    json_schema = schema.model_json_schema() if schema is not None else None
    constrained = bool(schema is not None and backend.supports_schema)
    convo = messages
    if schema is not None and not constrained:
        convo = _with_instruction(messages, schema_instruction(schema))
    problem = ""
    for attempt in range(max_repairs + 1):
        try:
            comp = await backend.complete(
                convo,
                store=store,
                json_schema=json_schema if constrained else None,
                max_tokens=max_tokens,
                temperature=temperature,
            )
        except SchemaUnsupportedError as exc:
            log.warning("%s", exc)
            assert schema is not None
            constrained = False
            convo = _with_instruction(messages, schema_instruction(schema))
            comp = await backend.complete(
                convo, store=store, max_tokens=max_tokens, temperature=temperature
            )
        usage = Usage(
            prompt_tokens=usage.prompt_tokens + comp.usage.prompt_tokens,
            completion_tokens=usage.completion_tokens + comp.usage.completion_tokens,
        )
        if schema is None:
            return Generation(
                text=comp.text,
                usage=usage,
                latency_ms=(time.perf_counter() - t0) * 1000.0,
                model=comp.model,
                attempts=attempt + 1,
            )
        try:
            parsed = parse_reply(comp.text, schema)
        except ValueError as exc:
            problem = str(exc)
            if comp.finish_reason == "length":
                problem = f"the reply was cut off at max_tokens={max_tokens} ({problem})"
            log.info("%s: reply rejected (attempt %d): %s", backend.spec, attempt + 1, problem)
            if constrained and not comp.constrained:
                constrained = False  # the server ignored the constraint: spell it out
                convo = _with_instruction(messages, schema_instruction(schema))
                continue
            convo = [
                *convo,
                ChatMessage.text("assistant", comp.text[:4000]),
                ChatMessage.text(
                    "user",
                    f"That reply is not valid: {problem}. Reply again with one JSON object "
                    f"only, matching the {schema.__name__} schema.",
                ),
            ]
            continue
        return Generation(
            text=comp.text,
            parsed=parsed,
            usage=usage,
            latency_ms=(time.perf_counter() - t0) * 1000.0,
            model=comp.model,
            attempts=attempt + 1,
        )
    raise ModelReplyError(
        f"{backend.spec}: no valid {schema.__name__ if schema else 'reply'} after "
        f"{max_repairs + 1} attempt(s): {problem}",
        usage=usage,
        latency_ms=(time.perf_counter() - t0) * 1000.0,
    )


class StructuredGeneration:
    """Mixin: :meth:`VLMBackend.generate` for a class that implements :class:`Completer`."""

    async def generate(
        self: Completer,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        schema: type[BaseModel] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Generation:
        return await generate_structured(
            self,
            messages,
            store=store,
            schema=schema,
            max_tokens=max_tokens,
            temperature=temperature,
        )
