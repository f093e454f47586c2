"""medloupe-mini as a VLM backend: spec ``mini:/path/to/answerer-folder``.

It answers short questions; it does not write plans (``plans = False``: the graph uses its
rule-based plan) or prose. Per role (read from the message's ``hints``):

- think: the answerer on the whole image -> a :class:`~medloupe.schemas.Draft`;
- rethink: the answerer on each zoomed crop; its answers are reported in the decision's note
  while the whole-image answer is kept (crop answers were less accurate on held-out training
  images) -> a :class:`~medloupe.schemas.RethinkDecision` (never asks for more evidence);
- answer: the current answer, its claim citing the model's own looks (observation evidence,
  with the regions it examined) and any tool evidence that states the answer outright.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from medloupe.agents.protocol import ChatMessage, Generation, ImagePart, Usage
from medloupe.artifacts import ArtifactStore
from medloupe.errors import BackendError, BackendSpecError

MINI_ENV = "MEDLOUPE_MINI"


class MiniBackend:
    """The answerer of ``folder`` behind the VLM backend protocol."""

    plans = False

    def __init__(self, folder: str | Path) -> None:
        from medloupe.mini.answerer import MiniAnswerer

        self.folder = Path(folder).expanduser()
        if not (self.folder / "answerer.json").is_file():
            raise BackendSpecError(
                f"no medloupe-mini answerer in {self.folder} (answerer.json missing); train one "
                "with `medloupe train mini --data ../shared/datasets --out DIR`"
            )
        self.answerer = MiniAnswerer(self.folder)
        self._lock = threading.Lock()  # one prediction at a time (CPU model)

    @property
    def spec(self) -> str:
        return f"mini:{self.folder}"

    @property
    def preferred_image_side(self) -> int:
        return 224

    def _predict(self, store: ArtifactStore, artifact: str, question: str) -> tuple[str, float]:
        rgb = store.load(artifact)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        with self._lock:
            p = self.answerer.predict(np.ascontiguousarray(rgb[..., :3]), question)
        return p.answer, p.confidence

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        schema: type[BaseModel] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Generation:
        from medloupe.agents.roles import AnswerDraft
        from medloupe.schemas import Claim, Draft, RethinkDecision

        started = time.perf_counter()
        last = messages[-1]
        hints = last.hints
        role = hints.get("role")
        question = str(hints.get("question") or "")
        images = [p.artifact for p in last.content if isinstance(p, ImagePart)]
        reply: BaseModel
        if role == "think" and schema is Draft and images:
            ans, conf = await asyncio.to_thread(self._predict, store, images[0], question)
            reply = Draft(answer=ans, confidence=conf)
        elif role == "rethink" and schema is RethinkDecision and images:
            # images: the overview with the regions drawn, then the zoomed crops
            looks = [await asyncio.to_thread(self._predict, store, a, question) for a in images[1:]]
            current = hints.get("answer")
            said = "; ".join(f"crop {i + 1}: {a!r} ({c:.2f})" for i, (a, c) in enumerate(looks))
            kept: str | None
            if current is None and looks:  # no first look to keep: the most confident crop
                kept, kept_conf = max(looks, key=lambda t: t[1])
            else:
                # The answerer learnt from whole images; on held-out training images its crop
                # answers (by maximum or mean confidence) were less accurate than the whole
                # image's (0.605-0.619 against 0.633), so the crops are reported, not voted.
                kept = None if current is None else str(current)
                kept_conf = float(hints.get("confidence") or 0.0)
            reply = RethinkDecision(
                answer=kept,
                confidence=kept_conf,
                note=(f"medloupe-mini on the crops: {said}" if said else "no crops")[:500],
            )
        elif role == "answer" and schema is AnswerDraft:
            current = hints.get("answer")
            conf = float(hints.get("confidence") or 0.0)
            cited = list(hints.get("observation_ids") or [])
            if current is None or not cited:
                reply = AnswerDraft(
                    confidence=0.0,
                    abstained=True,
                    abstention_reason="medloupe-mini gave no answer it could cite",
                )
            else:
                reply = AnswerDraft(
                    short_answer=str(current),
                    explanation=(
                        "medloupe-mini (a small model trained on VQA-RAD and SLAKE train splits) "
                        "answered from the whole image and the zoomed regions it examined."
                    ),
                    confidence=conf,
                    claims=[
                        Claim(
                            text=f"medloupe-mini answers {current!r} (confidence {conf:.2f}).",
                            evidence_ids=cited[-2:],
                        )
                    ],
                )
        else:
            raise BackendError(
                f"{self.spec} answers think/rethink/answer requests only (got role {role!r}, "
                f"schema {getattr(schema, '__name__', None)})"
            )
        return Generation(
            text=reply.model_dump_json(),
            parsed=reply,
            usage=Usage(prompt_tokens=0, completion_tokens=0),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            model="medloupe-mini",
        )


def from_spec(rest: str) -> MiniBackend:
    """``mini:FOLDER`` (or ``mini:`` with ``$MEDLOUPE_MINI``)."""
    folder = rest or os.environ.get(MINI_ENV, "")
    if not folder:
        raise BackendSpecError(
            f"give the answerer folder: mini:/path/to/folder (or set {MINI_ENV})"
        )
    return MiniBackend(folder)
