"""Orchestration tests: routing, loop bounds, plan repair, answer validation, concurrency and
plan review, driven by a scripted FAKE VLM (tests/fakes.py); plus the real no-VLM path."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from medloupe.agents.protocol import ModelProfile
from medloupe.agents.roles import AnswerDraft
from medloupe.config import Settings
from medloupe.graphs.context import ResourceSpec, load_resources
from medloupe.io import load_image
from medloupe.runner import create_run, execute
from medloupe.schemas import Plan, RethinkDecision
from medloupe.testing import ScriptedFakeVLM
from medloupe.tools import ToolContext, ToolResult, default_registry, tool
from medloupe.trace import TraceRecorder


def run_graph(
    settings: Settings,
    image: Path,
    vlm: Any,
    tmp_path: Path,
    *,
    registry: Any = None,
    review: Any = None,
    question: str = "Is there a nodule?",
    **options: Any,
) -> tuple[Any, Any, list]:
    run = create_run(
        load_image(image),
        question,
        settings=settings,
        out_dir=tmp_path / "run",
        options=options,
    )
    resources = load_resources(
        ResourceSpec(), registry=registry or default_registry(plugins=False), backend=vlm
    )
    answer = asyncio.run(execute(run, settings=settings, resources=resources, review=review))
    trace = TraceRecorder(run.trace_path)
    events = trace.events()
    trace.close()
    return run, answer, events


def nodes(events: list) -> list[str]:
    return [e.node for e in events if e.kind == "node_start"]


def test_no_vlm_full_graph_on_a_real_radiograph(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    run, answer, events = run_graph(settings, chest_dcm, None, tmp_path)
    assert nodes(events) == ["intake", "think", "plan", "act", "retrieve", "rethink", "answer"]
    assert answer.abstained and "No vision-language model" in answer.abstention_reason
    assert len(answer.regions) == 2  # the two regions find_regions found are shown for review
    for name in ("answer.json", "trace.json", "overlay.png", "run.json"):
        assert (run.dir / name).is_file()
    doc = json.loads((run.dir / "trace.json").read_text())
    kinds = {e["kind"] for e in doc["events"]}
    assert {
        "run_start",
        "node_start",
        "node_end",
        "tool_start",
        "tool_call",
        "plan",
        "rethink_round",
        "run_end",
    } <= kinds
    rounds = [e for e in doc["events"] if e["kind"] == "rethink_round"]
    assert len(rounds) == 1 and len(rounds[0]["payload"]["crops"]) == 2


@pytest.mark.parametrize(
    ("question", "short", "says"),
    [
        ("Is this an X-ray?", "yes", "so it is X-ray"),
        ("Is this a CT scan?", "no", "so it is not CT"),
        ("What imaging modality is this?", "radiography", "gives modality CR"),
    ],
)
def test_the_header_answers_modality_questions_without_a_vlm(
    settings: Settings, chest_dcm: Path, tmp_path: Path, question: str, short: str, says: str
) -> None:
    from medloupe import ask

    answer = ask(chest_dcm, question, out=tmp_path / "r", vlm="none", settings=settings)
    assert not answer.abstained and short in (answer.short_answer or "")
    assert answer.provenance.answer_source == "evidence-composer"
    assert any(says in c.text for c in answer.claims)


def test_rethink_loop_is_bounded_by_max_steps(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    vlm = ScriptedFakeVLM(
        rethink=lambda m, n: RethinkDecision(
            answer=f"r{n}", confidence=0.2, needs_more_evidence=True
        )
    )
    _, answer, events = run_graph(settings, chest_dcm, vlm, tmp_path, max_steps=3)
    assert nodes(events).count("act") == 3 and nodes(events).count("rethink") == 3
    assert nodes(events)[-1] == "answer"
    rounds = [e.payload for e in events if e.kind == "rethink_round"]
    assert [r["answer_after"] for r in rounds] == ["r0", "r1", "r2"]
    assert rounds[1]["answer_before"] == "r0"  # each round records what the second look changed
    assert answer.short_answer == "scripted answer"


def test_confidence_threshold_stops_the_loop(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    vlm = ScriptedFakeVLM(
        rethink=lambda m, n: RethinkDecision(
            answer="sure", confidence=0.95, needs_more_evidence=True
        )
    )
    _, _, events = run_graph(settings, chest_dcm, vlm, tmp_path, max_steps=5)
    assert nodes(events).count("rethink") == 1


def test_rethink_gets_crops_and_overview(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    vlm = ScriptedFakeVLM(
        think=lambda m, n: __import__("medloupe.schemas", fromlist=["Draft"]).Draft(
            answer="maybe",
            confidence=0.3,
            regions=[{"box_xyxy": [100, 100, 500, 600], "reason": "opacity"}],
        )
    )
    run_graph(settings, chest_dcm, vlm, tmp_path)
    rethink_msgs = next(m for role, m in vlm.calls if role == "rethink")
    images = [p.artifact for p in rethink_msgs[-1].content if p.type == "image"]
    assert images[0].startswith("overlay-") and all(a.startswith("crop-") for a in images[1:])
    assert len(images) >= 2


def test_plan_with_unknown_tool_is_repaired_then_dropped(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    bad = Plan(
        calls=[{"tool": "segment_lungs", "arguments": {}}, {"tool": "image_info", "arguments": {}}]
    )  # type: ignore[list-item]
    vlm = ScriptedFakeVLM(plan=lambda m, n: bad)
    _, answer, events = run_graph(settings, chest_dcm, vlm, tmp_path)
    plan_calls = [m for role, m in vlm.calls if role == "plan"]
    assert len(plan_calls) == 3  # first try + 2 repairs, each told what was wrong
    assert "unknown tool 'segment_lungs'" in plan_calls[1][-1].content[-1].text
    plan_event = next(e for e in events if e.kind == "plan")
    assert [c["tool"] for c in plan_event.payload["plan"]["calls"]] == ["image_info"]
    assert plan_event.status == "repaired"


def test_dangling_evidence_claim_is_rejected(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    vlm = ScriptedFakeVLM(
        answer=lambda m, n: AnswerDraft(
            short_answer="nodule",
            confidence=0.9,
            claims=[{"text": "x", "evidence_ids": ["ev-made-up"]}],
        )
    )  # type: ignore[list-item]
    _, answer, events = run_graph(settings, chest_dcm, vlm, tmp_path)
    assert answer.abstained  # fell back to the evidence composer, which cannot answer this
    assert all("ev-made-up" not in c.evidence_ids for c in answer.claims)
    assert any(e.kind == "note" and "unknown evidence id" in e.payload["message"] for e in events)


def test_unparseable_model_output_degrades_and_is_traced(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    """A model that never replies with valid JSON does not sink the run: each role falls back
    (no draft, the rule-based plan, an unchanged answer, the evidence composer) and the
    failed calls are in the trace."""
    garbage = lambda m, n: "this is not json {"  # noqa: E731
    vlm = ScriptedFakeVLM(think=garbage, plan=garbage, rethink=garbage, answer=garbage)
    run, answer, events = run_graph(settings, chest_dcm, vlm, tmp_path)
    failed = [e for e in events if e.kind == "model_call" and e.status == "error"]
    assert [e.node for e in failed] == ["think", "plan", "rethink", "answer"]
    assert all("no valid" in e.payload["error"] for e in failed)
    assert all(e.payload["error"].count("no JSON object") for e in failed)
    assert answer.abstained and "not usable" in (answer.abstention_reason or "")
    tools = {e.name for e in events if e.kind == "tool_call" and e.node == "act"}
    assert {"image_info", "find_regions"} <= tools  # the rule-based plan ran
    assert (run.dir / "answer.json").is_file() and (run.dir / "trace.json").is_file()


def test_rethink_crops_ct_regions_with_a_local_window_at_the_models_size(
    settings: Settings, ct_dcm: Path, tmp_path: Path
) -> None:
    vlm = ScriptedFakeVLM(
        profile=ModelProfile(supports_schema=True, preferred_image_side=336),
        think=lambda m, n: __import__("medloupe.schemas", fromlist=["Draft"]).Draft(
            answer="maybe",
            confidence=0.3,
            regions=[{"box_xyxy": [20, 20, 60, 50], "reason": "density"}],
        ),
    )
    _, _, events = run_graph(settings, ct_dcm, vlm, tmp_path)
    crop = next(e for e in events if e.kind == "tool_call" and e.node == "rethink")
    assert crop.payload["arguments"]["window"] == "local"
    assert crop.payload["arguments"]["zoom_to"] == 336
    assert crop.payload["arguments"]["margin"] > 0


class Pause(BaseModel):
    seconds: float


class Paused(ToolResult):
    seconds: float


@tool(description="sleep (test)")
def pause(args: Pause, ctx: ToolContext) -> Paused:
    time.sleep(args.seconds)
    return Paused(seconds=args.seconds)


def test_independent_tool_calls_run_concurrently(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    reg = default_registry(plugins=False)
    reg.register(pause)
    plan = Plan(
        calls=[{"tool": "pause", "arguments": {"seconds": 1.0 + i / 1000}} for i in range(3)]
    )  # type: ignore[misc]
    vlm = ScriptedFakeVLM(plan=lambda m, n: plan)
    _, _, events = run_graph(settings, chest_dcm, vlm, tmp_path, registry=reg)
    act = next(e for e in events if e.kind == "node_end" and e.node == "act")
    assert act.duration_ms < 2500  # three 1-second tools, not 3 s


def test_review_plan_edit_and_reject(settings: Settings, chest_dcm: Path, tmp_path: Path) -> None:
    seen: list[dict] = []

    def reviewer(payload: dict) -> dict:
        seen.append(payload)
        if len(seen) == 1:
            return {
                "action": "edit",
                "plan": {"calls": [{"tool": "measure", "arguments": {"points": [[0, 0]]}}]},
            }
        return {
            "action": "edit",
            "plan": {"calls": [{"tool": "measure", "arguments": {"box_xyxy": [0, 0, 30, 40]}}]},
        }

    _, answer, events = run_graph(
        settings, chest_dcm, None, tmp_path, review=reviewer, review_plan=True
    )
    assert len(seen) == 2 and "exactly two" in seen[1]["problem"]
    tools = [e.name for e in events if e.kind == "tool_call" and e.node == "act"]
    assert tools == ["measure"]
    _, _, events = run_graph(
        settings,
        chest_dcm,
        None,
        tmp_path / "b",
        review=lambda p: {"action": "reject"},
        review_plan=True,
    )
    assert [e for e in events if e.kind == "tool_call" and e.node == "act"] == []


def test_compiled_graph_is_exported_for_langgraph() -> None:
    from medloupe.graphs import diagnose

    root = Path(__file__).resolve().parents[2]
    spec = json.loads((root / "langgraph.json").read_text())["graphs"]["diagnose"]
    assert spec.endswith("medloupe/graphs/diagnose.py:graph")
    assert set(diagnose.graph.get_graph().nodes) >= {
        "intake",
        "think",
        "plan",
        "act",
        "retrieve",
        "rethink",
        "answer",
    }


def test_an_uninformative_image_gets_no_confident_answer(
    settings: Settings, ct_dcm: Path, tmp_path: Path
) -> None:
    """A NaN rescale slope leaves no number in the image: the run abstains with the reason
    (even though the header could name the modality), and every JSON output is strict."""
    import pydicom

    from medloupe import ask

    ds = pydicom.dcmread(ct_dcm)
    ds.RescaleSlope = "NaN"
    ds.save_as(tmp_path / "nan-slope.dcm")
    answer = ask(
        tmp_path / "nan-slope.dcm",
        "What imaging modality is this?",
        out=tmp_path / "r",
        vlm="none",
        settings=settings,
    )
    assert answer.abstained and answer.confidence == 0.0
    assert "not numbers" in (answer.abstention_reason or "")
    assert answer.provenance.answer_source == "quality-gate"

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    for name in ("run.json", "answer.json", "trace.json"):
        strict((tmp_path / "r" / name).read_text())


def test_out_at_a_file_or_an_unwritable_folder_is_an_input_error(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    import os

    from medloupe import ask
    from medloupe.errors import InputError

    afile = tmp_path / "taken.txt"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        ask(chest_dcm, "q?", out=afile, vlm="none", settings=settings)
    with pytest.raises(InputError, match="cannot write"):  # a folder inside a file
        ask(chest_dcm, "q?", out=afile / "run", vlm="none", settings=settings)
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a normal user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="cannot write"):
            ask(chest_dcm, "q?", out=locked / "run", vlm="none", settings=settings)


def test_a_second_look_that_withholds_makes_the_answer_abstain_with_its_reason(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    """FAKE VLM: the rethink says the image cannot answer; the answer abstains with that
    reason (no answer role is asked to guess), and the round records it."""
    vlm = ScriptedFakeVLM(
        rethink=lambda m, n: RethinkDecision(
            answer="yes",
            confidence=0.9,
            needs_more_evidence=True,
            withheld="the liver does not appear to be in view",
        )
    )
    run, answer, events = run_graph(
        settings, chest_dcm, vlm, tmp_path, question="Does the liver look abnormal?"
    )
    assert answer.abstained and answer.confidence == 0.0
    assert "the liver does not appear to be in view" in answer.abstention_reason
    assert "fake:scripted" in answer.abstention_reason
    assert [r for r, _ in vlm.calls].count("rethink") == 1  # withheld: no further round
    assert "answer" not in [r for r, _ in vlm.calls]
    rounds = [e for e in events if e.kind == "rethink_round"]
    assert rounds[0].payload["withheld"] == "the liver does not appear to be in view"



def test_a_withheld_reason_that_names_nothing_asked_about_is_ignored(
    settings: Settings, chest_dcm: Path, tmp_path: Path
) -> None:
    """FAKE VLM: a model with random weights fills every field; a 'not in view' that names
    nothing the question asks about does not make the run abstain: the answer role is asked."""
    vlm = ScriptedFakeVLM(
        rethink=lambda m, n: RethinkDecision(answer="yes", confidence=0.6, withheld="qz vx")
    )
    run, answer, events = run_graph(settings, chest_dcm, vlm, tmp_path)
    assert "answer" in [r for r, _ in vlm.calls]
    assert "qz vx" not in (answer.abstention_reason or "")
    rounds = [e for e in events if e.kind == "rethink_round"]
    assert rounds[0].payload["withheld"] is None

def test_the_second_look_zooms_where_the_question_points_first() -> None:
    from medloupe.graphs.evidence import regions_to_examine
    from medloupe.schemas import Draft, Evidence, Region

    def ev(i: str, tool: str, labels: list[str]) -> dict:
        regions = [
            Region(id=f"{i}-{k}", box_xyxy=(k * 10.0, 0.0, k * 10.0 + 5, 5.0), label=label)
            for k, label in enumerate(labels, start=int(i[-1]) * 10)
        ]
        return Evidence(
            id=i, kind="tool", tool=tool, step=0, summary="s", regions=regions
        ).model_dump(mode="json")

    state: Any = {
        "step": 1,
        "evidence": [
            ev("e1", "find_regions", ["dark region 1", "dark region 2"]),
            ev("e2", "ground", ["Liver 1", "Liver 2", "Liver 3"]),
            ev("e3", "ground", ["Spleen 1"]),
        ],
    }
    boxes = regions_to_examine(state, Draft(), ["Liver", "Spleen"])
    # each target's best box, and nothing the question does not point to
    assert boxes == [(200.0, 0.0, 205.0, 5.0), (300.0, 0.0, 305.0, 5.0)]
    assert regions_to_examine(state, Draft(), ["Heart"])[0] == (100.0, 0.0, 105.0, 5.0)
    assert regions_to_examine(state, Draft())[0] == (100.0, 0.0, 105.0, 5.0)  # no targets
