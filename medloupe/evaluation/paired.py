"""Paired comparison of two evaluations of the same items: is a difference real or noise?

Both evaluations scored the same items, so each item is its own control. For a yes/no
measure (correct, a grounding hit, an exact count) the test is McNemar's exact test on the
discordant items (right in one, wrong in the other: a two-sided binomial test at 1/2); for
every measure, continuous ones (mean IoU, token recall, ECE) included, a paired bootstrap over
items gives the 95 % interval of the difference. A difference is called significant only when
both agree: p < 0.05 and an interval that excludes 0 (for a continuous measure, the
interval alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medloupe.evaluation.metrics import calibration

ALPHA = 0.05
BOOTSTRAP_SAMPLES = 2000
GROUP_KEYS = ("task", "source", "question_type", "answer_type")

Record = dict[str, Any]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: items right only in A and
    right only in B (1.0 when there are none)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    seed: int,
    samples: int = BOOTSTRAP_SAMPLES,
) -> tuple[float, float]:
    """The 95 % percentile interval of ``statistic(indices)`` over ``samples`` resamples of
    ``n`` items drawn with replacement (the same indices for both evaluations: paired)."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(samples)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [ALPHA / 2, 1 - ALPHA / 2])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class PairedDifference:
    """One measure on one group of items, B minus A."""

    measure: str
    group: str
    items: int
    a: float | None
    b: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None  # McNemar's exact test; None for a continuous measure
    only_a: int | None  # items right in A only (binary measures)
    only_b: int | None
    significant: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _binary(
    measure: str, values_a: np.ndarray, values_b: np.ndarray, group: str, seed: int
) -> PairedDifference:
    n = len(values_a)
    only_a = int(np.sum(values_a & ~values_b))
    only_b = int(np.sum(values_b & ~values_a))
    diff = float(values_b.mean() - values_a.mean())
    lo, hi = bootstrap_interval(
        lambda idx: float(values_b[idx].mean() - values_a[idx].mean()), n, seed=seed
    )
    p = mcnemar_exact(only_a, only_b)
    return PairedDifference(
        measure=measure,
        group=group,
        items=n,
        a=float(values_a.mean()),
        b=float(values_b.mean()),
        difference=diff,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        only_a=only_a,
        only_b=only_b,
        significant=bool(p < ALPHA and (lo > 0 or hi < 0)),
    )


def _interval_only(
    measure: str, group: str, n: int, va: float, vb: float, ci: tuple[float, float]
) -> PairedDifference:
    """B minus A with its bootstrap interval and no test: significant when the interval
    excludes 0."""
    lo, hi = ci
    return PairedDifference(
        measure=measure,
        group=group,
        items=n,
        a=va,
        b=vb,
        difference=vb - va,
        ci_low=lo,
        ci_high=hi,
        p_value=None,
        only_a=None,
        only_b=None,
        significant=bool(lo > 0 or hi < 0),
    )


def _continuous(
    measure: str,
    stat: Callable[[Sequence[Record]], float | None],
    a: Sequence[Record],
    b: Sequence[Record],
    group: str,
    seed: int,
) -> PairedDifference | None:
    va, vb = stat(a), stat(b)
    if va is None or vb is None:
        return None

    def resampled(idx: np.ndarray) -> float:
        sa, sb = stat([a[i] for i in idx]), stat([b[i] for i in idx])
        return math.nan if sa is None or sb is None else sb - sa

    ci = bootstrap_interval(resampled, len(a), seed=seed)
    return _interval_only(measure, group, len(a), va, vb, ci)


def _mean_difference(
    measure: str, key: str, a: Sequence[Record], b: Sequence[Record], group: str, seed: int
) -> PairedDifference:
    va = np.array([float(r.get(key) or 0.0) for r in a])
    vb = np.array([float(r.get(key) or 0.0) for r in b])
    ci = bootstrap_interval(lambda idx: float(vb[idx].mean() - va[idx].mean()), len(a), seed=seed)
    return _interval_only(measure, group, len(a), float(va.mean()), float(vb.mean()), ci)


def _ece(rs: Sequence[Record]) -> float | None:
    value = calibration(rs)["ece"]
    return None if value is None else float(value)


def _is_grounding(r: Record) -> bool:
    return r.get("answer_type") == "box" or r.get("task") == "grounding"


def _measures(
    a: Sequence[Record], b: Sequence[Record], group: str, seed: int
) -> list[PairedDifference]:
    """Every measure that applies to this group of paired records."""
    out: list[PairedDifference] = []
    correct_a = np.array([bool(r.get("correct")) for r in a])
    correct_b = np.array([bool(r.get("correct")) for r in b])
    out.append(_binary("accuracy", correct_a, correct_b, group, seed))
    answered_a = np.array([not r.get("abstained") and not r.get("error") for r in a])
    answered_b = np.array([not r.get("abstained") and not r.get("error") for r in b])
    out.append(_binary("answered", answered_a, answered_b, group, seed))
    if all(_is_grounding(r) for r in a):
        out.append(_mean_difference("mean_iou", "iou", a, b, group, seed))
    if all(r.get("answer_type") == "open" for r in a):
        out.append(_mean_difference("open_token_recall", "token_recall", a, b, group, seed))
    if group == "overall":  # calibration needs many answered items: not split by group
        d = _continuous("ece", _ece, a, b, group, seed)
        if d:
            out.append(d)
    return out


def paired_differences(
    a: Sequence[Record], b: Sequence[Record], *, seed: int = 0
) -> list[PairedDifference]:
    """B minus A on the items both scored (joined by ``id``), overall and per task, source,
    question type and answer type; ``accuracy`` of grounding items is the IoU >= 0.5 hit rate
    and of count items the exact-count rate. Items are taken in ``id`` order, so a seed gives
    the same intervals whatever order the runs finished in."""
    by_id = {r["id"]: r for r in b}
    pairs = sorted(
        ((r, by_id[r["id"]]) for r in a if r["id"] in by_id), key=lambda p: str(p[0]["id"])
    )
    if not pairs:
        return []
    ra, rb = [p[0] for p in pairs], [p[1] for p in pairs]
    out = _measures(ra, rb, "overall", seed)
    for key in GROUP_KEYS:
        values = sorted({str(r[key]) for r in ra if r.get(key) is not None})
        if len(values) < 2 and key != "task":
            continue
        for value in values:
            idx = [i for i, r in enumerate(ra) if str(r.get(key)) == value]
            out.extend(
                _measures([ra[i] for i in idx], [rb[i] for i in idx], f"{key}={value}", seed)
            )
    return out


def paired_table(name_a: str, name_b: str, diffs: Sequence[PairedDifference]) -> str:
    """A Markdown table of :func:`paired_differences` (B minus A)."""

    def f(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    lines = [
        f"| group | measure | items | {name_a} | {name_b} | difference | 95 % CI | "
        "McNemar p (only A / only B) | significant |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in diffs:
        p = "-" if d.p_value is None else f"{d.p_value:.3g} ({d.only_a} / {d.only_b})"
        lines.append(
            f"| {d.group} | {d.measure} | {d.items} | {f(d.a)} | {f(d.b)} | "
            f"{f(d.difference)} | [{f(d.ci_low)}, {f(d.ci_high)}] | {p} | "
            f"{'yes' if d.significant else 'no'} |"
        )
    return "\n".join(lines) + "\n"
