"""The diagnostic graph: intake -> think -> plan -> [review_plan] -> act -> retrieve -> rethink
-> (plan again | answer).

``graph`` is compiled without a checkpointer so LangGraph's server and studio can run it
(``langgraph.json``); medloupe's runner compiles :data:`builder` with a SQLite checkpointer
in the run directory, so every question is its own thread and a killed run resumes.

Dependencies arrive in :class:`~medloupe.graphs.state.RunContext` (LangGraph runtime
context); when none is given (LangGraph's server), each node builds the default one of
:mod:`medloupe.graphs.defaults` from the environment and the thread id. Nodes are plain async
functions returning partial state updates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import interrupt

from medloupe.agents import roles
from medloupe.agents.composer import NO_VLM_NOTE, compose_answer, heuristic_plan
from medloupe.agents.protocol import Generation
from medloupe.errors import ModelReplyError, ToolArgumentsError, UnknownToolError
from medloupe.graphs.state import InputState, RunContext, RunOptions, State
from medloupe.io.records import ImageRecord
from medloupe.overlay import draw_overlay
from medloupe.schemas import (
    Citation,
    Draft,
    Evidence,
    GroundedAnswer,
    Plan,
    Provenance,
    Region,
    RethinkDecision,
    RethinkRound,
)
from medloupe.tools.base import ToolContext

log = logging.getLogger(__name__)

DEFAULTS: RunOptions = {
    "max_steps": 2,
    "time_budget_s": 300.0,
    "confidence_threshold": 0.8,
    "review_plan": False,
    "rethink": True,
}
MAX_RETHINK_REGIONS = 3
CROP_MARGIN = 0.25  # context around each region the rethinker sees, share of the box size
DEFAULT_CROP_SIDE = 512  # crops' longer side when the backend states no preference


def option(state: State, key: str) -> Any:
    opts: dict[str, Any] = dict(state.get("options", {}))
    return opts.get(key, dict(DEFAULTS).get(key))


def _image(state: State) -> ImageRecord:
    return ImageRecord.model_validate(state["image"])


def _evidence(state: State, key: str = "evidence") -> list[Evidence]:
    return [Evidence.model_validate(e) for e in state.get(key, [])]  # type: ignore[attr-defined]


def _record_model_call(
    ctx: RunContext, node: str, purpose: str, gen: Generation, result: Any = None
) -> None:
    """Trace one model call; ``result`` is the validated reply (a pydantic model), so a
    reviewer sees what the model said at each step."""
    ctx.trace.record(
        "model_call",
        node=node,
        name=ctx.vlm.spec if ctx.vlm else None,
        status="ok",
        duration_ms=gen.latency_ms,
        purpose=purpose,
        model=gen.model,
        prompt_tokens=gen.usage.prompt_tokens,
        completion_tokens=gen.usage.completion_tokens,
        attempts=gen.attempts,
        result=result.model_dump(mode="json") if result is not None else None,
    )


def _record_bad_reply(ctx: RunContext, node: str, purpose: str, exc: ModelReplyError) -> str:
    """Record a model call whose reply stayed invalid; returns the note for the run."""
    usage = exc.usage
    ctx.trace.record(
        "model_call",
        node=node,
        name=ctx.vlm.spec if ctx.vlm else None,
        status="error",
        duration_ms=exc.latency_ms,
        purpose=purpose,
        prompt_tokens=getattr(usage, "prompt_tokens", 0),
        completion_tokens=getattr(usage, "completion_tokens", 0),
        error=str(exc),
    )
    note = f"{node}: the model's reply was unusable ({exc})"
    log.warning("%s", note)
    return note


NodeFn = Callable[[State, RunContext], Awaitable[dict[str, Any]]]


def traced(
    name: str, fn: NodeFn
) -> Callable[[State, Runtime[RunContext]], Awaitable[dict[str, Any]]]:
    """Wrap a node so that its entry and exit (or error) are recorded in the trace."""

    async def node(state: State, runtime: Runtime[RunContext]) -> dict[str, Any]:
        if isinstance(runtime.context, RunContext):
            return await run(state, runtime.context)
        if runtime.context is not None:
            raise TypeError(
                "the diagnose graph's runtime context must be a medloupe RunContext, not "
                f"{type(runtime.context).__name__}; pass none to use the default context "
                "(medloupe.graphs.defaults)"
            )
        from medloupe.graphs.defaults import default_context

        with default_context() as ctx:
            return await run(state, ctx)

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


# --- nodes --------------------------------------------------------------------------------


async def intake(state: State, ctx: RunContext) -> dict[str, Any]:
    """Take in the image: use the ingested record, or read ``image_path`` and store it."""
    update: dict[str, Any] = {"started_at": state.get("started_at") or ctx.clock(), "step": 0}
    rec = state.get("image")
    if rec and rec.get("display_artifact") and ctx.store.exists(rec["display_artifact"]):
        return update
    if not state.get("image_path"):
        raise ValueError("the input needs `image` (an ingested record) or `image_path`")
    from medloupe.io import load_image
    from medloupe.runner import ingest_image

    opts = state.get("options", {})
    loaded = await asyncio.to_thread(
        load_image,
        Path(state["image_path"]),
        frame=opts.get("frame"),
        slice_index=opts.get("slice_index"),
        axis=opts.get("axis", 2),
        modality=opts.get("modality"),
        max_pixels=ctx.settings.max_pixels,
    )
    update["image"] = ingest_image(loaded, ctx.store).model_dump(mode="json")
    return update


async def think(state: State, ctx: RunContext) -> dict[str, Any]:
    """First look at the whole image (VLM), or a note that there is none."""
    notes: list[str] = []
    if ctx.vlm is None:
        draft = Draft(note=NO_VLM_NOTE)
    else:
        try:
            draft, gen = await roles.think(ctx.vlm, ctx.store, _image(state), state["question"])
            _record_model_call(ctx, "think", "first look", gen, draft)
        except ModelReplyError as exc:
            notes.append(_record_bad_reply(ctx, "think", "first look", exc))
            draft = Draft(note="the first look gave no usable reply; going on with the tools")
    update: dict[str, Any] = {
        "draft": draft.model_dump(mode="json"),
        "current_answer": draft.answer,
        "current_confidence": draft.confidence,
        "notes": notes,
    }
    if ctx.vlm is not None and draft.answer is not None:
        image = _image(state)
        obs = observation(
            state,
            "think",
            0,
            f"first look ({ctx.vlm.spec}): {draft.answer!r}, confidence {draft.confidence:.2f}"
            + (f"; findings: {'; '.join(draft.findings)}" if draft.findings else ""),
            [(r.box_xyxy, r.reason or "region to look at") for r in draft.regions],
            [image.display_artifact] if image.display_artifact else [],
        )
        update["evidence"] = [obs.model_dump(mode="json")]
    return update


def observation(
    state: State,
    role: str,
    step: int,
    summary: str,
    regions: list[tuple[tuple[float, float, float, float], str]],
    artifacts: list[str],
) -> Evidence:
    """The model's own look (first look or a rethink round) as citable evidence, with a
    stable id (image, question, role, round) so a resumed run gives the same id."""
    import hashlib

    key = f"{_image(state).content_hash}|{state['question']}|{role}|{step}"
    ev_id = f"obs-{role}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return Evidence(
        id=ev_id,
        kind="observation",
        step=step,
        summary=summary[:500],
        regions=[
            Region(id=f"{ev_id}-r{i}", box_xyxy=box, label=label[:80], evidence_id=ev_id)
            for i, (box, label) in enumerate(regions)
        ],
        artifacts=artifacts,
    )


async def plan(state: State, ctx: RunContext) -> dict[str, Any]:
    """Plan tool calls (VLM planner validated against tool schemas, or the rule-based plan)."""
    image, draft = _image(state), Draft.model_validate(state.get("draft", {}))
    step = state.get("step", 0)
    problems: list[str] = []
    notes: list[str] = []
    p: Plan | None = None
    if ctx.vlm is not None and getattr(ctx.vlm, "plans", True):
        try:
            p, gens, problems = await roles.plan(
                ctx.vlm,
                ctx.store,
                ctx.registry,
                image,
                state["question"],
                draft,
                _evidence(state),
                max_repairs=ctx.max_plan_repairs,
            )
            for gen in gens:
                _record_model_call(ctx, "plan", "plan", gen)
        except ModelReplyError as exc:
            notes.append(_record_bad_reply(ctx, "plan", "plan", exc))
    if p is None and step == 0:  # no VLM, or its plan was unusable: the rule-based plan
        p = heuristic_plan(state["question"], ctx.registry, image, draft)
    elif p is None:
        p = Plan(rationale="no usable model plan: nothing further to plan")
    ctx.trace.record(
        "plan",
        node="plan",
        status="ok" if not problems else "repaired",
        step=step,
        plan=p.model_dump(mode="json"),
        problems=problems,
    )
    return {"plan": p.model_dump(mode="json"), "notes": notes}


async def review_plan(state: State, ctx: RunContext) -> dict[str, Any]:
    """Pause for a reviewer to approve, edit or reject the plan (``--review-plan``).

    Resume with ``{"action": "approve"}``, ``{"action": "edit", "plan": {...}}`` or
    ``{"action": "reject"}``. An edited plan that fails validation is shown again with the
    problem.
    """
    current = Plan.model_validate(state["plan"])
    problem: str | None = None
    while True:
        decision = interrupt(
            {
                "plan": current.model_dump(mode="json"),
                "problem": problem,
                "tools": ctx.registry.names(),
            }
        )
        action = (decision or {}).get("action", "approve")
        if action == "approve":
            break
        if action == "reject":
            current = Plan(rationale="plan rejected by the reviewer")
            break
        try:
            current = Plan.model_validate(decision.get("plan", {}))
            for call in current.calls:
                ctx.registry.validate(call.tool, call.arguments)
            break
        except (ValueError, UnknownToolError, ToolArgumentsError) as exc:
            problem = str(exc)
    ctx.trace.record(
        "review", node="review_plan", status=action, plan=current.model_dump(mode="json")
    )
    return {"plan": current.model_dump(mode="json")}


async def act(state: State, ctx: RunContext) -> dict[str, Any]:
    """Run the plan's tool calls concurrently; each result (or failure) becomes evidence."""
    p = Plan.model_validate(state.get("plan", {}))
    step = state.get("step", 0)
    tctx = ToolContext(image=_image(state), store=ctx.store)
    results = await asyncio.gather(
        *(_call_tool(ctx, "act", c.tool, c.arguments, tctx, step) for c in p.calls)
    )
    return {"evidence": [e.model_dump(mode="json") for e in results], "step": step + 1}


async def _call_tool(
    ctx: RunContext, node: str, name: str, arguments: dict[str, Any], tctx: ToolContext, step: int
) -> Evidence:
    """Run one tool call; trace its start (``tool_start``, the arguments as planned) and its
    result (``tool_call``) as each happens."""
    ctx.trace.record("tool_start", node=node, name=name, status="started", arguments=arguments)
    ev = await ctx.registry.call(
        name, arguments, tctx, default_timeout_s=ctx.settings.tool_timeout_s, step=step
    )
    ctx.trace.record(
        "tool_call",
        node=node,
        name=ev.tool,
        status=ev.status,
        duration_ms=ev.duration_ms,
        evidence_id=ev.id,
        arguments=ev.arguments,
        summary=ev.summary,
        error=ev.error,
        regions=[r.model_dump(mode="json") for r in ev.regions],
        artifacts=ev.artifacts,
    )
    return ev


def _passage_evidence(
    step: int,
    pid: str,
    document: str,
    section: str | None,
    page: str | None,
    text: str,
    score: float | None,
    figure: str | None,
) -> Evidence:
    cit = Citation(
        id=f"cit-{pid}",
        document=document,
        section=section,
        page=page,
        snippet=text[:500],
        score=score,
        figure_artifact=figure,
    )
    return Evidence(
        id=f"ev-passage-{pid}",
        kind="passage",
        step=step,
        citation=cit,
        artifacts=[figure] if figure else [],
        summary=f"{document}{' - ' + section if section else ''}: {text[:200]}",
    )


async def retrieve(state: State, ctx: RunContext) -> dict[str, Any]:
    """Query the knowledge base with the question and the draft findings, and with a crop of
    the first region found (figures that look like it); passages that ``search_knowledge``
    tool calls of this step found are cited too."""
    if ctx.retriever is None:
        ctx.trace.record(
            "retrieval", node="retrieve", status="skipped", reason="no knowledge base configured"
        )
        return {}
    from medloupe.knowledge_base.tool import crop_for_query, figure_artifact

    step = state.get("step", 0)
    draft = Draft.model_validate(state.get("draft", {}))
    query = " ".join(
        [state["question"], state.get("current_answer") or "", *draft.findings]
    ).strip()
    boxes = _regions_to_examine(state, draft)
    crop = None
    if boxes:
        crop = crop_for_query(ToolContext(image=_image(state), store=ctx.store).rgb(), boxes[0])
    t0 = time.perf_counter()
    passages = await ctx.retriever.search(query, image=crop, k=5)
    items = {
        f"ev-passage-{p.id}": _passage_evidence(
            step,
            p.id,
            p.document,
            p.section,
            p.page,
            p.text,
            p.score,
            figure_artifact(ctx.store, p),
        )
        for p in passages
    }
    for ev in _evidence(state):
        if ev.tool == "search_knowledge" and ev.status == "ok" and ev.output:
            for hit in ev.output.get("passages", []):
                pid = str(hit["citation_id"]).removeprefix("cit-")
                items.setdefault(
                    f"ev-passage-{pid}",
                    _passage_evidence(
                        step,
                        pid,
                        hit["document"],
                        hit.get("section"),
                        hit.get("page"),
                        hit["snippet"],
                        hit.get("score"),
                        hit.get("figure_artifact"),
                    ),
                )
    known = {e.id for e in _evidence(state, "passages")}
    fresh = [e for i, e in items.items() if i not in known]
    ctx.trace.record(
        "retrieval",
        node="retrieve",
        name=ctx.retriever.name,
        status="ok",
        duration_ms=(time.perf_counter() - t0) * 1000.0,
        query=query,
        image_query_box=list(boxes[0]) if boxes else None,
        passages=[e.citation.model_dump(mode="json") for e in items.values() if e.citation],
    )
    return {"passages": [e.model_dump(mode="json") for e in fresh]}


def _regions_to_examine(state: State, draft: Draft) -> list[tuple[float, float, float, float]]:
    boxes: list[tuple[float, float, float, float]] = [r.box_xyxy for r in draft.regions]
    step = state.get("step", 0)
    for ev in _evidence(state):
        if ev.status == "ok" and ev.step == step - 1:
            boxes.extend(r.box_xyxy for r in ev.regions if r.label != "crop")
    seen: list[tuple[float, float, float, float]] = []
    for b in boxes:
        if b not in seen:
            seen.append(b)
    return seen[:MAX_RETHINK_REGIONS]


async def rethink(state: State, ctx: RunContext) -> dict[str, Any]:
    """Look again at cropped regions, with the evidence and passages beside them."""
    image = _image(state)
    draft = Draft.model_validate(state.get("draft", {}))
    step = state.get("step", 0)
    boxes = _regions_to_examine(state, draft)
    tctx = ToolContext(image=image, store=ctx.store)
    crops: list[Evidence] = []
    if "crop" in ctx.registry:
        side = int(getattr(ctx.vlm, "preferred_image_side", 0) or DEFAULT_CROP_SIDE)
        crop_args: dict[str, Any] = {
            "margin": CROP_MARGIN,
            "zoom_to": max(64, min(side, 2048)),
            # CT/MR: re-window each crop to its own values (DICOM/NIfTI modality values)
            "window": "local"
            if image.modality in ("CT", "MR") and image.raw_artifact
            else "display",
        }
        crops = list(
            await asyncio.gather(
                *(
                    _call_tool(
                        ctx, "rethink", "crop", {"box_xyxy": list(b), **crop_args}, tctx, step
                    )
                    for b in boxes
                )
            )
        )
    crop_ids = [a for ev in crops if ev.status == "ok" for a in ev.artifacts]
    before, conf_before = state.get("current_answer"), state.get("current_confidence", 0.0)
    notes: list[str] = []
    decision: RethinkDecision | None = None
    if ctx.vlm is not None:
        regions = [Region(id=f"roi-{i}", box_xyxy=b, label=str(i + 1)) for i, b in enumerate(boxes)]
        overview = ctx.store.put_png(draw_overlay(tctx.rgb(), regions), kind="overlay")
        try:
            decision, gen = await roles.rethink(
                ctx.vlm,
                ctx.store,
                state["question"],
                overview,
                crop_ids,
                before,
                conf_before,
                _evidence(state),
                _evidence(state, "passages"),
            )
            _record_model_call(ctx, "rethink", "second look", gen, decision)
        except ModelReplyError as exc:
            notes.append(_record_bad_reply(ctx, "rethink", "second look", exc))
            decision = RethinkDecision(
                answer=before,
                confidence=conf_before,
                note="the second look gave no usable reply; the answer is unchanged",
            )
    else:
        decision = RethinkDecision(
            answer=before,
            confidence=conf_before,
            note="no VLM: crops stored for review; the answer is unchanged",
        )
    rnd = RethinkRound(
        round=step,
        crops=crop_ids,
        boxes=boxes,
        answer_before=before,
        answer_after=decision.answer,
        confidence_before=conf_before,
        confidence_after=decision.confidence,
        needs_more_evidence=decision.needs_more_evidence,
        request=decision.request,
        note=decision.note,
    )
    ctx.trace.record(
        "rethink_round", node="rethink", status="ok", step=step, **rnd.model_dump(mode="json")
    )
    looked: list[Evidence] = []
    if ctx.vlm is not None and decision.answer is not None and not notes:
        looked.append(
            observation(
                state,
                "rethink",
                step,
                f"second look ({ctx.vlm.spec}) at {len(crop_ids)} crop(s): {decision.answer!r}, "
                f"confidence {decision.confidence:.2f}",
                [(b, f"region {i + 1}, looked at closely") for i, b in enumerate(boxes)],
                crop_ids,
            )
        )
    return {
        "rethinks": [rnd.model_dump(mode="json")],
        "evidence": [e.model_dump(mode="json") for e in [*crops, *looked]],
        "current_answer": decision.answer,
        "current_confidence": decision.confidence,
        "needs_more": decision.needs_more_evidence,
        "notes": notes,
    }


async def answer(state: State, ctx: RunContext) -> dict[str, Any]:
    """Emit the grounded answer: claims cite evidence ids, regions and citations attached."""
    image = _image(state)
    evidence = _evidence(state) + _evidence(state, "passages")
    by_id = {e.id: e for e in evidence}
    result: GroundedAnswer | None = None
    notes: list[str] = []
    draft: roles.AnswerDraft | None = None
    if ctx.vlm is not None and getattr(ctx.vlm, "defers_to_instruments", False):
        # a short-answer model (medloupe-mini) keeps what the instruments state outright
        composed = compose_answer(state["question"], image, evidence, deferring_model=ctx.vlm.spec)
        if not composed.abstained:
            result = composed
            ctx.trace.record(
                "note",
                node="answer",
                status="ok",
                message=f"{ctx.vlm.spec} defers to the instruments, which answer this question "
                "outright",
            )
    if ctx.vlm is not None and result is None:
        try:
            draft, gen = await roles.answer(
                ctx.vlm,
                ctx.store,
                state["question"],
                state.get("current_answer"),
                state.get("current_confidence", 0.0),
                evidence,
            )
            _record_model_call(ctx, "answer", "final answer", gen, draft)
        except ModelReplyError as exc:
            notes.append(_record_bad_reply(ctx, "answer", "final answer", exc))
    if draft is not None:
        cited = {i for c in draft.claims for i in c.evidence_ids}
        try:
            result = GroundedAnswer.model_validate(
                {
                    "question": state["question"],
                    **draft.model_dump(),
                    "regions": [
                        r.model_dump()
                        for i in sorted(cited)
                        if i in by_id
                        for r in by_id[i].regions
                    ],
                    "citations": [
                        c.model_dump()
                        for i in sorted(cited)
                        if i in by_id and (c := by_id[i].citation) is not None
                    ],
                    "provenance": {"answer_source": "vlm"},
                },
                context={"evidence_ids": set(by_id)},
            )
        except ValueError as exc:
            notes.append(f"the model's answer was rejected ({exc}); composed from evidence instead")
            ctx.trace.record("note", node="answer", status="error", message=notes[-1])
    if result is None:
        result = compose_answer(
            state["question"],
            image,
            evidence,
            vlm_answer=state.get("current_answer"),
            vlm_problem=notes[-1] if ctx.vlm is not None and notes else None,
        )
    timings: dict[str, float] = {}
    for ev in ctx.trace.events({"node_end"}):
        if ev.node and ev.duration_ms is not None:
            timings[ev.node] = timings.get(ev.node, 0.0) + ev.duration_ms
    timings["total"] = (ctx.clock() - state.get("started_at", ctx.clock())) * 1000.0
    from medloupe import __version__

    provenance = Provenance(
        vlm=ctx.vlm.spec if ctx.vlm else None,
        vlm_default=ctx.vlm is not None and ctx.vlm_default,
        answer_source=result.provenance.answer_source,
        tools=sorted({e.tool for e in evidence if e.tool}),
        retriever=ctx.retriever.name if ctx.retriever else None,
        medloupe_version=__version__,
    )
    result = result.model_copy(update={"timings_ms": timings, "provenance": provenance})
    GroundedAnswer.model_validate(result.model_dump(), context={"evidence_ids": set(by_id)})
    return {"answer": result.model_dump(mode="json"), "notes": notes}


# --- routers ------------------------------------------------------------------------------


def route_after_plan(state: State) -> Literal["review_plan", "act"]:
    return "review_plan" if option(state, "review_plan") else "act"


def route_after_retrieve(state: State) -> Literal["rethink", "answer"]:
    """Skip the second look when the ``rethink`` option is off (an ablation)."""
    return "rethink" if option(state, "rethink") else "answer"


def route_after_rethink(state: State) -> Literal["plan", "answer"]:
    """Loop back to plan while the rethinker asks for more evidence and the budget allows."""
    if not state.get("needs_more"):
        return "answer"
    if state.get("current_confidence", 0.0) >= option(state, "confidence_threshold"):
        return "answer"
    if state.get("step", 0) >= option(state, "max_steps"):
        return "answer"
    if time.time() - state.get("started_at", time.time()) >= option(state, "time_budget_s"):
        return "answer"
    return "plan"


def build() -> StateGraph[State, RunContext, InputState, State]:
    """The uncompiled graph (compile it with your checkpointer)."""
    b = StateGraph(State, context_schema=RunContext, input_schema=InputState)
    for name, fn in (
        ("intake", intake),
        ("think", think),
        ("plan", plan),
        ("review_plan", review_plan),
        ("act", act),
        ("retrieve", retrieve),
        ("rethink", rethink),
        ("answer", answer),
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
