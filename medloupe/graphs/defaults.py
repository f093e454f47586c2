"""A default runtime context for callers that give none: LangGraph's server and studio.

``langgraph dev`` / LangGraph Platform run the compiled ``graph`` of
:mod:`medloupe.graphs.diagnose` with a JSON input and a ``thread_id``, but cannot pass a
:class:`~medloupe.graphs.state.RunContext` (it holds live objects). When a node finds no
context it builds one here, from the environment:

``MEDLOUPE_HOME``
    artifacts and the trace of each thread live in ``$MEDLOUPE_HOME/threads/<thread_id>/``.
``MEDLOUPE_VLM``
    a VLM spec (e.g. ``openai:http://127.0.0.1:8000/v1#MODEL``); unset: medloupe-mini (shipped
    in the package); ``none``: the evidence-only path.
``MEDLOUPE_KB``
    a knowledge-base path; unset: no retrieval.

The registry, backend and retriever are built once per (VLM spec, KB path) and reused across
threads, so a local model's weights load once per server process; the artifact store and
trace are per thread.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from medloupe.config import Settings
from medloupe.graphs.state import RunContext

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def thread_dir_name(thread_id: str) -> str:
    """A directory name for a thread id (the id itself when safe, else a hash of it)."""
    if _SAFE_ID.match(thread_id) and ".." not in thread_id:
        return thread_id
    return "t-" + hashlib.sha256(thread_id.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=4)
def shared_resources(vlm_spec: str | None, kb_path: str | None) -> tuple[Any, Any, Any]:
    """(registry, VLM backend or None, retriever or None), built once per argument pair."""
    from medloupe.tools import default_registry

    vlm = None
    if vlm_spec:
        from medloupe.agents.protocol import load_backend

        vlm = load_backend(vlm_spec)
    retriever = None
    if kb_path:
        from medloupe.knowledge_base import open_knowledge_base

        retriever = open_knowledge_base(kb_path)
    from medloupe.knowledge_base.tool import registry_with_retriever

    return registry_with_retriever(default_registry(), retriever), vlm, retriever


@contextmanager
def default_context(config: dict[str, Any] | None = None) -> Iterator[RunContext]:
    """Build a :class:`RunContext` for the current LangGraph thread; close its trace after.

    Args:
        config: the runnable config (default: LangGraph's current one); its
            ``configurable.thread_id`` names the thread directory.
    """
    from medloupe.artifacts import ArtifactStore
    from medloupe.trace import TraceRecorder

    if config is None:
        from langgraph.config import get_config

        config = dict(get_config())
    configurable = config.get("configurable") or {}
    thread_id = str(configurable.get("thread_id") or config.get("run_id") or "default")
    settings = Settings.from_env()
    root = settings.home / "threads" / thread_dir_name(thread_id)
    from medloupe.agents.protocol import resolve_vlm

    spec, vlm_default = resolve_vlm(None)
    registry, vlm, retriever = shared_resources(spec, os.environ.get("MEDLOUPE_KB") or None)
    trace = TraceRecorder(root / "trace.sqlite")
    try:
        yield RunContext(
            store=ArtifactStore(root),
            trace=trace,
            registry=registry,
            vlm=vlm,
            vlm_default=vlm_default,
            retriever=retriever,
            settings=settings,
        )
    finally:
        trace.close()
