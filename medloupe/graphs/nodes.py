"""The nodes of the diagnose graph (:mod:`medloupe.graphs.diagnose`): plain async functions
of the state and the :class:`~medloupe.graphs.context.RunContext`, returning partial state
updates."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from langgraph.types import Overwrite, interrupt

from medloupe.agents import roles
from medloupe.agents.composer import (
    NO_VLM_NOTE,
    compose_answer,
    heuristic_plan,
    question_targets,
    uninformative_image,
    withheld_answer,
    withheld_reason,
)
from medloupe.agents.protocol import DEFAULT_CROP_SIDE
from medloupe.agents.structured import validation_problems
from medloupe.errors import InputError, ModelReplyError, ToolArgumentsError, UnknownToolError
from medloupe.graphs.context import RunContext
from medloupe.graphs.evidence import (
    call_tool,
    evidence_of,
    image_of,
    observation,
    options,
    passage_evidence,
    record_bad_reply,
    record_model_call,
    regions_to_examine,
)
from medloupe.graphs.state import State
from medloupe.io.intake import ingest_image, read_input
from medloupe.io.records import ImageRecord
from medloupe.knowledge_base.tool import crop_for_query, figure_artifact
from medloupe.overlay import draw_overview
from medloupe.schemas import (
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
from medloupe.version import __version__

CROP_MARGIN = 0.25  # context around each region the rethinker sees, share of the box size


# What a new question on a thread that answered one starts without (reducers bypassed).
FRESH_QUESTION: dict[str, Any] = {
    "evidence": Overwrite([]),
    "passages": Overwrite([]),
    "rethinks": Overwrite([]),
    "notes": Overwrite([]),
    "draft": {},
    "plan": {},
    "answer": None,
    "current_answer": None,
    "current_confidence": 0.0,
    "needs_more": False,
    "over_budget": False,
    "targets": [],
    "withheld": None,
}


async def intake(state: State, ctx: RunContext) -> dict[str, Any]:
    """Take in the image: use the ingested record, or read ``image_path`` and store it. On a
    thread that holds an earlier question's work, start the new question afresh."""
    earlier = bool(
        state.get("answer") or state.get("evidence") or state.get("rethinks") or state.get("draft")
    )
    update: dict[str, Any] = {
        **(FRESH_QUESTION if earlier else {}),
        "started_at": ctx.clock() if earlier else state.get("started_at") or ctx.clock(),
        "step": 0,
    }
    rec, path = state.get("image"), state.get("image_path")
    same_image = not path or path == state.get("image_source")
    if (
        rec
        and same_image
        and rec.get("display_artifact")
        and await asyncio.to_thread(ctx.store.exists, rec["display_artifact"])
    ):
        return update
    if not path:
        raise InputError(
            "the input needs `image_path` (a PNG, JPEG, DICOM or NIfTI file) or `image` "
            "(an ingested record)"
        )

    def ingest() -> dict[str, Any]:
        loaded = read_input(Path(path), options(state), ctx.settings.max_pixels)
        return ingest_image(loaded, ctx.store).model_dump(mode="json")

    update["image"] = await asyncio.to_thread(ingest)
    update["image_source"] = path
    return update


async def think(state: State, ctx: RunContext) -> dict[str, Any]:
    """First look at the whole image (VLM), or a note that there is none."""
    notes: list[str] = []
    if ctx.vlm is None:
        draft = Draft(note=NO_VLM_NOTE)
    else:
        try:
            draft, gen = await roles.think(ctx.vlm, ctx.store, image_of(state), state["question"])
            record_model_call(ctx, "think", "first look", gen, draft)
        except ModelReplyError as exc:
            notes.append(record_bad_reply(ctx, "think", "first look", exc))
            draft = Draft(note="the first look gave no usable reply; going on with the tools")
    update: dict[str, Any] = {
        "draft": draft.model_dump(mode="json"),
        "current_answer": draft.answer,
        "current_confidence": draft.confidence,
        "notes": notes,
    }
    if ctx.vlm is not None and draft.answer is not None:
        image = image_of(state)
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
    update["targets"] = await asyncio.to_thread(
        question_targets, state["question"], ctx.registry, image_of(state)
    )
    return update


async def plan(state: State, ctx: RunContext) -> dict[str, Any]:
    """Plan tool calls (VLM planner validated against tool schemas, or the rule-based plan)."""
    image, draft = image_of(state), Draft.model_validate(state.get("draft", {}))
    step = state.get("step", 0)
    problems: list[str] = []
    notes: list[str] = []
    p: Plan | None = None
    if ctx.vlm is not None and ctx.vlm.profile.writes_plans:
        try:
            p, gens, problems = await roles.plan(
                ctx.vlm,
                ctx.store,
                ctx.registry,
                image,
                state["question"],
                draft,
                evidence_of(state),
                targets=state.get("targets", []),
                max_repairs=ctx.max_plan_repairs,
            )
            for gen in gens:
                record_model_call(ctx, "plan", "plan", gen)
        except ModelReplyError as exc:
            notes.append(record_bad_reply(ctx, "plan", "plan", exc))
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
    tctx = ToolContext(image=image_of(state), store=ctx.store, second_look=options(state).rethink)
    results = await asyncio.gather(
        *(call_tool(ctx, "act", c.tool, c.arguments, tctx, step) for c in p.calls)
    )
    return {"evidence": [e.model_dump(mode="json") for e in results], "step": step + 1}


async def retrieve(state: State, ctx: RunContext) -> dict[str, Any]:
    """Query the knowledge base with the question and the draft findings, and with a crop of
    the first region found (figures that look like it); passages that ``search_knowledge``
    tool calls of this step found are cited too."""
    if ctx.retriever is None:
        ctx.trace.record(
            "retrieval", node="retrieve", status="skipped", reason="no knowledge base configured"
        )
        return {}
    step = state.get("step", 0)
    draft = Draft.model_validate(state.get("draft", {}))
    query = " ".join(
        [state["question"], state.get("current_answer") or "", *draft.findings]
    ).strip()
    boxes = regions_to_examine(state, draft, state.get("targets", []))
    crop = None
    if boxes:
        tctx = ToolContext(image=image_of(state), store=ctx.store)
        crop = await asyncio.to_thread(lambda: crop_for_query(tctx.rgb(), boxes[0]))
    t0 = time.perf_counter()
    passages = await ctx.retriever.search(query, image=crop, k=5)
    figures = await asyncio.to_thread(lambda: [figure_artifact(ctx.store, p) for p in passages])
    items = {
        f"ev-passage-{p.id}": passage_evidence(
            step, p.id, p.document, p.section, p.page, p.text, p.score, figure
        )
        for p, figure in zip(passages, figures, strict=True)
    }
    for ev in evidence_of(state):
        if ev.tool == "search_knowledge" and ev.status == "ok" and ev.output:
            for hit in ev.output.get("passages", []):
                pid = str(hit["citation_id"]).removeprefix("cit-")
                items.setdefault(
                    f"ev-passage-{pid}",
                    passage_evidence(
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
    known = {e.id for e in evidence_of(state, "passages")}
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


def _crop_args(image: ImageRecord, ctx: RunContext) -> dict[str, Any]:
    """The ``crop`` arguments of the second look: zoomed to the model's preferred side, CT/MR
    crops re-windowed to their own values (DICOM/NIfTI modality values)."""
    side = ctx.vlm.profile.preferred_image_side if ctx.vlm else DEFAULT_CROP_SIDE
    local = image.modality in ("CT", "MR") and image.raw_artifact
    return {
        "margin": CROP_MARGIN,
        "zoom_to": max(64, min(side, 2048)),
        "window": "local" if local else "display",
    }


async def rethink(state: State, ctx: RunContext) -> dict[str, Any]:
    """Look again at cropped regions, with the evidence and passages beside them."""
    image = image_of(state)
    draft = Draft.model_validate(state.get("draft", {}))
    step = state.get("step", 0)
    boxes = regions_to_examine(state, draft, state.get("targets", []))
    tctx = ToolContext(image=image, store=ctx.store)
    crops: list[Evidence] = []
    if "crop" in ctx.registry:
        crop_args = _crop_args(image, ctx)
        crops = list(
            await asyncio.gather(
                *(
                    call_tool(
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
        side = max(ctx.vlm.profile.preferred_image_side, 256)
        overview = await asyncio.to_thread(
            lambda: ctx.store.put_png(draw_overview(tctx.rgb(), regions, side), kind="overlay")
        )
        try:
            decision, gen = await roles.rethink(
                ctx.vlm,
                ctx.store,
                state["question"],
                overview,
                crop_ids,
                before,
                conf_before,
                evidence_of(state),
                evidence_of(state, "passages"),
                targets=state.get("targets", []),
                image=image.display_artifact,
            )
            record_model_call(ctx, "rethink", "second look", gen, decision)
        except ModelReplyError as exc:
            notes.append(record_bad_reply(ctx, "rethink", "second look", exc))
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
    withheld = withheld_reason(state["question"], state.get("targets", []), decision.withheld)
    if decision.withheld and withheld is None:
        notes.append(
            f"the second look withheld its answer for a reason that names nothing the "
            f"question asks about ({decision.withheld[:80]!r}); ignored"
        )
    decision = decision.model_copy(update={"withheld": withheld})
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
        withheld=decision.withheld,
    )
    ctx.trace.record(
        "rethink_round", node="rethink", status="ok", step=step, **rnd.model_dump(mode="json")
    )
    looked = (
        [second_look(state, ctx.vlm.spec, step, decision, boxes, crop_ids)]
        if ctx.vlm is not None and decision.answer is not None and not notes
        else []
    )
    return {
        "rethinks": [rnd.model_dump(mode="json")],
        "evidence": [e.model_dump(mode="json") for e in [*crops, *looked]],
        "current_answer": decision.answer,
        "current_confidence": decision.confidence,
        "needs_more": decision.needs_more_evidence and not decision.withheld,
        "withheld": decision.withheld,
        "over_budget": ctx.clock() - state.get("started_at", ctx.clock())
        >= options(state).time_budget_s,
        "notes": notes,
    }


def second_look(
    state: State,
    model: str,
    step: int,
    decision: RethinkDecision,
    boxes: list[tuple[float, float, float, float]],
    crop_ids: list[str],
) -> Evidence:
    """The observation a second look adds: its answer, each box named as a tool named it
    ("Right Lung 1") or by its number, and the crops it looked at."""
    named = {
        r.box_xyxy: r.label
        for ev in reversed(evidence_of(state))
        for r in ev.regions
        if ev.status == "ok" and r.label and ev.kind == "tool" and r.label != "crop"
    }
    return observation(
        state,
        "rethink",
        step,
        f"second look ({model}) at {len(crop_ids)} crop(s): {decision.answer!r}, "
        f"confidence {decision.confidence:.2f}",
        [(b, f"{named.get(b, f'region {i + 1}')}, looked at closely") for i, b in enumerate(boxes)],
        crop_ids,
    )


async def answer(state: State, ctx: RunContext) -> dict[str, Any]:
    """Emit the grounded answer: claims cite evidence ids, regions and citations attached."""
    image = image_of(state)
    evidence = evidence_of(state) + evidence_of(state, "passages")
    by_id = {e.id: e for e in evidence}
    # an image that cannot inform an answer (too small, blank, not numbers): no confident
    # answer, whatever a model said of it
    result: GroundedAnswer | None = uninformative_image(state["question"], image)
    if result is None and ctx.vlm is not None and state.get("withheld"):
        result = withheld_answer(
            state["question"], str(state["withheld"]), ctx.vlm.spec, evidence_of(state)
        )
    notes: list[str] = []
    draft: roles.AnswerDraft | None = None
    if result is None and ctx.vlm is not None and ctx.vlm.profile.defers_to_instruments:
        # a short-answer model (medloupe-mini) keeps what the instruments state outright
        composed = compose_answer(
            state["question"], image, evidence, ctx.registry, deferring_model=ctx.vlm.spec
        )
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
                image.display_artifact,
                targets=state.get("targets", []),
            )
            record_model_call(ctx, "answer", "final answer", gen, draft)
        except ModelReplyError as exc:
            notes.append(record_bad_reply(ctx, "answer", "final answer", exc))
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
            notes.append(
                f"the model's answer was rejected ({validation_problems(exc)}); composed from "
                "evidence instead"
            )
            ctx.trace.record("note", node="answer", status="error", message=notes[-1])
    if result is None:
        result = compose_answer(
            state["question"],
            image,
            evidence,
            ctx.registry,
            vlm_answer=state.get("current_answer"),
            vlm_problem=notes[-1] if ctx.vlm is not None and notes else None,
        )
    timings: dict[str, float] = {}
    started = state.get("started_at", 0.0)  # this question's (a thread may hold earlier ones)
    for ev in await asyncio.to_thread(ctx.trace.events, {"node_end"}):
        if ev.node and ev.duration_ms is not None and ev.ts >= started:
            timings[ev.node] = timings.get(ev.node, 0.0) + ev.duration_ms
    timings["total"] = (ctx.clock() - state.get("started_at", ctx.clock())) * 1000.0
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
