"""Aggregating per-item records into metrics: overall, by group, calibration, latency, tools.

A record is one line of ``items.jsonl``: the item's id, source, task, modality, answer type,
question type, its :class:`~medloupe.evaluation.scoring.ItemScore` fields, the answer's
confidence, the run's latency and its tool calls (count and failures), or the run's error.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

ECE_BINS = 10


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (abstentions and failures count as wrong), abstention rate, accuracy on
    answered items, and the task-specific measures present in ``records``."""
    n = len(records)
    answered = [r for r in records if not r.get("abstained") and not r.get("error")]
    out: dict[str, Any] = {
        "items": n,
        "accuracy": _mean(float(r["correct"]) for r in records) if n else None,
        "abstention_rate": _mean(float(bool(r.get("abstained"))) for r in records) if n else None,
        "answered": len(answered),
        "accuracy_answered": _mean(float(r["correct"]) for r in answered),
        "run_errors": sum(1 for r in records if r.get("error")),
    }
    grounding = [r for r in records if r.get("answer_type") == "box" or r["task"] == "grounding"]
    if grounding:
        out["grounding_hit_rate"] = _mean(float(r["correct"]) for r in grounding)
        out["mean_iou"] = _mean(float(r.get("iou") or 0.0) for r in grounding)
        out["pointing_hit_rate"] = _mean(float(bool(r.get("pointing_hit"))) for r in grounding)
    counts = [r for r in records if r["task"] == "count"]
    if counts:
        errs = [r["count_error"] for r in counts if r.get("count_error") is not None]
        out["count_exact"] = _mean(float(r["correct"]) for r in counts)
        out["count_mae_answered"] = _mean(errs)
    opened = [r for r in records if r.get("answer_type") == "open"]
    if opened:
        out["open_token_recall"] = _mean(float(r.get("token_recall") or 0.0) for r in opened)
    rel = [r for r in records if r["task"] == "relative_position"]
    if rel:
        out["relative_position_accuracy"] = _mean(float(r["correct"]) for r in rel)
    return out


def calibration(records: Sequence[dict[str, Any]], bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error over answered items (confidence vs correctness, equal-width
    bins) and the reliability diagram's bins."""
    answered = [
        r
        for r in records
        if not r.get("abstained") and not r.get("error") and r.get("confidence") is not None
    ]
    table = []
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [
            r
            for r in answered
            if lo <= r["confidence"] < hi or (b == bins - 1 and r["confidence"] == 1.0)
        ]
        if not inside:
            table.append({"low": lo, "high": hi, "count": 0, "confidence": None, "accuracy": None})
            continue
        conf = statistics.fmean(r["confidence"] for r in inside)
        acc = statistics.fmean(float(r["correct"]) for r in inside)
        ece += len(inside) / len(answered) * abs(conf - acc)
        table.append(
            {"low": lo, "high": hi, "count": len(inside), "confidence": conf, "accuracy": acc}
        )
    return {"ece": ece if answered else None, "answered": len(answered), "bins": table}


def latency_and_tools(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Latency p50/p95 (s) and the share of tool calls that failed."""
    lat = [float(r["latency_s"]) for r in records if r.get("latency_s") is not None]
    calls = sum(int(r.get("tool_calls", 0)) for r in records)
    failed = sum(int(r.get("tool_failures", 0)) for r in records)
    return {
        "latency_p50_s": _percentile(lat, 0.5),
        "latency_p95_s": _percentile(lat, 0.95),
        "tool_calls": calls,
        "tool_failure_rate": failed / calls if calls else None,
    }


GROUP_KEYS = ("source", "task", "modality", "answer_type", "question_type")


def compute_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything ``metrics.json`` holds."""
    by: dict[str, dict[str, Any]] = {}
    for key in GROUP_KEYS:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            value = r.get(key)
            if value is not None:
                groups[str(value)].append(r)
        if groups:
            by[key] = {name: summary(rs) for name, rs in sorted(groups.items())}
    return {
        "overall": summary(records),
        "calibration": calibration(records),
        "runtime": latency_and_tools(records),
        "by": by,
    }
