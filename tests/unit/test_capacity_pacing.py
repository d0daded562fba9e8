"""The capacity ladder (placement, whole nodes) and the pacing of budgets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from modelbudget.api.spec import Budget, Period
from modelbudget.api.status import Ledger
from modelbudget.core.capacity import CapacityLadder, spend_of
from modelbudget.core.pacing import accrue, allowed_rate, period_bounds
from tests.builders import make_spec, spec_dict


def two_pools(**spot_patch):
    base = spec_dict()["nodePools"][0]
    spot = {
        **base,
        "name": "spot",
        "pricePerGpuHour": 1.0,
        "capacityType": "Spot",
        "maxNodes": 2,
        **spot_patch,
    }
    ondemand = {**base, "name": "ondemand", "pricePerGpuHour": 3.0, "minNodes": 1, "maxNodes": 3}
    return make_spec(nodePools=[ondemand, spot], replicas={"max": 100})


def test_ladder_fills_paid_for_nodes_then_cheapest_tokens():
    ladder = CapacityLadder(two_pools())
    # 4 free slots on the on-demand min node, then 8 spot slots, then on-demand again.
    assert ladder.base_spend == 12.0
    assert ladder.spend(4) == 12.0
    assert ladder.spend(5) == 16.0  # opens a spot node ($4)
    assert ladder.spend(12) == 20.0
    assert ladder.spend(13) == 32.0  # spot full: a second on-demand node ($12)
    alloc = ladder.allocation(13)
    assert alloc.replicas == {"ondemand": 5, "spot": 8}
    assert alloc.nodes == {"ondemand": 2, "spot": 2}
    assert spend_of(alloc.nodes, two_pools()) == ladder.spend(13)


def test_ladder_inverse_queries_agree():
    ladder = CapacityLadder(two_pools())
    for budget in [0, 11.9, 12, 15.9, 16, 20, 31.9, 32, 1000]:
        n = ladder.max_affordable(budget)
        assert n == 0 or ladder.spend(n) <= budget
        assert n == ladder.total_slots or ladder.spend(n + 1) > budget
    for tps in [0, 1, 1000, 4000, 4001, 12000, 20000]:
        n = ladder.replicas_for(tps)
        assert n is not None and ladder.throughput(n) >= tps
        assert n == 0 or ladder.throughput(n - 1) < tps
    assert ladder.replicas_for(1e9) is None


def test_spot_wins_a_cost_tie():
    ladder = CapacityLadder(two_pools(pricePerGpuHour=3.0))
    assert ladder.allocation(5).replicas["spot"] == 1


def test_period_bounds():
    t = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)
    assert period_bounds(Period.MONTH, t) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds(Period.DAY, t)[1] == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_bounds(Period.HOUR, t) == (t.replace(minute=0), datetime(2027, 1, 1, tzinfo=UTC))


def test_accrual_charges_the_larger_rate_and_rolls_over():
    t0 = datetime(2026, 11, 23, 22, 0, tzinfo=UTC)
    ledger = accrue(None, 10.0, t0, Period.DAY)
    ledger = accrue(ledger, 20.0, t0 + timedelta(hours=1), Period.DAY)
    assert ledger.spent == pytest.approx(20.0)
    ledger = accrue(ledger, 20.0, t0 + timedelta(hours=2, minutes=30), Period.DAY)  # crosses midnight
    assert ledger.period_start == datetime(2026, 11, 24, tzinfo=UTC)
    assert ledger.spent == pytest.approx(10.0)


def test_paced_budget_lasts_the_period():
    budget = Budget.model_validate({"ceiling": {"amount": 240, "period": "Day"}, "valuePerPoint": 1, "burstFactor": 2})
    t = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)
    ledger = accrue(None, 0.0, t, Period.DAY)
    step = timedelta(minutes=1)
    while t < datetime(2026, 11, 24, tzinfo=UTC) - step:
        rate = allowed_rate(budget, ledger, t).per_hour  # spend all that is allowed, every minute
        t += step
        ledger = accrue(ledger, rate, t, Period.DAY)
        ledger = ledger.model_copy(update={"rate_per_hour": 0.0})
        if t.hour == 12 and t.minute == 0:
            assert ledger.spent < 240 * 0.8  # not gone by noon
    assert ledger.spent <= 240.0 + 1e-6
    assert ledger.spent > 239.0


def test_an_unspent_budget_is_not_splurged_at_the_end_of_the_period():
    # Nothing spent all day: five minutes before midnight the whole $240 is left.  The rate stays
    # within the burst factor times the even pace ($10/h), not $240 over five minutes.
    budget = Budget.model_validate({"ceiling": {"amount": 240, "period": "Day"}, "valuePerPoint": 1, "burstFactor": 2})
    start = datetime(2026, 11, 23, tzinfo=UTC)
    late = datetime(2026, 11, 23, 23, 55, tzinfo=UTC)
    ledger = Ledger(period_start=start, spent=0.0, accrued_at=late, rate_per_hour=0.0)
    allowance = allowed_rate(budget, ledger, late)
    assert allowance.per_hour == pytest.approx(2 * 240 / 24)
    assert allowance.remaining == pytest.approx(240.0)
    # Behind the even pace, the same bound; ahead of it, remaining / time left still decides.
    ahead = Ledger(period_start=start, spent=200.0, accrued_at=late.replace(hour=12), rate_per_hour=0.0)
    assert allowed_rate(budget, ahead, late.replace(hour=12, minute=0)).per_hour == pytest.approx(2 * 40 / 12)
