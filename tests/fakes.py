"""A scripted FAKE VLM for unit tests of the orchestration logic only.

It does not look at images. It replies to each agent role with a scripted object, so tests
can drive routing, loop bounds, plan repair and answer validation deterministically.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from medloupe.agents.protocol import ChatMessage, Generation, TextPart, Usage
from medloupe.agents.roles import AnswerDraft
from medloupe.artifacts import ArtifactStore
from medloupe.schemas import Draft, Plan, RethinkDecision

ROLE_OF = {Draft: "think", Plan: "plan", RethinkDecision: "rethink", AnswerDraft: "answer"}
Script = Callable[[list[ChatMessage], int], BaseModel | str]


def evidence_ids_in(messages: list[ChatMessage]) -> list[str]:
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


class ScriptedFakeVLM:
    """FAKE backend: replies come from per-role scripts; every call is logged in ``calls``."""

    def __init__(self, **scripts: Script) -> None:
        self.scripts: dict[str, Script] = {
            "think": lambda m, n: Draft(answer="draft", confidence=0.3),
            "plan": lambda m, n: Plan(calls=[{"tool": "image_info", "arguments": {}}]),  # type: ignore[list-item]
            "rethink": lambda m, n: RethinkDecision(answer="draft", confidence=0.5),
            "answer": default_answer,
            **scripts,
        }
        self.calls: list[tuple[str, list[ChatMessage]]] = []

    @property
    def spec(self) -> str:
        return "fake:scripted"

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        schema: type[BaseModel] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Generation:
        assert schema is not None
        role = ROLE_OF[schema]
        n = sum(1 for r, _ in self.calls if r == role)
        self.calls.append((role, messages))
        reply: Any = self.scripts[role](messages, n)
        if isinstance(reply, str):
            return Generation(
                text=reply, usage=Usage(prompt_tokens=10, completion_tokens=5), model="fake"
            )
        return Generation(
            text=reply.model_dump_json(),
            parsed=reply,
            usage=Usage(prompt_tokens=10, completion_tokens=5),
            model="fake",
        )
