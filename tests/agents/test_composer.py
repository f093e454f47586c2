"""The rule-based composer's pure helpers."""

from __future__ import annotations

from medloupe.agents.composer import withheld_reason


def test_a_withheld_reason_is_kept_only_when_it_names_what_is_asked() -> None:
    q = "Does the right lung look normal?"
    why = "the right lung does not appear to be in view"
    assert withheld_reason(q, ["Right Lung"], why) == why
    assert withheld_reason(q, ["Right Lung"], "the lungs are not shown") is None  # not "right"
    assert withheld_reason("Is the liver enlarged?", [], "no livers in view") == "no livers in view"
    assert withheld_reason("Is the liver enlarged?", [], "abdominal slice") is None
    assert withheld_reason(q, ["Right Lung"], "  ") is None
    assert withheld_reason(q, ["Right Lung"], None) is None
