"""Where a run is assembled: the resources runs share, and the one constructor of the
runtime context every node receives.

- :class:`ResourceSpec` names what a run uses (VLM spec, whether it is the default, KB); it
  is what ``run.json`` records. :func:`resolve_resources` turns user choices (``--vlm``, the
  settings, ``--kb``) into one, without loading anything.
- :class:`Resources` are the loaded parts (tool registry, VLM backend, retriever):
  :func:`load_resources` loads them (a bad spec or KB fails here, before a run is written);
  :func:`shared_resources` loads each spec once per process and shares it (the CLI, the
  Python API, the service and LangGraph's server).
- :func:`build_context` is the only place a :class:`RunContext` is made: from a run's
  artifact store and trace, the resources and the settings.
- :class:`ContextInput` is what a caller of the compiled graph may give as context instead
  (LangGraph's server and Studio always pass one, often ``{}``): the VLM and KB by name.
  :func:`default_context` builds the run context from it, the settings and the thread id;
  artifacts and the trace of each thread live in ``<home>/threads/<thread_id>/``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing_extensions import TypedDict

from medloupe.agents.protocol import VLMBackend, load_backend, resolve_vlm
from medloupe.artifacts import ArtifactStore
from medloupe.config import Settings
from medloupe.errors import InputError
from medloupe.knowledge_base import open_knowledge_base
from medloupe.knowledge_base.protocol import Retriever
from medloupe.knowledge_base.tool import registry_with_retriever
from medloupe.tools import ToolRegistry, default_registry
from medloupe.trace import TraceRecorder

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ResourceSpec:
    """What a run uses, by name.

    Attributes:
        vlm: backend spec, or ``None`` for the evidence-only path.
        vlm_default: ``vlm`` is the default one (none was configured): said in provenance.
        kb: knowledge base (``"default"`` or an absolute folder), or ``None``.
    """

    vlm: str | None = None
    vlm_default: bool = False
    kb: str | None = None


def resolve_resources(
    vlm: str | None, kb: str | None, settings: Settings | None = None
) -> ResourceSpec:
    """The resources a run uses: ``vlm`` (``None``: the settings' or the default, ``"none"``:
    no VLM) and ``kb`` (a folder is made absolute). Nothing is loaded."""
    spec, is_default = resolve_vlm(vlm, settings)
    if kb and kb != "default":
        kb = str(Path(kb).expanduser().resolve())
    return ResourceSpec(vlm=spec, vlm_default=is_default, kb=kb or None)


@dataclass(frozen=True)
class Resources:
    """What runs share: the tool registry, the VLM backend and the retriever."""

    registry: ToolRegistry
    vlm: VLMBackend | None = None
    retriever: Retriever | None = None
    spec: ResourceSpec = ResourceSpec()

    def with_new_tools(self) -> Resources:
        """The same backend and KB with new instances of the default tools (and
        ``search_knowledge``), so nothing one run's tools cache reaches another."""
        fresh = default_registry(mcp="")
        fresh.adopt_connected(self.registry)  # MCP servers stay connected across runs
        fresh = registry_with_retriever(fresh, self.retriever)
        return dataclasses.replace(self, registry=fresh)

    async def aclose(self, *, backend: bool = True) -> None:
        """Close the knowledge base and (with ``backend``) the backend's connections: for
        resources loaded for one job, not the shared ones."""
        if backend and self.vlm is not None:
            await self.vlm.aclose()
        if self.retriever is not None:
            self.retriever.close()


def load_resources(
    spec: ResourceSpec = ResourceSpec(),
    *,
    registry: ToolRegistry | None = None,
    backend: VLMBackend | None = None,
    search_tool: bool = True,
) -> Resources:
    """Load what ``spec`` names.

    Args:
        registry: the tools (default: built-ins, expert tools and entry points).
        backend: an already loaded backend (then ``spec.vlm`` is not loaded again).
        search_tool: register ``search_knowledge`` for the knowledge base.

    Raises:
        BackendSpecError, ModelNotFoundError, KnowledgeBaseError: a bad spec or KB.
    """
    vlm = backend if backend is not None else load_backend(spec.vlm) if spec.vlm else None
    if backend is not None:
        spec = ResourceSpec(vlm=backend.spec, vlm_default=spec.vlm_default, kb=spec.kb)
    retriever = open_knowledge_base(spec.kb) if spec.kb else None
    tools = registry if registry is not None else default_registry()
    if search_tool:
        tools = registry_with_retriever(tools, retriever)
    return Resources(registry=tools, vlm=vlm, retriever=retriever, spec=spec)


@functools.lru_cache(maxsize=4)
def shared_resources(spec: ResourceSpec) -> Resources:
    """:func:`load_resources` of ``spec`` with the default registry, once per process."""
    return load_resources(spec)


@dataclass
class RunContext:
    """Dependencies of one run, given to every node through LangGraph's runtime context.
    Built only by :func:`build_context`.

    Attributes:
        store: artifact store of the run directory.
        trace: the run's trace recorder.
        registry: tools available to the planner and act node.
        vlm: the vision-language backend, or ``None`` for the evidence-only path.
        vlm_default: ``vlm`` is the default (no VLM was configured), said in the provenance.
        retriever: the knowledge base, or ``None``.
        settings: process settings (tool timeout, pixel limit).
        max_plan_repairs: rounds a VLM plan that fails validation goes back to the model.
        clock: wall-clock seconds (the time budget and timings read it).
    """

    store: ArtifactStore
    trace: TraceRecorder
    registry: ToolRegistry
    settings: Settings
    vlm: VLMBackend | None = None
    vlm_default: bool = False
    retriever: Retriever | None = None
    max_plan_repairs: int = 2
    clock: Callable[[], float] = field(default=time.time, repr=False)


def build_context(
    store: ArtifactStore,
    trace: TraceRecorder,
    resources: Resources,
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
) -> RunContext:
    """The runtime context of one run (the only :class:`RunContext` constructor)."""
    return RunContext(
        store=store,
        trace=trace,
        registry=resources.registry,
        vlm=resources.vlm,
        vlm_default=resources.vlm is not None and resources.spec.vlm_default,
        retriever=resources.retriever,
        settings=settings,
        clock=clock,
    )


def thread_dir_name(thread_id: str) -> str:
    """A directory name for a thread id (the id itself when safe, else a hash of it)."""
    if _SAFE_ID.match(thread_id) and ".." not in thread_id:
        return thread_id
    return "t-" + hashlib.sha256(thread_id.encode()).hexdigest()[:24]


class ContextInput(TypedDict, total=False):
    """The diagnose graph's context as a caller of the compiled graph gives it (LangGraph's
    server, Studio's context form); every key optional, ``{}`` or none: the settings'.

    Attributes:
        vlm: backend spec (``openai:URL#MODEL``, ``hf:PATH``, ``mini:``, or ``none``).
        kb: knowledge base (``default`` or a folder; ``none``: no KB).
    """

    vlm: str
    kb: str


def context_resources(context: dict[str, Any], settings: Settings) -> ResourceSpec:
    """The resources a :class:`ContextInput` names (the settings' where it names none).

    Raises:
        InputError: a key the context does not take, or a value that is not a string.
    """
    unknown = sorted(set(context) - set(ContextInput.__annotations__))
    if unknown:
        raise InputError(
            f"the diagnose graph's context takes {', '.join(ContextInput.__annotations__)}; "
            f"not {', '.join(unknown)}"
        )
    for key, value in context.items():
        if not isinstance(value, str):
            raise InputError(f"context {key!r} must be a string, not {type(value).__name__}")
    kb = context.get("kb", settings.kb)
    return resolve_resources(context.get("vlm"), None if kb in (None, "none") else kb, settings)


def open_default_context(
    config: dict[str, Any], context: dict[str, Any] | None = None
) -> RunContext:
    """The run context of a LangGraph thread from a :class:`ContextInput` (blocking: loads
    the shared resources once per process and opens the thread's trace; close it with
    ``ctx.trace.close()``).

    Args:
        config: the runnable config; its ``configurable.thread_id`` names the thread folder.
        context: the caller's context (``None`` or ``{}``: the settings').
    """
    configurable = config.get("configurable") or {}
    thread_id = str(configurable.get("thread_id") or config.get("run_id") or "default")
    settings = Settings.from_env()
    root = settings.home / "threads" / thread_dir_name(thread_id)
    resources = shared_resources(context_resources(dict(context or {}), settings))
    trace = TraceRecorder(root / "trace.sqlite", settings=settings, run_id=thread_id)
    return build_context(ArtifactStore(root), trace, resources, settings)


@contextmanager
def default_context(
    config: dict[str, Any] | None = None, context: dict[str, Any] | None = None
) -> Iterator[RunContext]:
    """:func:`open_default_context` as a context manager (default config: LangGraph's
    current one); its trace is closed after."""
    if config is None:
        from langgraph.config import get_config

        config = dict(get_config())
    ctx = open_default_context(config, context)
    try:
        yield ctx
    finally:
        ctx.trace.close()
