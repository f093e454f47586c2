"""medloupe-mini as a VLM backend: spec ``mini:`` (the answerer shipped in the package, or
``Settings.mini``) or ``mini:/path/to/folder``.

It answers short questions; it does not write plans (its profile's ``writes_plans`` is
false: the graph uses its rule-based plan) or prose, and where the instruments answer the
question outright (header facts, counts, grounded boxes) the graph keeps their answer
(``defers_to_instruments``). Per role (:meth:`MiniBackend.play` reads the typed
:class:`~medloupe.agents.protocol.RoleRequest`):

- think: the answerer on the whole image -> a :class:`~medloupe.schemas.Draft`;
- rethink: the answerer on each zoomed crop; its answers are reported in the decision's note
  while the whole-image answer is kept (crop answers were less accurate on held-out training
  images) -> a :class:`~medloupe.schemas.RethinkDecision` (never asks for more evidence);
  when the question takes one named structure for granted ("Does the liver look abnormal?")
  the answerer is first asked whether the whole image contains it, and a confident "no"
  withholds the answer ("not in view") instead of guessing;
- answer: the current answer, its claim citing the model's own looks (observation evidence,
  with the regions it examined) and any tool evidence that states the answer outright.

Served over the OpenAI-compatible API (``medloupe serve-vlm mini``, :meth:`complete`), it
answers the question of the last user message (its ``Question:`` line, else its whole text)
about that message's last image: plain text, or ``{"answer", "confidence"}`` when a
``response_format`` asks for JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from medloupe.agents.messages import ChatMessage, Completion, Generation, ImagePart, Usage
from medloupe.agents.protocol import ModelProfile, RoleRequest, VLMBackend
from medloupe.agents.roles import AnswerDraft
from medloupe.artifacts import ArtifactStore
from medloupe.config import env_name
from medloupe.errors import BackendError, BackendSpecError, InputError
from medloupe.mini import BUNDLED, model_folder
from medloupe.mini.answerer import MiniAnswerer, Prediction
from medloupe.mini.tool import named_targets
from medloupe.schemas import Claim, Draft, RethinkDecision
from medloupe.tools.markers import marker_in
from medloupe.tools.position import relation_from_question, split_relation

# Presence check of the second look: "no" at this confidence or more means "not in view".
# Chosen on SLAKE's validate split (never its test split): of 98 "Does the picture contain
# X?" questions, the answerer said "no" with >= 0.8 to 13, 12 of them truly absent.
ABSENT_AT = 0.8
_ABOUT_PRESENCE = re.compile(
    r"\b(contain|contains|there|any|exist|exists|present|visible|seen|see|observed|show|shows|"
    r"include|includes|where|locate|find|box|left of|right of|above|below)\b",
    re.I,
)


def presupposes(question: str) -> bool:
    """Whether a question takes for granted that what it names is in view ("Is the liver
    healthy?"), unlike one that asks whether, or where, it is ("Is there a liver?", "Where is
    the liver?", "Is the liver left of the spleen?")."""
    return not _ABOUT_PRESENCE.search(question)


def presence_name(target: str) -> str:
    """How a presence question names a target: lower case, without its side ("Left Lung" ->
    "lung")."""
    return target.lower().removeprefix("left ").removeprefix("right ")


# on relative-position questions the answerer, trained on upright slices, was below chance
# (MIRP rotates and flips slices): the grounder's or find_markers' boxes decide, or the
# answer abstains
RELATIVE_NOTE = (
    "medloupe-mini does not judge relative positions from the whole image: the boxes of both "
    "structures or markers (the grounder's, find_markers') decide"
)


class MiniBackend(VLMBackend):
    """The answerer of ``folder`` behind the VLM backend contract."""

    profile = ModelProfile(
        writes_plans=False,
        defers_to_instruments=True,
        preferred_image_side=224,
        supports_schema=True,  # served: {"answer", "confidence"} objects
    )

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = model_folder(folder or None)
        if not (self.folder / "answerer.json").is_file():
            raise BackendSpecError(
                f"no medloupe-mini answerer in {self.folder} (answerer.json missing); train one "
                f"with `medloupe train mini --data ../shared/datasets --out DIR` and use "
                f"mini:DIR (or set {env_name('mini')}=DIR)"
            )
        self.answerer = MiniAnswerer(self.folder)
        self._lock = threading.Lock()  # one prediction at a time (CPU model)

    def load(self) -> None:
        """Load the weights now (``serve-vlm`` fails at start, not on the first request)."""
        self.answerer.load()

    @property
    def spec(self) -> str:
        if self.folder == BUNDLED:
            return "mini:"
        return f"mini:{self.folder}"

    def _predict(self, store: ArtifactStore, artifact: str, question: str) -> Prediction:
        rgb = store.load(artifact)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        with self._lock:
            return self.answerer.predict(np.ascontiguousarray(rgb[..., :3]), question)

    async def complete(
        self,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Completion:
        """Answer an OpenAI-style request (see the module docstring); ``max_tokens`` and
        ``temperature`` do not apply to a classifier and are ignored."""
        question, artifact = served_question(messages)
        p = await asyncio.to_thread(self._predict, store, artifact, question)
        text = p.answer
        if json_schema is not None:
            text = json.dumps(fill_schema(json_schema, p.answer, p.confidence))
        # what the classifier read: the question's tokens (its own encoder) and one image
        usage = await asyncio.to_thread(
            lambda: Usage(
                prompt_tokens=self.answerer.count_tokens(question) + 1,
                completion_tokens=self.answerer.count_tokens(p.answer),
            )
        )
        return Completion(
            text=text,
            usage=usage,
            model="medloupe-mini",
            constrained=json_schema is not None,
        )

    async def play(
        self,
        request: RoleRequest,
        messages: list[ChatMessage],
        *,
        store: ArtifactStore,
        schema: type[BaseModel],
    ) -> Generation:
        """Play a graph role from its typed request (the prompt's prose is not read)."""
        started = time.perf_counter()
        reply: BaseModel
        positional = split_relation(request.question) is not None
        if request.role == "think" and schema is Draft and request.images:
            if positional:
                reply = Draft(note=RELATIVE_NOTE)
            else:
                p = await asyncio.to_thread(
                    self._predict, store, request.images[0], request.question
                )
                reply = Draft(answer=p.answer, confidence=p.confidence, note=p.basis)
        elif request.role == "rethink" and schema is RethinkDecision and request.images:
            reply = (
                RethinkDecision(note=RELATIVE_NOTE)
                if positional
                else await self._rethink(request, store)
            )
        elif request.role == "answer" and schema is AnswerDraft:
            reply = _answer(request)
        else:
            raise BackendError(
                f"{self.spec} answers think/rethink/answer requests only (got role "
                f"{request.role!r}, schema {schema.__name__})"
            )
        return Generation(
            text=reply.model_dump_json(),
            parsed=reply,
            usage=Usage(prompt_tokens=0, completion_tokens=0),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            model="medloupe-mini",
        )

    async def _in_view(self, request: RoleRequest, store: ArtifactStore) -> str | None:
        """Why the question cannot be answered, when it takes for granted one structure
        ("Does the liver look abnormal?") that the answerer, asked "Does the picture contain
        liver?" about the whole image, says is absent with confidence >= :data:`ABSENT_AT`;
        else ``None``. Not asked of questions about presence or position themselves."""
        names = {presence_name(t) for t in request.targets}
        if len(names) != 1 or request.image is None or not presupposes(request.question):
            return None
        (name,) = names
        p = await asyncio.to_thread(
            self._predict, store, request.image, f"Does the picture contain {name}?"
        )
        if p.answer.strip().lower() == "no" and p.confidence >= ABSENT_AT:
            return (
                f"the {name} does not appear to be in view (medloupe-mini: absent, "
                f"confidence {p.confidence:.2f})"
            )
        return None

    async def _rethink(self, request: RoleRequest, store: ArtifactStore) -> RethinkDecision:
        # images: the overview with the regions drawn, then the zoomed crops
        absent = await self._in_view(request, store)
        looks = []
        for crop in request.images[1:]:
            p = await asyncio.to_thread(self._predict, store, crop, request.question)
            looks.append((p.answer, p.confidence))
        said = "; ".join(f"crop {i + 1}: {a!r} ({c:.2f})" for i, (a, c) in enumerate(looks))
        kept: str | None
        if request.answer is None and looks:  # no first look to keep: the most confident crop
            kept, kept_conf = max(looks, key=lambda t: t[1])
        else:
            # The answerer learnt from whole images; on held-out training images its crop
            # answers (by maximum or mean confidence) were less accurate than the whole
            # image's (0.605-0.619 against 0.633), and a yes/no head trained on the whole
            # image and the grounder's zoomed target together lost to the whole-image answer
            # out of fold on SLAKE questions naming a target (0.689 vs 0.795, McNemar p 9e-10;
            # benchmarks/bench_mini_crop.py), so the crops are reported, not voted.
            kept, kept_conf = request.answer, request.confidence
        return RethinkDecision(
            answer=kept,
            confidence=kept_conf,
            note=(f"medloupe-mini on the crops: {said}" if said else "no crops")[:500],
            withheld=absent,
        )


def _answer(request: RoleRequest) -> AnswerDraft:
    """The final answer: the current answer, its claim citing the model's own looks."""
    current, conf = request.answer, request.confidence
    cited = request.observation_ids
    if split_relation(request.question) is not None:
        return AnswerDraft(confidence=0.0, abstained=True, abstention_reason=_unplaced(request))
    if current is None or not cited:
        return AnswerDraft(
            confidence=0.0,
            abstained=True,
            abstention_reason="medloupe-mini gave no answer it could cite",
        )
    return AnswerDraft(
        short_answer=current,
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


def _unplaced(request: RoleRequest) -> str:
    """Why a relative-position question goes unanswered: the side(s) named in words that no
    tool can locate (none of ``request.targets``: "the aorta"), else that the boxes of both
    were not found."""
    named = relation_from_question(request.question)
    sides = () if named is None else (named[0], named[2])
    unknown = [
        side[:30]
        for side in sides
        if marker_in(side) is None and not named_targets(side, request.targets)
    ]
    if unknown:
        return (
            f"{RELATIVE_NOTE}, and no tool here is trained to locate the "
            f"{' or the '.join(unknown)} (see `medloupe tools`)"
        )
    return (
        f"{RELATIVE_NOTE}, and they did not locate both (see the ground tool's targets; "
        "find_markers finds only dots and labels on the image)"
    )


_QUESTION_LINE = re.compile(r"^\s*question\s*:\s*(.+)$", re.I | re.M)
_FILLABLE = {"answer": "answer", "short_answer": "answer", "confidence": "confidence"}


def served_question(messages: list[ChatMessage]) -> tuple[str, str]:
    """(question, image artifact) of an OpenAI-style request: the last user message's
    ``Question:`` line (else its whole text) and its last image.

    Raises:
        InputError: no user message, no question text or no image.
    """
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise InputError("medloupe-mini needs a user message with a question and an image")
    last = users[-1]
    text = "\n".join(p.text for p in last.content if not isinstance(p, ImagePart)).strip()
    images = [p.artifact for p in last.content if isinstance(p, ImagePart)]
    if not images:
        raise InputError(
            "medloupe-mini answers questions about an image: add an image_url part (a base64 "
            "data: URI) to the last user message"
        )
    m = _QUESTION_LINE.search(text)
    question = (m.group(1) if m else text).strip()
    if not question:
        raise InputError("the last user message has no question text")
    return question, images[-1]


def fill_schema(schema: dict[str, Any], answer: str, confidence: float) -> dict[str, Any]:
    """The reply object for a requested JSON schema: medloupe-mini fills ``answer`` (or
    ``short_answer``) and ``confidence``.

    Raises:
        InputError: the schema requires a field medloupe-mini cannot fill (named).
    """
    values = {"answer": answer, "confidence": round(confidence, 4)}
    props = schema.get("properties")
    if not isinstance(props, dict):  # json_object or a schema without properties
        return values
    required = set(schema.get("required") or [])
    missing = sorted(required - set(_FILLABLE))
    if missing:
        raise InputError(
            f"medloupe-mini fills only answer/short_answer and confidence; the response_format "
            f"schema also requires {', '.join(missing)}"
        )
    return {k: values[_FILLABLE[k]] for k in props if k in _FILLABLE}


def from_spec(rest: str) -> MiniBackend:
    """``mini:FOLDER``; ``mini:`` uses ``Settings.mini`` or the answerer shipped in the
    package."""
    return MiniBackend(rest or None)
