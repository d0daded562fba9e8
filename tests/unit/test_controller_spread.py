"""Reconciles are spread evenly over the interval, the same way in every process."""

from __future__ import annotations

from modelbudget.controller.spread import phase, stable_fraction


def test_phases_spread_a_thousand_modelbudgets_evenly_over_the_interval() -> None:
    phases = [phase("team", f"llm-{i:04d}", 15.0) for i in range(1000)]
    assert all(0 <= p < 15.0 for p in phases)
    per_second = [sum(1 for p in phases if s <= p < s + 1) for s in range(15)]
    # 1000 / 15 ≈ 67 a second; a uniform hash stays well within ±40% of that at this size.
    assert min(per_second) > 40 and max(per_second) < 94, per_second


def test_a_fraction_is_stable_and_depends_on_the_salt() -> None:
    assert stable_fraction("ns/a", "phase") == stable_fraction("ns/a", "phase")
    assert stable_fraction("ns/a", "phase") != stable_fraction("ns/a", "shard")
    assert phase("ns", "a", 15.0) == stable_fraction("ns/a", "phase") * 15.0
