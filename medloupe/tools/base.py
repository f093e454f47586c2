"""The tool protocol: typed inputs and outputs, availability, and the ``@tool`` decorator.

A tool is an object with a ``name``, a ``description``, a pydantic ``input_model`` and
``output_model`` (its JSON schemas come from these types), the ``modalities`` it suits
(``None``: any), what it ``requires`` (weights, device) and ``available()`` with a reason.
``run(args, ctx)`` gets validated arguments and a :class:`ToolContext` that gives the run's
image and artifact store. Weights load lazily inside ``run`` (or a cached helper it calls),
never at import or construction.

Write one with the decorator::

    from pydantic import BaseModel
    from medloupe.tools import ToolContext, ToolResult, tool

    class EdgeArgs(BaseModel):
        sigma: float = 1.0

    class EdgeResult(ToolResult):
        mean_gradient: float

    @tool(description="Mean gradient magnitude of the image.", modalities={"CT", "MR"})
    def edge_strength(args: EdgeArgs, ctx: ToolContext) -> EdgeResult:
        ...

and expose it to medloupe from your own distribution with an entry point::

    [project.entry-points."medloupe.tools"]
    edges = "my_package.tools:edge_strength"
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

import numpy as np
from pydantic import BaseModel, Field

from medloupe.artifacts import ArtifactStore
from medloupe.io.records import ImageRecord
from medloupe.schemas import Box, Claim, Evidence, Region

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")


class ToolResult(BaseModel):
    """Base for tool output models: regions and artifacts the graph lifts into evidence."""

    regions: list[Region] = Field(default_factory=list)
    artifacts: list[str] = Field(default_factory=list, description="artifact ids produced")

    def summary(self) -> str:
        """One line for traces and prompts. Override for something better than the fields."""
        data = self.model_dump(mode="json", exclude={"regions", "artifacts"})
        text = ", ".join(f"{k}={v}" for k, v in data.items())
        if self.regions:
            text += f"{', ' if text else ''}{len(self.regions)} region(s)"
        return text[:500]


@dataclass(frozen=True)
class Requirements:
    """What a tool needs to run.

    Attributes:
        weights: names or paths of the weight files it loads (informational; ``available``
            decides).
        device: ``"any"``, ``"cpu"`` or ``"cuda"``.
    """

    weights: tuple[str, ...] = ()
    device: Literal["any", "cpu", "cuda"] = "any"

    def as_dict(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "device": self.device}


@dataclass(frozen=True)
class Availability:
    """Whether a tool can run here, and why (not)."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class Statement:
    """What a tool's evidence states outright about a question (the evidence composer keeps
    it over a guess).

    Attributes:
        parts: the answer's parts (joined by ``"; "`` with other tools' parts).
        claims: each citing the evidence that states it.
        regions: the boxes that answer a "locate" question (they lead the answer's regions;
            one located answer per question, the first tool's).
        confidence: how sure the statement is (the answer takes the lowest).
    """

    parts: tuple[str, ...]
    claims: tuple[Claim, ...]
    regions: tuple[Region, ...] = ()
    confidence: float = 0.95


def successful(evidence: list[Evidence], tool_name: str) -> list[Evidence]:
    """The evidence of ``tool_name``'s calls that succeeded, in order."""
    return [e for e in evidence if e.tool == tool_name and e.status == "ok"]


def box_text(box: Box) -> str:
    """``[x0, y0, x1, y1]`` in whole pixels, as answers and claims print boxes."""
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


StatesFn = Callable[[str, list[Evidence]], Statement | None]
SuggestFn = Callable[[str, ImageRecord], dict[str, Any] | None]
FollowUpFn = Callable[[Box, str], dict[str, Any] | None]


@dataclass
class ToolContext:
    """What a running tool sees: the run's image and artifact store, and whether the run
    looks again closer (``second_look``: a tool with a zoomed second pass of its own, like the
    grounder's, runs it; off in the ablation without a second look).

    Pixels are loaded from the store on first access and cached for the call.
    """

    image: ImageRecord
    store: ArtifactStore
    second_look: bool = True
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def pixels(self) -> np.ndarray:
        """Display image: ``uint8`` ``(H, W)`` grayscale or ``(H, W, 3)`` RGB."""
        if "display" not in self._cache:
            if self.image.display_artifact is None:
                raise RuntimeError("the image record has no display artifact; ingest it first")
            self._cache["display"] = self.store.load(self.image.display_artifact)
        return self._cache["display"]

    def rgb(self) -> np.ndarray:
        """Display image as ``uint8`` ``(H, W, 3)`` RGB."""
        px = self.pixels()
        return px if px.ndim == 3 else np.repeat(px[:, :, None], 3, axis=2)

    def gray(self) -> np.ndarray:
        """Display image as ``uint8`` ``(H, W)`` (luma for colour images)."""
        px = self.pixels()
        if px.ndim == 2:
            return px
        if "gray" not in self._cache:  # Pillow's ITU-R 601-2 luma: no float copy of the image
            from PIL import Image

            self._cache["gray"] = np.asarray(
                Image.fromarray(np.ascontiguousarray(px[..., :3])).convert("L")
            )
        return self._cache["gray"]

    def raw(self) -> np.ndarray | None:
        """``float32`` ``(H, W)`` modality values (HU for CT), or ``None`` if the image has none."""
        if self.image.raw_artifact is None:
            return None
        if "raw" not in self._cache:
            self._cache["raw"] = self.store.load(self.image.raw_artifact)
        return self._cache["raw"]


@functools.lru_cache(maxsize=512)
def _schema_json(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema())


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema, a new dict each call (built once per model class: pydantic
    takes milliseconds per schema, and every plan prompt lists every tool's)."""
    return json.loads(_schema_json(model))


class Tool(ABC):
    """Base class of tools. Subclass it, or use the :func:`tool` decorator on a function."""

    name: str
    description: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    modalities: frozenset[str] | None = None
    requires: Requirements = Requirements()
    timeout_s: float | None = None

    def available(self) -> Availability:
        """Whether the tool can run here. Must be cheap: no weight loading."""
        return Availability(True, "ready")

    def suits(self, modality: str | None) -> bool:
        """Whether the tool is meant for images of ``modality`` (case-insensitive)."""
        if self.modalities is None or modality is None:
            return True
        return modality.upper() in {m.upper() for m in self.modalities}

    def suggest(
        self, question: str, image: ImageRecord
    ) -> dict[str, Any] | list[dict[str, Any]] | None:
        """Arguments for a call the rule-based planner (used when no VLM plans) should make
        for ``question`` about ``image`` (a list: several calls), or ``None`` (the default:
        only a model plans it). Must be cheap and must not look at pixels."""
        return None

    def targets(self, question: str) -> list[str]:
        """What this tool can locate that ``question`` names (an organ, a finding, a cell
        type), in the question's order; the graph looks there first and offers them to a
        model planner (default: none). Must be cheap and must not look at pixels."""
        return []

    def follow_up(self, box: Box, reason: str) -> dict[str, Any] | None:
        """Arguments for a call that examines ``box`` (XYXY pixels), a region the first look
        picked for ``reason``; the rule-based planner asks every tool (default: ``None``)."""
        return None

    def states(self, question: str, evidence: list[Evidence]) -> Statement | None:
        """What this tool's successful evidence among ``evidence`` states outright about
        ``question`` (the answer, claims citing the evidence), or ``None`` (the default: its
        output is evidence for a model to weigh, not an answer)."""
        return None

    @abstractmethod
    def run(self, args: BaseModel, ctx: ToolContext) -> BaseModel | Awaitable[BaseModel]:
        """Run on validated ``args``. May be a coroutine function (then it must not block)."""

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.run)

    def describe(self) -> dict[str, Any]:
        """Name, description, JSON schemas of input and output, modalities, requirements."""
        return {
            "name": self.name,
            "description": self.description,
            "modalities": sorted(self.modalities) if self.modalities is not None else None,
            "requires": self.requires.as_dict(),
            "timeout_s": self.timeout_s,
            "input_schema": model_schema(self.input_model),
            "output_schema": model_schema(self.output_model),
        }


class FunctionTool(Tool):
    """A tool made from a typed function ``(args: InputModel, ctx: ToolContext) -> OutputModel``."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        modalities: Iterable[str] | None = None,
        requires: Requirements | None = None,
        timeout_s: float | None = None,
        available: Callable[[], Availability] | None = None,
        suggest: SuggestFn | None = None,
        follow_up: FollowUpFn | None = None,
        states: StatesFn | None = None,
    ) -> None:
        self.fn = fn
        self._suggest = suggest
        self._follow_up = follow_up
        self._states = states
        self.name = name or fn.__name__
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"tool name {self.name!r} must be 2-64 characters of a-z, 0-9 and '_', "
                "starting with a letter"
            )
        doc = inspect.getdoc(fn) or ""
        self.description = description or doc.split("\n\n")[0].strip()
        if not self.description:
            raise ValueError(f"tool {self.name!r} needs a description (argument or docstring)")
        hints = get_type_hints(fn)
        params = list(inspect.signature(fn).parameters)
        if len(params) != 2:
            raise TypeError(
                f"tool function {fn.__qualname__} must take (args: InputModel, ctx: ToolContext)"
            )
        in_model, out_model = hints.get(params[0]), hints.get("return")
        for label, model in (("argument", in_model), ("return", out_model)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise TypeError(
                    f"tool function {fn.__qualname__}: the {label} annotation must be a pydantic "
                    f"BaseModel subclass, not {model!r}"
                )
        self.input_model = in_model  # type: ignore[assignment]
        self.output_model = out_model  # type: ignore[assignment]
        self.modalities = frozenset(modalities) if modalities is not None else None
        self.requires = requires or Requirements()
        self.timeout_s = timeout_s
        self._available = available

    def available(self) -> Availability:
        return self._available() if self._available is not None else Availability(True, "ready")

    def suggest(self, question: str, image: ImageRecord) -> dict[str, Any] | None:
        return self._suggest(question, image) if self._suggest is not None else None

    def follow_up(self, box: Box, reason: str) -> dict[str, Any] | None:
        return self._follow_up(box, reason) if self._follow_up is not None else None

    def states(self, question: str, evidence: list[Evidence]) -> Statement | None:
        return self._states(question, evidence) if self._states is not None else None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def run(self, args: BaseModel, ctx: ToolContext) -> Any:
        return self.fn(args, ctx)

    def __repr__(self) -> str:
        return f"FunctionTool({self.name!r})"


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    modalities: Iterable[str] | None = None,
    requires: Requirements | None = None,
    timeout_s: float | None = None,
    available: Callable[[], Availability] | None = None,
    suggest: SuggestFn | None = None,
    follow_up: FollowUpFn | None = None,
    states: StatesFn | None = None,
) -> Any:
    """Make a :class:`Tool` from a typed function; usable bare (``@tool``) or with options.

    ``suggest(question, image_record)`` returns arguments when the rule-based planner (no VLM)
    should call the tool for a question, else ``None``; a VLM planner sees every tool's schema.
    ``follow_up(box, reason)`` returns arguments to examine a region the first look picked.
    ``states(question, evidence)`` returns the :class:`Statement` the tool's evidence makes
    outright about a question (the evidence composer answers with it), else ``None``.

    The input and output models are read from the annotations; the description defaults to
    the docstring's first paragraph. The decorated name becomes the tool object (register it
    with :meth:`ToolRegistry.register` or expose it through the ``medloupe.tools`` entry-point
    group).
    """

    def wrap(f: Callable[..., Any]) -> FunctionTool:
        return FunctionTool(
            f,
            name=name,
            description=description,
            modalities=modalities,
            requires=requires,
            timeout_s=timeout_s,
            available=available,
            suggest=suggest,
            follow_up=follow_up,
            states=states,
        )

    return wrap(fn) if fn is not None else wrap
