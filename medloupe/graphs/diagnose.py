"""The diagnostic graph: intake -> think -> plan -> [review_plan] -> act -> retrieve -> rethink
-> (plan again | answer).

``graph`` is compiled without a checkpointer so LangGraph's server and studio can run it
(``langgraph.json``); medloupe's runner compiles :data:`builder` with a SQLite checkpointer
in the run directory, so every question is its own thread and a killed run resumes.

Dependencies arrive in :class:`~medloupe.graphs.context.RunContext` (LangGraph runtime
context, built by :func:`~medloupe.graphs.context.build_context`). A caller of the compiled
graph (LangGraph's server, Studio) gives a :class:`~medloupe.graphs.context.ContextInput`
instead, usually ``{}``: each node then opens the thread's context from it and the settings
(:func:`~medloupe.graphs.context.open_default_context`, in a worker thread: nothing blocks the
event loop). The nodes are plain async functions of :mod:`medloupe.graphs.nodes`; this file
wires them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from langgraph.config import get_config
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from medloupe.errors import InputError
from medloupe.graphs import nodes
from medloupe.graphs.context import ContextInput, RunContext, open_default_context
from medloupe.graphs.evidence import options
from medloupe.graphs.state import InputState, OutputState, State

NodeFn = Callable[[State, RunContext], Awaitable[dict[str, Any]]]


def traced(
    name: str, fn: NodeFn
) -> Callable[[State, Runtime[RunContext]], Awaitable[dict[str, Any]]]:
    """Wrap a node so that its entry and exit (or error) are recorded in the trace."""

    async def node(state: State, runtime: Runtime[Any]) -> dict[str, Any]:
        given = runtime.context
        if isinstance(given, RunContext):
            return await run(state, given)
        if given is not None and not isinstance(given, dict):
            raise InputError(
                "the diagnose graph's context is a medloupe RunContext or a dict of "
                f"{', '.join(ContextInput.__annotations__)}, not {type(given).__name__}"
            )
        ctx = await asyncio.to_thread(open_default_context, dict(get_config()), given)
        try:
            return await run(state, ctx)
        finally:
            await asyncio.to_thread(ctx.trace.close)

    async def run(state: State, ctx: RunContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        step = state.get("step", 0)
        ctx.trace.record("node_start", node=name, status="started", step=step)
        try:
            update = await fn(state, ctx)
        except BaseException as exc:
            status = "interrupted" if type(exc).__name__ == "GraphInterrupt" else "error"
            ctx.trace.record(
                "node_end" if status == "interrupted" else "node_error",
                node=name,
                status=status,
                duration_ms=(time.perf_counter() - t0) * 1000.0,
                step=step,
                error=None if status == "interrupted" else f"{type(exc).__name__}: {exc}",
            )
            raise
        ctx.trace.record(
            "node_end",
            node=name,
            status="ok",
            duration_ms=(time.perf_counter() - t0) * 1000.0,
            step=step,
        )
        return update

    node.__name__ = name
    return node


# --- routers ------------------------------------------------------------------------------


def route_after_plan(state: State) -> Literal["review_plan", "act"]:
    return "review_plan" if options(state).review_plan else "act"


def route_after_retrieve(state: State) -> Literal["rethink", "answer"]:
    """Skip the second look when the ``rethink`` option is off (an ablation)."""
    return "rethink" if options(state).rethink else "answer"


def route_after_rethink(state: State) -> Literal["plan", "answer"]:
    """Loop back to plan while the rethinker asks for more evidence and the budget allows
    (the rethink node reads the context's clock into ``over_budget``)."""
    opts = options(state)
    if not state.get("needs_more") or state.get("over_budget"):
        return "answer"
    if state.get("current_confidence", 0.0) >= opts.confidence_threshold:
        return "answer"
    if state.get("step", 0) >= opts.max_steps:
        return "answer"
    return "plan"


def build() -> StateGraph[State, Any, InputState, OutputState]:
    """The uncompiled graph (compile it with your checkpointer). Its context schema is
    :class:`~medloupe.graphs.context.ContextInput` (what a server caller may give); medloupe's
    runner passes a built :class:`~medloupe.graphs.context.RunContext`."""
    b = StateGraph(
        State, context_schema=ContextInput, input_schema=InputState, output_schema=OutputState
    )
    for name, fn in (
        ("intake", nodes.intake),
        ("think", nodes.think),
        ("plan", nodes.plan),
        ("review_plan", nodes.review_plan),
        ("act", nodes.act),
        ("retrieve", nodes.retrieve),
        ("rethink", nodes.rethink),
        ("answer", nodes.answer),
    ):
        b.add_node(name, traced(name, fn))  # type: ignore[call-overload]
    b.add_edge(START, "intake")
    b.add_edge("intake", "think")
    b.add_edge("think", "plan")
    b.add_conditional_edges("plan", route_after_plan)
    b.add_edge("review_plan", "act")
    b.add_edge("act", "retrieve")
    b.add_conditional_edges("retrieve", route_after_retrieve)
    b.add_conditional_edges("rethink", route_after_rethink)
    b.add_edge("answer", END)
    return b


builder = build()
graph = builder.compile()
