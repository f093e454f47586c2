"""The one model contract: :class:`VLMBackend`, its declared :class:`ModelProfile`, and
backend selection by spec string.

A backend implements one abstract primitive, :meth:`VLMBackend.complete` (chat messages whose
image parts are artifact ids in, a raw :class:`~medloupe.agents.messages.Completion` out,
optionally constrained by a JSON schema). Everything above it is concrete here:

- :meth:`VLMBackend.generate` asks for JSON matching a pydantic schema (as a decoding
  constraint when the profile says the backend supports one, else spelled out in the
  prompt), parses and validates the reply, and sends an invalid reply back with the problem
  for a bounded number of repair rounds;
- :meth:`VLMBackend.play` answers one graph role (think, plan, rethink, answer) from its
  prompt; a task-specific model that plays a role differently (medloupe-mini) overrides it
  and reads the role's typed :class:`RoleRequest` instead of the prose.

What the graph may expect of a backend is declared in :attr:`VLMBackend.profile`; nothing is
probed.

Spec strings select a backend: ``SCHEME:REST``, e.g.
``openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-VL-7B-Instruct`` or ``hf:/path/to/model``.
Schemes are looked up among the ``medloupe.vlm_backends`` entry points (a factory taking the
``REST`` string and returning a :class:`VLMBackend`).
"""

from __future__ import annotations

import functools
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

from pydantic import BaseModel, Field

from medloupe.agents.messages import (
    ChatMessage,
    Completion,
    Generation,
    ImagePart,
    TextPart,
    Usage,
)
from medloupe.agents.structured import (
    parse_reply,
    schema_instruction,
    shaped_like,
    with_instruction,
)
from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings
from medloupe.errors import BackendSpecError, ModelReplyError, SchemaUnsupportedError

log = logging.getLogger(__name__)

BACKEND_ENTRY_POINT_GROUP = "medloupe.vlm_backends"
DEFAULT_VLM = "mini:"
DEFAULT_CROP_SIDE = 512  # crops' longer side for a backend that states no preference


@dataclass(frozen=True)
class ModelProfile:
    """What a backend can do, declared (the graph reads it; nothing is probed).

    Attributes:
        writes_plans: the model plans tool calls; ``False``: the graph's rule-based plan.
        defers_to_instruments: a short-answer model; where an instrument states the answer
            outright (header facts, counts, grounded boxes) the graph keeps that answer.
        preferred_image_side: longer side, pixels, of the crops it is shown (second look).
        supports_schema: replies can be constrained to a JSON schema while decoding.
        max_images: images it accepts in one request (``None``: no known limit).
        context_tokens: its context length in tokens (``None``: not known).
        max_repairs: repair rounds for a reply that does not validate.
    """

    writes_plans: bool = True
    defers_to_instruments: bool = False
    preferred_image_side: int = DEFAULT_CROP_SIDE
    supports_schema: bool = False
    max_images: int | None = None
    context_tokens: int | None = None
    max_repairs: int = 1


Role = Literal["think", "plan", "rethink", "answer"]

PROMPT_LEVELS = 3  # 0: everything; 1: shorter evidence, tool signatures; 2: the least


@dataclass
class PromptBudget:
    """How long each role's prompt may be for one backend, learnt from the server.

    A role renders its prompt at a compaction level (0: everything, up to
    ``PROMPT_LEVELS - 1``: the least that still asks the question). The budget keeps, per
    role, the server's own ``usage.prompt_tokens`` per prompt character of the last reply
    (images included) and the lowest level that fitted; a role starts at the first level
    whose estimated size, plus the reply's ``max_tokens``, fits
    ``ModelProfile.context_tokens``.
    """

    tokens_per_char: dict[str, float] = field(default_factory=dict)
    floor: dict[str, int] = field(default_factory=dict)

    def observe(self, role: str, prompt_chars: int, prompt_tokens: int) -> None:
        """Record one reply's prompt size (ignored when the server reports no usage)."""
        if prompt_chars > 0 and prompt_tokens > 0:
            self.tokens_per_char[role] = prompt_tokens / prompt_chars

    def overflowed(self, role: str, level: int) -> None:
        """The server refused ``role``'s prompt at ``level`` as too long for its context."""
        self.floor[role] = max(self.floor.get(role, 0), min(level + 1, PROMPT_LEVELS - 1))

    def start_level(
        self, role: str, sizes: list[int], context_tokens: int | None, max_tokens: int
    ) -> int:
        """The level to render ``role`` at, given the prompt's size in characters at each
        level (``sizes``)."""
        level = self.floor.get(role, 0)
        # a role not measured yet is estimated at the densest ratio measured so far
        ratio = self.tokens_per_char.get(role) or max(self.tokens_per_char.values(), default=None)
        if context_tokens is None or ratio is None:
            return level
        while level < len(sizes) - 1 and sizes[level] * ratio + max_tokens > context_tokens:
            level += 1
        return level


class RoleRequest(BaseModel):
    """A graph role's request as data: what its prompt states in prose.

    Attributes:
        images: artifact ids of the message's images, in order (think: the whole image;
            rethink: the overview with the regions drawn, then the zoomed crops).
        answer, confidence: the current answer and its confidence (rethink, answer).
        evidence_ids: every evidence id the answer may cite; observation_ids: the model's own
            looks among them.
        targets: what the question names that a tool can locate ("Liver"), in order (plan,
            rethink, answer).
        image: the whole image as the first look saw it (rethink).
    """

    role: Role
    question: str
    images: list[str] = Field(default_factory=list)
    answer: str | None = None
    confidence: float = 0.0
    evidence_ids: list[str] = Field(default_factory=list)
    observation_ids: list[str] = Field(default_factory=list)
    targets: list[str] = Field(default_factory=list)
    image: str | None = None


class VLMBackend(ABC):
    """A vision-language model behind medloupe's graph (see the module docstring)."""

    @property
    def profile(self) -> ModelProfile:
        """What this backend can do (a subclass sets a ``profile`` class attribute, or a
        property where it depends on the configuration)."""
        return ModelProfile()

    @property
    @abstractmethod
    def spec(self) -> str:
        """The spec string that selects this backend (recorded in traces and provenance)."""

    @abstractmethod
    async def complete(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Completion:
        """One raw reply; with ``json_schema`` (only when ``profile.supports_schema``), decoding
        is constrained to it and the completion says so (``constrained``).

        Raises:
            SchemaUnsupportedError: the model refused the constraint (then the schema is spelled
                out in the prompt from here on).
            medloupe.errors.BackendError: no reply (transport, timeout, refusal).
        """

    @functools.cached_property
    def prompt_budget(self) -> PromptBudget:
        """The prompt sizes this backend's server accepts, learnt as runs go
        (:class:`PromptBudget`)."""
        return PromptBudget()

    def distrust_schema(self) -> None:  # noqa: B027 - optional hook
        """A reply said to be constrained by a JSON schema was not shaped by it (the server
        ignored ``response_format``): a backend whose profile says ``supports_schema`` stops
        saying so (default: nothing to change)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Release connections held for the current event loop (default: nothing)."""

    def load(self) -> None:  # noqa: B027 - optional hook, nothing to load by default
        """Load weights now instead of on the first request (default: nothing to load)."""

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        schema: type[BaseModel] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Generation:
        """A reply; with ``schema``, :attr:`Generation.parsed` is a validated instance of it.

        Usage and latency add up over the repair rounds.

        Raises:
            ModelReplyError: no valid reply after ``profile.max_repairs`` repair rounds.
            medloupe.errors.BackendError: the backend itself failed (transport, timeout).
        """
        t0 = time.perf_counter()
        usage = Usage()
        json_schema = schema.model_json_schema() if schema is not None else None
        constrained = bool(schema is not None and self.profile.supports_schema)
        convo = messages
        if schema is not None and not constrained:
            convo = with_instruction(messages, schema_instruction(schema))
        problem = ""
        max_repairs = self.profile.max_repairs
        for attempt in range(max_repairs + 1):
            try:
                comp = await self.complete(
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
                convo = with_instruction(messages, schema_instruction(schema))
                comp = await self.complete(
                    convo, store=store, max_tokens=max_tokens, temperature=temperature
                )
            usage = usage + comp.usage
            if schema is None:
                return Generation(
                    text=comp.text,
                    usage=usage,
                    latency_ms=(time.perf_counter() - t0) * 1000.0,
                    model=comp.model,
                    attempts=attempt + 1,
                )
            if constrained and not _obeyed(comp, json_schema or {}):
                # the server ignored the constraint: spell the schema out from now on
                log.warning(
                    "%s: a reply requested under a JSON schema is not shaped by it (the server "
                    "ignores response_format); the schema is spelled out in the prompt instead",
                    self.spec,
                )
                if comp.constrained:
                    self.distrust_schema()
                problem = "the reply was not JSON shaped by the schema (response_format ignored)"
                constrained = False
                convo = with_instruction(messages, schema_instruction(schema))
                continue
            try:
                parsed = parse_reply(comp.text, schema)
            except ValueError as exc:
                problem = str(exc)
                if comp.finish_reason == "length":
                    problem = f"the reply was cut off at max_tokens={max_tokens} ({problem})"
                log.info("%s: reply rejected (attempt %d): %s", self.spec, attempt + 1, problem)
                convo = [
                    *convo,
                    ChatMessage.text("assistant", comp.text[:4000]),
                    ChatMessage.text(
                        "user",
                        f"That reply is not valid: {problem}. {schema_instruction(schema)}",
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
            f"{self.spec}: no valid {schema.__name__ if schema else 'reply'} after "
            f"{max_repairs + 1} attempt(s): {problem}",
            usage=usage,
            latency_ms=(time.perf_counter() - t0) * 1000.0,
            attempts=max_repairs + 1,
        )

    async def play(
        self,
        request: RoleRequest,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        schema: type[BaseModel],
    ) -> Generation:
        """One graph role's reply, an instance of ``schema`` in :attr:`Generation.parsed`.

        Default: :meth:`generate` from the role's prompt ``messages``. A model that plays
        roles differently overrides this and reads ``request``.
        """
        return await self.generate(messages, store=store, schema=schema)


def _obeyed(comp: Completion, json_schema: dict[str, Any]) -> bool:
    """Whether a reply requested under ``json_schema`` was decoded under it: it starts as a
    JSON object (cut off or not) and, when complete, has the schema's required keys."""
    if not comp.constrained or not comp.text.lstrip().startswith("{"):
        return False
    return comp.finish_reason == "length" or shaped_like(comp.text, json_schema)


def resolve_vlm(spec: str | None, settings: Settings | None = None) -> tuple[str | None, bool]:
    """The VLM spec a run uses and whether it is the default.

    ``spec`` (e.g. from ``--vlm``) wins; else ``settings.vlm``; ``"none"`` in either means no
    VLM (the evidence-only path). With neither, the default is :data:`DEFAULT_VLM`
    (medloupe-mini) when a backend of that scheme is installed, else no VLM.

    Returns:
        ``(spec or None, True when the default was chosen)``.
    """
    chosen = spec or (settings or Settings.from_env()).vlm
    if chosen is not None:
        return (None, False) if chosen.strip().lower() == "none" else (chosen, False)
    if DEFAULT_VLM.partition(":")[0] in backend_schemes():
        return DEFAULT_VLM, True
    return None, False


def backend_schemes() -> list[str]:
    """The installed backend schemes (``medloupe.vlm_backends`` entry points)."""
    return sorted({ep.name for ep in entry_points(group=BACKEND_ENTRY_POINT_GROUP)})


def load_backend(spec: str) -> VLMBackend:
    """Build the backend a spec string names.

    Raises:
        BackendSpecError: malformed spec or unknown scheme (the message lists known schemes).
    """
    scheme, sep, rest = spec.partition(":")
    found = {ep.name: ep for ep in entry_points(group=BACKEND_ENTRY_POINT_GROUP)}
    if not sep and scheme in found:  # a bare scheme ("mini") takes its default target
        sep = ":"
    if not sep or not scheme:
        raise BackendSpecError(
            f"VLM spec {spec!r} is not of the form SCHEME:TARGET "
            "(e.g. openai:http://127.0.0.1:8000/v1#MODEL, hf:/path/to/model or mini:)"
        )
    if scheme not in found:
        import difflib

        close = difflib.get_close_matches(scheme, list(found), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(found)) or "none installed"
        raise BackendSpecError(
            f"unknown VLM backend scheme {scheme!r}{hint} (installed backends: {known}); "
            f"backends register in the {BACKEND_ENTRY_POINT_GROUP!r} entry-point group"
        )
    factory = found[scheme].load()
    backend = factory(rest)
    if not isinstance(backend, VLMBackend):
        raise BackendSpecError(
            f"backend {scheme!r} built a {type(backend).__name__}, not a "
            "medloupe.agents.protocol.VLMBackend subclass"
        )
    return backend


__all__ = [
    "BACKEND_ENTRY_POINT_GROUP",
    "DEFAULT_VLM",
    "PROMPT_LEVELS",
    "ChatMessage",
    "Completion",
    "Generation",
    "ImagePart",
    "ModelProfile",
    "PromptBudget",
    "RoleRequest",
    "TextPart",
    "Usage",
    "VLMBackend",
    "backend_schemes",
    "load_backend",
    "resolve_vlm",
]
