"""Builds a tiny third-party distribution, `medloupe-testplugin`, as a real wheel and installs it
with pip into a target folder: a tool (`slow_probe`) and a scripted FAKE VLM backend (`scripted`),
both exposed through entry points only. No medloupe file is edited."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

PLUGIN_SOURCE = '''
from __future__ import annotations

import re
import time

from pydantic import BaseModel, Field

from medloupe.agents.messages import Completion, TextPart, Usage
from medloupe.agents.protocol import ModelProfile, VLMBackend
from medloupe.agents.roles import AnswerDraft
from medloupe.schemas import Draft, Plan, RethinkDecision
from medloupe.tools import ToolContext, ToolResult, tool


class ProbeArgs(BaseModel):
    seconds: float = Field(default=0.0, ge=0.0, le=30.0)


class ProbeResult(ToolResult):
    mean_intensity: float
    slept_s: float


@tool(description="Mean intensity of the image after an optional pause (third-party test tool).")
def slow_probe(args: ProbeArgs, ctx: ToolContext) -> ProbeResult:
    time.sleep(args.seconds)
    return ProbeResult(mean_intensity=float(ctx.gray().mean()), slept_s=args.seconds)


class ScriptedFakeBackend(VLMBackend):
    """FAKE VLM for tests: deterministic scripted replies, no model."""

    profile = ModelProfile(supports_schema=True)

    def __init__(self, target: str) -> None:
        self.seconds = float(target or 0)

    @property
    def spec(self) -> str:
        return f"scripted:{self.seconds:g}"

    async def complete(self, messages, *, store, json_schema=None, max_tokens=512, temperature=0.0):
        text = " ".join(p.text for m in messages for p in m.content if isinstance(p, TextPart))
        title = (json_schema or {}).get("title")
        if title == "Draft":
            reply = Draft(answer="scripted draft", confidence=0.4,
                          regions=[{"box_xyxy": [100, 100, 600, 700], "reason": "scripted"}])
        elif title == "Plan":
            reply = Plan(calls=[
                {"tool": "image_info", "arguments": {}},
                {"tool": "slow_probe", "arguments": {"seconds": self.seconds}},
            ])
        elif title == "RethinkDecision":
            reply = RethinkDecision(answer="scripted answer", confidence=0.9)
        else:
            ids = re.findall(r"^- (ev-[\\w-]+) \\[", text, flags=re.M)
            probe = [i for i in ids if i.startswith("ev-slow_probe")]
            reply = AnswerDraft(short_answer="scripted answer", confidence=0.9,
                                claims=[{"text": "probe measured the image", "evidence_ids": probe[:1]}])
        return Completion(text=reply.model_dump_json(), usage=Usage(prompt_tokens=len(text) // 4,
                          completion_tokens=10), model="scripted", constrained=True)


def backend(target: str) -> ScriptedFakeBackend:
    return ScriptedFakeBackend(target)
'''


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(out_dir: Path) -> Path:
    """Write ``medloupe_testplugin-0.1-py3-none-any.whl`` into ``out_dir``."""
    dist = "medloupe_testplugin-0.1.dist-info"
    files = {
        "medloupe_testplugin/__init__.py": PLUGIN_SOURCE.encode(),
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: medloupe-testplugin\nVersion: 0.1\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: medloupe-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": (
            b"[medloupe.tools]\nslow_probe = medloupe_testplugin:slow_probe\n\n"
            b"[medloupe.vlm_backends]\nscripted = medloupe_testplugin:backend\n"
        ),
    }
    record = [_record_line(n, d) for n, d in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / "medloupe_testplugin-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def install_plugin(tmp: Path) -> Path:
    """Build the wheel and ``pip install --target`` it; returns the folder to put on sys.path."""
    wheel = build_wheel(tmp / "wheels")
    target = tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    return target
