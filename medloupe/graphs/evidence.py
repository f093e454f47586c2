"""Evidence helpers of the diagnose graph's nodes: reading state, recording model and tool
calls in the trace, and turning looks, tool results and passages into citable evidence."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from medloupe.agents.messages import Generation, Usage
from medloupe.errors import ModelReplyError
from medloupe.graphs.context import RunContext
from medloupe.graphs.state import State
from medloupe.io.records import ImageRecord
from medloupe.options import RunOptions
from medloupe.schemas import Citation, Draft, Evidence, Region
from medloupe.tools.base import ToolContext

log = logging.getLogger(__name__)

MAX_RETHINK_REGIONS = 3


def options(state: State) -> RunOptions:
    """The run's options (validated; defaults filled in)."""
    return RunOptions.of(state.get("options"))


def image_of(state: State) -> ImageRecord:
    return ImageRecord.model_validate(state["image"])


def evidence_of(state: State, key: str = "evidence") -> list[Evidence]:
    return [Evidence.model_validate(e) for e in state.get(key, [])]  # type: ignore[attr-defined]


def record_model_call(
    ctx: RunContext, node: str, purpose: str, gen: Generation, result: Any = None
) -> None:
    """Trace one model call; ``result`` is the validated reply (a pydantic model), so a
    reviewer sees what the model said at each step."""
    _trace_model_call(
        ctx,
        node,
        purpose,
        "ok",
        gen.latency_ms,
        gen.usage,
        model=gen.model,
        attempts=gen.attempts,
        result=result.model_dump(mode="json") if result is not None else None,
    )


def record_bad_reply(ctx: RunContext, node: str, purpose: str, exc: ModelReplyError) -> str:
    """Record a model call whose reply stayed invalid; returns the note for the run."""
    usage = exc.usage if exc.usage is not None else Usage()
    _trace_model_call(ctx, node, purpose, "error", exc.latency_ms, usage, error=str(exc))
    note = f"{node}: the model's reply was unusable ({exc})"
    log.warning("%s", note)
    return note


def _trace_model_call(
    ctx: RunContext,
    node: str,
    purpose: str,
    status: str,
    duration_ms: float,
    usage: Usage,
    **fields: Any,
) -> None:
    """One ``model_call`` trace event: backend, purpose, latency, tokens, and ``fields``."""
    ctx.trace.record(
        "model_call",
        node=node,
        name=ctx.vlm.spec if ctx.vlm else None,
        status=status,
        duration_ms=duration_ms,
        purpose=purpose,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        **fields,
    )


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
    key = f"{image_of(state).content_hash}|{state['question']}|{role}|{step}"
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


async def call_tool(
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


def passage_evidence(
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


def regions_to_examine(
    state: State, draft: Draft, targets: Sequence[str] = ()
) -> list[tuple[float, float, float, float]]:
    """The boxes the second look zooms into (at most :data:`MAX_RETHINK_REGIONS`). When a
    tool found one of the question's ``targets`` (a region labelled with its name, as the
    grounder labels "Liver 1"): the best region of each target, then the first look's
    regions — where the question points, nothing else. Otherwise the first look's regions,
    then the last round's, in order."""
    names = [t.lower() for t in targets]
    # (group, target index, order): 0 a target's best region, 1 the first look's, 2 a
    # target's further regions, 3 the rest (2 and 3 only when no target was located)
    ranked: list[tuple[int, int, int, tuple[float, float, float, float]]] = []
    for roi in draft.regions:
        ranked.append((1, 0, len(ranked), roi.box_xyxy))
    step = state.get("step", 0)
    found: set[int] = set()
    for ev in evidence_of(state):
        if ev.status == "ok" and ev.step == step - 1:
            for r in ev.regions:
                if r.label == "crop":
                    continue
                label = (r.label or "").lower()
                hit = next((i for i, n in enumerate(names) if label.startswith(n)), None)
                if hit is None:
                    ranked.append((3, 0, len(ranked), r.box_xyxy))
                else:
                    ranked.append((2 if hit in found else 0, hit, len(ranked), r.box_xyxy))
                    found.add(hit)
    if found:  # the question's targets were located: look there (and where the model looked)
        ranked = [r for r in ranked if r[0] <= 1]
    seen: list[tuple[float, float, float, float]] = []
    for *_, b in sorted(ranked):
        if b not in seen:
            seen.append(b)
    return seen[:MAX_RETHINK_REGIONS]
