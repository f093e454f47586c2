"""A scripted FAKE VLM for unit tests of the orchestration logic only.

It does not look at images. It replies to each agent role with a scripted object (or raw
text), so tests can drive routing, loop bounds, plan repair and answer validation
deterministically; its replies go through the real structured-output path of
:meth:`~medloupe.agents.protocol.VLMBackend.generate` (parse, validate, repair).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from medloupe.agents.messages import ChatMessage, Completion, TextPart, Usage
from medloupe.agents.protocol import ModelProfile, VLMBackend
from medloupe.agents.roles import AnswerDraft
from medloupe.agents.structured import spelled_schema
from medloupe.artifacts import ArtifactStore
from medloupe.schemas import Draft, Plan, RethinkDecision

#: the role whose reply a schema asks for, by the schema's title
ROLE_OF = {
    Draft.__name__: "think",
    Plan.__name__: "plan",
    RethinkDecision.__name__: "rethink",
    AnswerDraft.__name__: "answer",
}
Script = Callable[[list[ChatMessage], int], BaseModel | str]


def evidence_ids_in(messages: list[ChatMessage]) -> list[str]:
    """The evidence ids a prompt lists (``- ev-... [`` lines)."""
    text = " ".join(p.text for m in messages for p in m.content if isinstance(p, TextPart))
    return re.findall(r"^- (ev-[\w-]+) \[", text, flags=re.M)


def default_answer(messages: list[ChatMessage], n: int) -> AnswerDraft:
    ids = evidence_ids_in(messages)
    info = [i for i in ids if i.startswith("ev-image_info")]
    return AnswerDraft(
        short_answer="scripted answer",
        confidence=0.7,
        claims=[{"text": "scripted claim", "evidence_ids": info[:1] or ids[:1]}],  # type: ignore[list-item]
    )


class ScriptedFakeVLM(VLMBackend):
    """FAKE backend: replies come from per-role scripts ``(messages, n) -> reply`` (``n``:
    the role's earlier calls); every call is logged in ``calls`` as ``(role, messages)``.

    Args:
        profile: what it declares (default: writes plans, schema-constrained).
        scripts: ``think``, ``plan``, ``rethink``, ``answer`` replacing the defaults.
    """

    def __init__(self, *, profile: ModelProfile | None = None, **scripts: Script) -> None:
        self.scripts: dict[str, Script] = {
            "think": lambda m, n: Draft(answer="draft", confidence=0.3),
            "plan": lambda m, n: Plan(calls=[{"tool": "image_info", "arguments": {}}]),  # type: ignore[list-item]
            "rethink": lambda m, n: RethinkDecision(answer="draft", confidence=0.5),
            "answer": default_answer,
            **scripts,
        }
        self._profile = profile or ModelProfile(supports_schema=True)
        self.calls: list[tuple[str, list[ChatMessage]]] = []

    @property
    def profile(self) -> ModelProfile:
        return self._profile

    @property
    def spec(self) -> str:
        return "fake:scripted"

    async def complete(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Completion:
        schema = json_schema if json_schema is not None else spelled_schema(messages)
        if schema is None:
            raise AssertionError("the graph asks every role for a schema")
        role = ROLE_OF[str(schema.get("title"))]
        n = sum(1 for r, _ in self.calls if r == role)
        self.calls.append((role, messages))
        reply = self.scripts[role](messages, n)
        text = reply if isinstance(reply, str) else reply.model_dump_json()
        return Completion(
            text=text,
            usage=Usage(prompt_tokens=10, completion_tokens=5),
            model="fake",
            constrained=json_schema is not None,
        )
