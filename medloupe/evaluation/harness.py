"""Running an evaluation: every item a fresh run (its own thread, registry and trace), resumable,
with ablations.

Layout of ``--out DIR``::

    items.jsonl      one record per finished item (appended as items finish)
    metrics.json     computed from items.jsonl (rewritten at the end)
    report.html      per-item cards and plots
    runs/ITEM_ID/    each item's run directory (answer.json, trace.json, overlay.png, ...)
    runs.sqlite      the evaluation's own run index (not the user's)

A re-run with the same ``--out`` skips items already in ``items.jsonl``; an item whose run was
interrupted is run again from a clean directory. Only the VLM backend and the knowledge base
(read-only) are shared between items; nothing an item's run learns reaches another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medloupe.agents.protocol import VLMBackend
from medloupe.artifacts import atomic_write_bytes, strict_json
from medloupe.config import Settings
from medloupe.errors import MedloupeError
from medloupe.evaluation.data import EvalItem
from medloupe.evaluation.metrics import compute_metrics
from medloupe.evaluation.paired import (
    ALPHA,
    BOOTSTRAP_SAMPLES,
    paired_differences,
    paired_table,
)
from medloupe.evaluation.report import write_report
from medloupe.evaluation.scoring import score
from medloupe.graphs.context import Resources, ResourceSpec, load_resources, resolve_resources
from medloupe.io.intake import read_input
from medloupe.options import RunOptions
from medloupe.runner import Run, create_run, execute
from medloupe.schemas import GroundedAnswer
from medloupe.tools.registry import ToolRegistry
from medloupe.trace import TraceEvent, TraceRecorder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ablation:
    """Which stages of the graph run. ``full`` runs all."""

    tools: bool = True
    retrieval: bool = True
    rethink: bool = True

    @property
    def name(self) -> str:
        off = [
            n
            for n, on in (
                ("tools", self.tools),
                ("retrieval", self.retrieval),
                ("rethink", self.rethink),
            )
            if not on
        ]
        return "full" if not off else "no-" + "-no-".join(off)


ABLATION_GRID = (
    Ablation(),
    Ablation(tools=False),
    Ablation(retrieval=False),
    Ablation(rethink=False),
)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of ``items.jsonl``; a torn last line (a killed writer) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("ignoring a torn line in %s", path)
    return out


def _append_record(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(strict_json(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class Evaluation:
    """One evaluation into ``out``.

    Args:
        out: the output folder (created).
        vlm: backend spec or a loaded backend (shared by all items), or ``None`` for the
            evidence-only path (the settings' VLM is not applied: an evaluation says what it
            runs).
        kb: knowledge base path or ``"default"``, or ``None``.
        ablation: which stages run.
        workers: items in flight at once.
        settings: process settings (the run index moves into ``out``).
    """

    def __init__(
        self,
        out: str | Path,
        *,
        vlm: str | VLMBackend | None = None,
        kb: str | None = None,
        ablation: Ablation = Ablation(),
        workers: int = 1,
        settings: Settings | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.out = Path(out)
        self.vlm = vlm
        self.vlm_spec = vlm if isinstance(vlm, str) or vlm is None else vlm.spec
        self.kb = kb
        self.ablation = ablation
        self.workers = max(1, workers)
        base = settings or Settings.from_env()
        self.settings = dataclasses.replace(base, home=self.out)
        self.options = RunOptions.of(options)
        self.items_path = self.out / "items.jsonl"

    async def run(
        self,
        items: Sequence[EvalItem],
        *,
        on_item: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Evaluate ``items`` (skipping finished ones); returns the metrics."""
        self.out.mkdir(parents=True, exist_ok=True)
        done = {r["id"] for r in read_records(self.items_path)}
        todo = [i for i in items if i.id not in done]
        resources = self._resources() if todo else None
        sem = asyncio.Semaphore(self.workers)

        async def one(item: EvalItem, resources: Resources) -> None:
            async with sem:
                record = await self._run_item(item, resources)
            _append_record(self.items_path, record)
            if on_item:
                on_item(record)

        if resources is not None:
            try:
                await asyncio.gather(*(one(i, resources) for i in todo))
            finally:
                # loaded here, closed here (a backend the caller gave is the caller's)
                await resources.aclose(backend=not isinstance(self.vlm, VLMBackend))
        wanted = {i.id for i in items}
        records = [r for r in read_records(self.items_path) if r["id"] in wanted]
        metrics = compute_metrics(records)
        metrics["config"] = {
            "vlm": self.vlm_spec,
            "kb": self.kb,
            "ablation": self.ablation.name,
            "workers": self.workers,
            "options": self.options.model_dump(mode="json", exclude_defaults=True),
        }
        atomic_write_bytes(self.out / "metrics.json", strict_json(metrics, indent=2).encode())
        write_report(self.out, records, metrics)
        return metrics

    def _resources(self) -> Resources:
        """The backend, KB and tools every item shares (the ablation decides which)."""
        kb = self.kb if self.ablation.retrieval else None
        if isinstance(self.vlm, VLMBackend):
            spec, backend = ResourceSpec(kb=kb), self.vlm
        else:
            spec, backend = resolve_resources(self.vlm or "none", kb, self.settings), None
        # the tools: none (an ablation), or new instances for each item (see _run_item)
        return load_resources(spec, backend=backend, registry=ToolRegistry(), search_tool=False)

    async def _run_item(self, item: EvalItem, resources: Resources) -> dict[str, Any]:
        run_dir = self.out / "runs" / _safe(item.id)
        if run_dir.exists():  # an interrupted attempt: start the item over, cleanly
            shutil.rmtree(run_dir)
        options = self.options.model_copy(update={"rethink": self.ablation.rethink})
        record: dict[str, Any] = {
            "id": item.id,
            "source": item.source,
            "task": item.task,
            "modality": item.modality,
            "answer_type": item.answer_type,
            "question_type": item.question_type,
            "question": item.question,
            "truth": item.answer,
            "truth_boxes": item.boxes_xyxy,
            "image": item.image,
            "run_dir": str(run_dir.relative_to(self.out)),
        }
        started = time.perf_counter()
        answer: GroundedAnswer | None = None
        run: Run | None = None
        try:
            loaded = await asyncio.to_thread(
                read_input, item.image, options, self.settings.max_pixels
            )
            run = create_run(
                loaded,
                item.question,
                settings=self.settings,
                out_dir=run_dir,
                options=options,
                resources=resources.spec,
            )
            if self.ablation.tools:
                resources = resources.with_new_tools()
            answer = await execute(run, settings=self.settings, resources=resources)
        except (MedloupeError, OSError, ValueError, RuntimeError) as exc:
            # the item fails alone, recorded with its reason; the evaluation goes on
            record["error"] = f"{type(exc).__name__}: {exc}"
            # medloupe's own errors say what is wrong and how to fix it; others get a traceback
            log.warning(
                "item %s failed: %s",
                item.id,
                record["error"],
                exc_info=not isinstance(exc, MedloupeError),
            )
        finally:
            if run is not None:
                calls = tool_calls(run.trace_path)
                record["tool_calls"] = len(calls)
                record["tool_failures"] = sum(1 for e in calls if e.status != "ok")
                record["tools"] = sorted({str(e.name) for e in calls})
        record["latency_s"] = time.perf_counter() - started
        s = score(item, answer)
        record.update(s.model_dump(mode="json"))
        if answer is not None:
            record["prediction"] = answer.short_answer
            record["confidence"] = answer.confidence
            record["abstention_reason"] = answer.abstention_reason
            record["regions"] = [
                r.model_dump(mode="json", include={"box_xyxy", "label", "tool", "mask_artifact"})
                for r in answer.regions
            ]
            record["timings_ms"] = answer.timings_ms
        return record


def tool_calls(trace_path: Path) -> list[TraceEvent]:
    """The tool calls a run's trace recorded."""
    trace = TraceRecorder(trace_path)
    try:
        return trace.events({"tool_call"})
    finally:
        trace.close()


def _safe(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in item_id)[:120]


async def run_ablations(
    items: Sequence[EvalItem],
    out: str | Path,
    *,
    grid: Sequence[Ablation] = ABLATION_GRID,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Run each ablation into ``out/ablations/NAME``; compare each with the first (``full``)
    item by item (:func:`~medloupe.evaluation.paired.paired_differences`, bootstrap ``seed``);
    write ``out/comparison.json``, ``out/comparison.md`` (overall metrics) and
    ``out/paired.md`` (paired differences); return ``{name: metrics}``, each ablation's with
    its ``paired`` list against the first."""
    results: dict[str, dict[str, Any]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for ab in grid:
        evaluation = Evaluation(Path(out) / "ablations" / ab.name, ablation=ab, **kwargs)
        results[ab.name] = await evaluation.run(items)
        wanted = {i.id for i in items}
        records[ab.name] = [r for r in read_records(evaluation.items_path) if r["id"] in wanted]
    base = grid[0].name
    tables = [
        f"Paired differences against `{base}` (other minus {base}; bootstrap seed {seed}, "
        f"{BOOTSTRAP_SAMPLES} resamples; significant: McNemar p < {ALPHA} and a 95 % interval "
        "excluding 0).\n"
    ]
    for ab in grid[1:]:
        diffs = await asyncio.to_thread(
            paired_differences, records[base], records[ab.name], seed=seed
        )
        results[ab.name]["paired"] = {
            "against": base,
            "seed": seed,
            "differences": [d.as_dict() for d in diffs],
        }
        tables.append(f"### {ab.name} vs {base}\n\n" + paired_table(base, ab.name, diffs))
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(out) / "comparison.json", strict_json(results, indent=2).encode())
    atomic_write_bytes(Path(out) / "comparison.md", comparison_table(results).encode())
    atomic_write_bytes(Path(out) / "paired.md", "\n".join(tables).encode())
    return results


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table comparing the overall metrics of several evaluations."""
    cols = [
        ("accuracy", "accuracy"),
        ("accuracy_answered", "acc. answered"),
        ("abstention_rate", "abstained"),
        ("grounding_hit_rate", "IoU>=0.5"),
        ("count_exact", "count exact"),
    ]
    lines = [
        "| setting | items | " + " | ".join(c[1] for c in cols) + " | tool calls | p50 s |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for name, m in results.items():
        o = m["overall"]
        vals = [fmt_value(o.get(k)) for k, _ in cols]
        rt = m["runtime"]
        lines.append(
            f"| {name} | {o['items']} | "
            + " | ".join(vals)
            + f" | {rt['tool_calls']} | {fmt_value(rt['latency_p50_s'])} |"
        )
    return "\n".join(lines) + "\n"


def fmt_value(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
