from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from medloupe.artifacts import ArtifactStore
from medloupe.errors import DuplicateToolError, ToolArgumentsError, UnknownToolError
from medloupe.io import load_image
from medloupe.runner import ingest_image
from medloupe.tools import (
    Availability,
    ToolContext,
    ToolRegistry,
    ToolResult,
    default_registry,
    tool,
)


def make_ctx(path: Path, tmp_path: Path) -> ToolContext:
    store = ArtifactStore(tmp_path / "run")
    return ToolContext(image=ingest_image(load_image(path), store), store=store)


class SleepArgs(BaseModel):
    seconds: float = 0.0


class SleepOut(ToolResult):
    slept: float


@tool(description="Sleep for a while (test tool).")
def nap(args: SleepArgs, ctx: ToolContext) -> SleepOut:
    time.sleep(args.seconds)
    return SleepOut(slept=args.seconds)


@tool(description="Always raises (test tool).")
def broken(args: SleepArgs, ctx: ToolContext) -> SleepOut:
    raise RuntimeError("the instrument is broken")


def test_duplicate_names_fail() -> None:
    reg = ToolRegistry([nap])
    with pytest.raises(DuplicateToolError, match="'nap' is already registered"):
        reg.register(nap)


def test_unknown_name_has_did_you_mean() -> None:
    reg = default_registry(plugins=False)
    with pytest.raises(UnknownToolError, match=r"did you mean 'find_regions'"):
        reg.get("find_region")


def test_malformed_arguments_fail_with_schema_message() -> None:
    reg = default_registry(plugins=False)
    with pytest.raises(ToolArgumentsError, match="box_xyxy") as info:
        reg.validate("crop", {"box_xyxy": [1, 2]})
    assert "crop" in str(info.value)
    with pytest.raises(ToolArgumentsError, match="x0 < x1"):
        reg.validate("crop", {"box_xyxy": [10, 10, 5, 20]})


def test_decorator_derives_schema_from_types() -> None:
    d = nap.describe()
    assert d["input_schema"]["properties"]["seconds"]["type"] == "number"
    assert "slept" in d["output_schema"]["properties"]
    with pytest.raises(TypeError, match="pydantic BaseModel"):

        @tool(description="bad")
        def untyped(args, ctx):  # type: ignore[no-untyped-def]
            return None


def test_registry_decorator_registers() -> None:
    reg = ToolRegistry()

    @reg.tool(description="registered directly")
    def hello(args: SleepArgs, ctx: ToolContext) -> SleepOut:
        return SleepOut(slept=0)

    assert reg.names() == ["hello"]


def test_errors_and_timeouts_become_evidence(chest_dcm: Path, tmp_path: Path) -> None:
    reg = ToolRegistry([nap, broken])
    ctx = make_ctx(chest_dcm, tmp_path)

    async def go() -> list:
        return list(
            await asyncio.gather(
                reg.call("nap", {"seconds": 2}, ctx, default_timeout_s=0.3),
                reg.call("broken", {}, ctx, default_timeout_s=5),
                reg.call("nap", {"seconds": "soon"}, ctx, default_timeout_s=5),
                reg.call("naps", {}, ctx, default_timeout_s=5),
            )
        )

    timed_out, raised, invalid, unknown = asyncio.run(go())
    assert timed_out.status == "error" and "timed out after 0.3 s" in timed_out.error
    assert raised.status == "error" and "the instrument is broken" in raised.error
    assert invalid.status == "error" and "ToolArgumentsError" in invalid.error
    assert unknown.status == "error" and "did you mean 'nap'" in unknown.error


def test_unavailable_tool_says_why(chest_dcm: Path, tmp_path: Path) -> None:
    @tool(
        description="needs weights",
        available=lambda: Availability(False, "checkpoint missing: set X"),
    )
    def weighty(args: SleepArgs, ctx: ToolContext) -> SleepOut:
        return SleepOut(slept=0)

    reg = ToolRegistry([weighty])
    ev = asyncio.run(reg.call("weighty", {}, make_ctx(chest_dcm, tmp_path), default_timeout_s=5))
    assert ev.status == "error" and "checkpoint missing: set X" in ev.error
    assert reg.catalogue() == []


def test_evidence_ids_are_stable(chest_dcm: Path, tmp_path: Path) -> None:
    reg = default_registry(plugins=False)
    ctx = make_ctx(chest_dcm, tmp_path)
    a = asyncio.run(reg.call("image_info", {}, ctx, default_timeout_s=30))
    b = asyncio.run(reg.call("image_info", {}, ctx, default_timeout_s=30))
    assert a.id == b.id and a.status == "ok"


def test_find_regions_finds_both_lung_fields(chest_dcm: Path, tmp_path: Path) -> None:
    reg = default_registry(plugins=False)
    ev = asyncio.run(
        reg.call("find_regions", {}, make_ctx(chest_dcm, tmp_path), default_timeout_s=60)
    )
    assert ev.status == "ok" and len(ev.regions) == 2
    centres = sorted((r.box_xyxy[0] + r.box_xyxy[2]) / 2 for r in ev.regions)
    # one region in each half of the 1841-px-wide chest, each several hundred px tall
    assert centres[0] < 920 < centres[1]
    assert all(r.box_xyxy[3] - r.box_xyxy[1] > 800 for r in ev.regions)
    assert all(r.evidence_id == ev.id and r.tool == "find_regions" for r in ev.regions)


def test_crop_clamps_and_stores_artifact(chest_dcm: Path, tmp_path: Path) -> None:
    reg = default_registry(plugins=False)
    ctx = make_ctx(chest_dcm, tmp_path)
    ev = asyncio.run(
        reg.call(
            "crop",
            {"box_xyxy": [1700, 1800, 1900, 2100], "zoom_to": 256},
            ctx,
            default_timeout_s=30,
        )
    )
    assert ev.status == "ok"
    x0, y0, x1, y1 = ev.output["crop_box_xyxy"]
    assert x1 == 1841 and y1 == 1955  # clamped to the image
    crop = ctx.store.load(ev.artifacts[0])
    assert max(crop.shape[:2]) == 256
    outside = asyncio.run(
        reg.call("crop", {"box_xyxy": [5000, 5000, 5100, 5100]}, ctx, default_timeout_s=30)
    )
    assert outside.status == "error" and "outside" in outside.error


def test_measure_mm_with_spacing_and_px_without(
    ct_dcm: Path, chest_dcm: Path, tmp_path: Path
) -> None:
    reg = default_registry(plugins=False)
    ct = asyncio.run(
        reg.call(
            "measure",
            {"points": [[0, 0], [100, 0]]},
            make_ctx(ct_dcm, tmp_path / "a"),
            default_timeout_s=30,
        )
    )
    assert ct.output["unit"] == "mm" and ct.output["distance"] == pytest.approx(47.8516)
    cr = asyncio.run(
        reg.call(
            "measure",
            {"box_xyxy": [0, 0, 30, 40]},
            make_ctx(chest_dcm, tmp_path / "b"),
            default_timeout_s=30,
        )
    )
    assert cr.output["unit"] == "px" and cr.output["diagonal"] == pytest.approx(50.0)
    assert "spacing unknown" in cr.output["warning"]


def test_window_presets_on_ct(ct_dcm: Path, tmp_path: Path) -> None:
    reg = default_registry(plugins=False)
    ctx = make_ctx(ct_dcm, tmp_path)
    bone = asyncio.run(reg.call("window", {"preset": "bone"}, ctx, default_timeout_s=30))
    brain = asyncio.run(reg.call("window", {"preset": "brain"}, ctx, default_timeout_s=30))
    assert bone.status == brain.status == "ok"
    a, b = ctx.store.load(bone.artifacts[0]), ctx.store.load(brain.artifacts[0])
    assert a.mean() < b.mean()  # a wide bone window shows soft tissue darker than a brain window
    assert not reg.get("window").suits("CR")
