"""The VLM backend protocol and backend selection by spec string.

A backend generates from chat messages whose image parts are artifact ids; it resolves them
to pixels through the :class:`~medloupe.artifacts.ArtifactStore` it is given. With a
``schema`` it returns a validated object in :attr:`Generation.parsed`.

Spec strings select a backend: ``SCHEME:REST``, e.g.
``openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-VL-7B-Instruct`` or ``hf:/path/to/model``.
Schemes are looked up among the ``medloupe.vlm_backends`` entry points (a factory taking the
``REST`` string); backends ship with their own issues and plug in there.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from medloupe.artifacts import ArtifactStore
from medloupe.errors import BackendSpecError

BACKEND_ENTRY_POINT_GROUP = "medloupe.vlm_backends"


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImagePart(BaseModel):
    type: Literal["image"] = "image"
    artifact: str = Field(description="artifact id of a PNG in the run's store")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: list[TextPart | ImagePart]
    hints: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "structured facts the message's prompt states (agent role, question, current "
            "answer and confidence, evidence ids). Backends that send text ignore them; small "
            "task-specific models (medloupe-mini) read them instead of parsing prose."
        ),
    )

    @classmethod
    def text(cls, role: Literal["system", "user", "assistant"], text: str) -> ChatMessage:
        return cls(role=role, content=[TextPart(text=text)])


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generation(BaseModel):
    """A backend's reply: raw text, the validated object when a schema was given, usage."""

    text: str
    parsed: Any | None = None
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float = 0.0
    model: str = ""
    attempts: int = Field(default=1, description="requests made (1 + repair rounds)")


@runtime_checkable
class VLMBackend(Protocol):
    """What the graph needs of a vision-language model."""

    @property
    def spec(self) -> str:
        """The spec string that selects this backend (recorded in traces and provenance)."""
        ...

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        schema: type[BaseModel] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Generation:
        """Generate a reply. With ``schema``, ``Generation.parsed`` is an instance of it.

        Raises:
            medloupe.errors.BackendError: the model could not produce a (valid) reply.
        """
        ...


DEFAULT_VLM = "mini:"
VLM_ENV = "MEDLOUPE_VLM"


def resolve_vlm(spec: str | None) -> tuple[str | None, bool]:
    """The VLM spec a run uses and whether it is the default.

    ``spec`` (e.g. from ``--vlm``) wins; else ``$MEDLOUPE_VLM``; ``"none"`` in either means no
    VLM (the evidence-only path). With neither, the default is medloupe-mini's answerer
    shipped in the package (:data:`DEFAULT_VLM`) when it is installed, else no VLM.

    Returns:
        ``(spec or None, True when the default was chosen)``.
    """
    import os

    chosen = spec if spec else os.environ.get(VLM_ENV) or None
    if chosen is not None:
        return (None, False) if chosen.strip().lower() == "none" else (chosen, False)
    from medloupe.mini import model_folder

    if (model_folder() / "answerer.json").is_file():
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
        raise BackendSpecError(f"backend {scheme!r} did not build a VLMBackend")
    return backend
