"""The demand forecast: synthetic series with known answers, how its history is kept, and the
planner stages that act on it."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelbudget.api import ControllerState
from modelbudget.api.reasons import Reason
from modelbudget.api.status import DemandHistory, Recommendation
from modelbudget.core import Observation
from modelbudget.core.forecast import HISTORY_BUCKETS, MIN_HORIZONS, MODEL, forecast, quantile_of, record
from tests.builders import NOW, decide_for, make_spec, observe

BUCKET, HORIZON = 30, 180  # 6 buckets ahead
H = HORIZON // BUCKET


def history(peaks: list[float] | np.ndarray) -> DemandHistory:
    """A history whose last bucket is the one ``NOW`` falls in."""
    start = NOW - timedelta(seconds=BUCKET * (len(peaks) - 1))
    return DemandHistory(start=start, bucket_seconds=BUCKET, peaks=[float(p) for p in peaks])


def ahead(peaks: list[float] | np.ndarray, quantile: float = 0.5):
    result = forecast(history(peaks), NOW, HORIZON, quantile)
    assert result is not None
    assert result.model == MODEL and result.horizon_seconds == HORIZON
    return result


def test_constant_demand_forecasts_itself() -> None:
    result = ahead([5.0] * 40, quantile=0.9)
    assert result.expected == pytest.approx(5.0)
    assert result.upper == pytest.approx(5.0)


def test_a_ramp_is_expected_to_go_on_rising() -> None:
    # x_t = 1 + 0.5 t: every horizon rose by exactly 0.5 * H, so every quantile of growth is that.
    peaks = 1.0 + 0.5 * np.arange(60)
    result = ahead(peaks, quantile=0.9)
    assert result.upper == pytest.approx(peaks[-1] + 0.5 * H)
    # Holt's damped trend: above the last value, below the undamped line's mean over the horizon.
    assert peaks[-1] < result.expected < peaks[-1] + 0.5 * (H + 1) / 2


def test_a_step_never_seen_is_not_foreseen_and_once_seen_is_the_new_level() -> None:
    before = ahead([2.0] * 40, quantile=0.9)
    assert before.upper == pytest.approx(2.0)
    # Long after a step from 2 to 10: only H of the growth samples span it (under 10%), so the
    # 0.9 quantile of growth is 0, and the forecast is the new level.
    after = ahead([2.0] * 10 + [10.0] * 90, quantile=0.9)
    assert after.upper == pytest.approx(10.0)
    assert after.expected == pytest.approx(10.0, rel=1e-3)


def test_diurnal_demand_is_covered_at_the_quantile_asked_for() -> None:
    # Three cycles of a sinusoid 40 buckets long: walk along it and count how often the actual
    # peak within the horizon stays under the forecast's upper bound.
    t = np.arange(160)
    series = 10.0 + 5.0 * np.sin(2 * np.pi * t / 40)
    for quantile in (0.5, 0.9):
        covered = []
        for now in range(80, 160 - H):
            upper = ahead(series[: now + 1], quantile).upper
            covered.append(series[now + 1 : now + 1 + H].max() <= upper + 1e-9)
        assert np.mean(covered) >= quantile - 0.05, quantile


def test_bursts_set_the_upper_bound_when_they_come_often() -> None:
    # A one-bucket burst of +8 every 10 buckets: 6 of every 10 horizons hold a burst, so the
    # median growth is the burst and the upper bound from a quiet bucket is base + burst.
    peaks = [2.0] * 100
    for i in range(5, 100, 10):
        peaks[i] = 10.0
    peaks[-1] = 2.0
    result = ahead(peaks, quantile=0.5)
    assert result.upper == pytest.approx(10.0)
    assert result.expected < result.upper


def test_too_little_or_stale_history_gives_no_forecast() -> None:
    assert forecast(None, NOW, HORIZON, 0.5) is None
    assert forecast(history([3.0] * (MIN_HORIZONS * H)), NOW, HORIZON, 0.5) is None
    assert forecast(history([3.0] * (MIN_HORIZONS * H + 1)), NOW, HORIZON, 0.5) is not None
    # The current bucket was never recorded: the metrics stopped, so does the forecast.
    assert forecast(history([3.0] * 40), NOW + timedelta(seconds=BUCKET), HORIZON, 0.5) is None


def test_record_keeps_each_buckets_peak_fills_short_gaps_and_restarts_after_long_ones() -> None:
    kept = record(None, 4.0, NOW, BUCKET, HORIZON)
    kept = record(kept, 6.0, NOW + timedelta(seconds=10), BUCKET, HORIZON)
    kept = record(kept, 5.0, NOW + timedelta(seconds=20), BUCKET, HORIZON)
    assert kept.peaks == [6.0]
    # Two buckets unseen (shorter than the horizon): taken to be like the last one seen.
    kept = record(kept, 1.0, NOW + timedelta(seconds=3 * BUCKET), BUCKET, HORIZON)
    assert kept.peaks == [6.0, 6.0, 6.0, 1.0]
    # Blind for longer than the horizon: what came before says nothing about now.
    restarted = record(kept, 2.0, NOW + timedelta(seconds=3 * BUCKET + HORIZON + BUCKET), BUCKET, HORIZON)
    assert restarted.peaks == [2.0]


def test_history_is_bounded_and_survives_a_restart_through_the_status() -> None:
    kept = None
    for k in range(HISTORY_BUCKETS + 50):
        kept = record(kept, float(k), NOW + timedelta(seconds=k * BUCKET), BUCKET, HORIZON)
    assert kept is not None and len(kept.peaks) == HISTORY_BUCKETS
    assert kept.peaks[-1] == HISTORY_BUCKETS + 49
    assert kept.start == NOW + timedelta(seconds=50 * BUCKET)
    stored = ControllerState(demand_history=kept).model_dump(mode="json", by_alias=True)
    assert ControllerState.model_validate(stored).demand_history == kept


def _steady(rps: float, high: int, high_seconds_ago: float) -> tuple[ControllerState, Observation]:
    """Twenty minutes of steady demand at ``rps``; ``high`` replicas wanted ``high_seconds_ago``."""
    state = ControllerState(
        token_limit=8192,
        demand_history=history([rps] * 40),
        recommendations=[
            Recommendation(at=NOW - timedelta(seconds=high_seconds_ago), replicas=high, nodes={"pool-a": high // 4})
        ],
    )
    return state, observe(rps=rps, replicas=high, nodes={"pool-a": high // 4})


@pytest.mark.parametrize(("high_seconds_ago", "released"), [(400, True), (60, False)])
def test_a_window_hold_goes_once_the_forecast_says_it_will_not_be_needed(high_seconds_ago, released) -> None:
    # A 900 s scale-down window still remembers 16 replicas; demand has been steady and low for
    # twenty minutes.  Wanted more than a horizon ago: released now (ForecastHold).  Wanted within
    # the last horizon: the window holds (new capacity could not be back in time).
    spec = make_spec(behavior={"scaleDown": {"stabilizationWindowSeconds": 900}})
    state, obs = _steady(1.0, 16, high_seconds_ago)
    with_forecast = decide_for(obs, spec, state, NOW).plan
    off = make_spec(behavior={"scaleDown": {"stabilizationWindowSeconds": 900}, "forecast": {"enabled": False}})
    windowed = decide_for(obs, off, state, NOW).plan
    assert windowed.replicas == 16 and windowed.has_reason(Reason.SCALE_DOWN_STABILIZATION)
    assert with_forecast.has_reason(Reason.FORECAST_HOLD) == released
    assert (with_forecast.replicas < 16) == released
    assert with_forecast.expected_spend_per_hour <= windowed.expected_spend_per_hour
    assert with_forecast.forecast is not None and with_forecast.forecast.upper_requests_per_second == pytest.approx(1.0)


def test_a_rising_forecast_buys_replicas_before_demand_arrives() -> None:
    # Demand ramps by 0.1 req/s per bucket to 3.9 req/s: three minutes ahead it will be 4.5, which
    # needs a third 4-GPU node; a point is worth enough that the economics want it.  The SLO is
    # loose: at a point's worth, replicas for smaller batches would otherwise fill replicas.max now.
    fast = {"scaleUp": {"maxReplicasPerPeriod": 100}}
    budget = {"ceiling": {"amount": 100, "period": "Hour"}, "valuePerPoint": 1.0}
    slo = {"latencySeconds": 3600}
    peaks = list(0.1 * np.arange(40))
    state = ControllerState(token_limit=8192, demand_history=history(peaks))
    obs = observe(rps=peaks[-1], replicas=8, nodes={"pool-a": 2})
    plan = decide_for(obs, make_spec(behavior=fast, budget=budget, slo=slo), state, NOW).plan
    off = {**fast, "forecast": {"enabled": False}}
    blind = decide_for(obs, make_spec(behavior=off, budget=budget, slo=slo), state, NOW).plan
    assert plan.forecast is not None and plan.forecast.upper_requests_per_second == pytest.approx(peaks[-1] + 0.1 * H)
    assert plan.has_reason(Reason.FORECAST_SCALE_UP)
    assert plan.replicas > blind.replicas
    assert plan.expected_spend_per_hour <= plan.allowed_spend_per_hour


@given(
    values=st.lists(st.floats(-1e6, 1e6) | st.sampled_from([0.0, np.nan]), min_size=1, max_size=200),
    q=st.floats(0.0, 1.0) | st.sampled_from([0.0, 0.5, 0.9, 1.0]),
)
def test_the_growth_quantile_is_numpys_to_the_last_bit(values, q) -> None:
    # The forecast's upper bound must not move by a bit for the speed-up: plans depend on it.
    np.testing.assert_array_equal(quantile_of(np.array(values), q), np.quantile(np.array(values), q))
