"""Paired comparison of two evaluations: McNemar's exact test and the paired bootstrap."""

from __future__ import annotations

import math

import pytest

from medloupe.evaluation.paired import mcnemar_exact, paired_differences, paired_table


def test_mcnemar_exact_matches_the_binomial_test() -> None:
    # scipy.stats.binomtest(1, 10, 0.5).pvalue == 0.021484375 (two-sided)
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375)
    assert mcnemar_exact(9, 1) == pytest.approx(0.021484375)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # 0 of 6 discordant on one side: 2 * 0.5**6
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def _records(correct: list[bool], task: str = "vqa", **extra: object) -> list[dict]:
    return [
        {
            "id": f"i{i}",
            "task": task,
            "source": "s",
            "answer_type": "closed",
            "correct": c,
            "abstained": False,
            "confidence": 0.7,
            **extra,
        }
        for i, c in enumerate(correct)
    ]


def test_a_large_paired_gain_is_significant_and_noise_is_not() -> None:
    base = _records([False] * 30 + [True] * 30)
    better = _records([True] * 30 + [True] * 30)
    diffs = {(d.group, d.measure): d for d in paired_differences(base, better, seed=1)}
    acc = diffs[("overall", "accuracy")]
    assert acc.difference == pytest.approx(0.5)
    assert acc.only_b == 30 and acc.only_a == 0
    assert acc.p_value < 1e-6 and acc.significant
    assert 0.3 < acc.ci_low < acc.difference < acc.ci_high <= 0.7
    # two flips each way: same accuracy, not significant
    noisy = _records([True, True, False, False] + [False] * 26 + [True] * 30)
    flipped = _records([False, False, True, True] + [False] * 26 + [True] * 30)
    d = next(x for x in paired_differences(noisy, flipped) if x.measure == "accuracy")
    assert d.difference == 0.0 and d.p_value == 1.0 and not d.significant
    assert d.ci_low < 0 < d.ci_high


def test_items_are_paired_by_id_and_grouped() -> None:
    a = _records([True, False, True, False], task="grounding", answer_type="box", iou=0.2)
    b = list(
        reversed(_records([True, True, True, True], task="grounding", answer_type="box", iou=0.6))
    )
    diffs = paired_differences(a, b, seed=0)
    groups = {d.group for d in diffs}
    assert {"overall", "task=grounding"} <= groups
    iou = next(d for d in diffs if d.measure == "mean_iou" and d.group == "overall")
    assert iou.difference == pytest.approx(0.4) and iou.p_value is None
    assert iou.ci_low == pytest.approx(0.4) and iou.ci_high == pytest.approx(0.4)
    table = paired_table("full", "no-rethink", diffs)
    assert "| overall | accuracy | 4 |" in table and "McNemar p" in table
    # the same seed gives the same intervals
    again = paired_differences(a, b, seed=0)
    assert [d.ci_low for d in again] == [d.ci_low for d in diffs]
    assert not any(isinstance(d.ci_low, float) and math.isnan(d.ci_low) for d in diffs)
    assert paired_differences(a, _records([True], task="x")[:0]) == []


def test_intervals_do_not_depend_on_the_order_runs_finished_in() -> None:
    a = _records([True, False, True, False, True, False, False, True])
    b = _records([True, True, False, True, True, True, False, True])
    first = paired_differences(a, b, seed=3)
    shuffled = paired_differences(a[::-1], b[3:] + b[:3], seed=3)
    assert [(d.group, d.measure, d.ci_low, d.ci_high) for d in shuffled] == [
        (d.group, d.measure, d.ci_low, d.ci_high) for d in first
    ]
