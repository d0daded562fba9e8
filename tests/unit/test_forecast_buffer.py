"""The forecast's headroom as a CapacityBuffer: placeholder pods instead of replicas, their nodes
within the ceiling, none on stale or untrusted metrics."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelbudget.api import ControllerState, ModelBudgetSpec
from modelbudget.api.reasons import Reason
from modelbudget.api.spec import Headroom
from modelbudget.api.status import DemandHistory, Knob
from modelbudget.core import Observation
from modelbudget.core.planner import buffers_headroom
from tests.builders import NOW, decide_for, make_spec, observe
from tests.unit.test_planner_properties import check_invariants, histories, observations, specs

BUCKET = 30
H = 6  # the default 180 s horizon in buckets
PEAKS = list(0.1 * np.arange(40))  # a ramp to 3.9 req/s: 4.5 three minutes ahead, a third node's worth
FAST = {"scaleUp": {"maxReplicasPerPeriod": 100}}
BUDGET = {"ceiling": {"amount": 100, "period": "Hour"}, "valuePerPoint": 1.0}
SLO = {"latencySeconds": 3600}  # loose: replicas for small batches would otherwise fill replicas.max


def ramp_state() -> ControllerState:
    start = NOW - timedelta(seconds=BUCKET * (len(PEAKS) - 1))
    return ControllerState(
        token_limit=8192, demand_history=DemandHistory(start=start, bucket_seconds=BUCKET, peaks=PEAKS)
    )


def ramp_spec(headroom: str = "Auto", enabled: bool = True, budget: dict | None = None) -> ModelBudgetSpec:
    behavior = {**FAST, "forecast": {"enabled": enabled, "headroom": headroom}}
    return make_spec(behavior=behavior, budget=budget or BUDGET, slo=SLO)


def ramp_obs(served: bool, **kw) -> Observation:
    seen = {"rps": PEAKS[-1], "replicas": 8, "nodes": {"pool-a": 2}, **kw}
    return replace(observe(**seen), capacity_buffers=served)


def test_headroom_goes_to_the_buffer_where_the_cluster_serves_one_and_replicas_elsewhere() -> None:
    assert buffers_headroom(ramp_spec().behavior.forecast, served=True)
    assert not buffers_headroom(ramp_spec().behavior.forecast, served=False)
    assert not buffers_headroom(ramp_spec("Replicas").behavior.forecast, served=True)
    assert buffers_headroom(ramp_spec("CapacityBuffer").behavior.forecast, served=True)
    assert not buffers_headroom(ramp_spec("CapacityBuffer", enabled=False).behavior.forecast, served=True)
    assert ramp_spec().behavior.forecast.headroom is Headroom.AUTO  # the default


def test_a_rising_forecast_buys_a_buffer_not_replicas_and_its_nodes_count_within_the_ceiling() -> None:
    state = ramp_state()
    as_replicas = decide_for(ramp_obs(served=False), ramp_spec(), state, NOW).plan
    buffered = decide_for(ramp_obs(served=True), ramp_spec(), state, NOW).plan
    blind = decide_for(ramp_obs(served=True), ramp_spec(enabled=False), state, NOW).plan
    # Without the API, Auto buys replicas as before.
    assert as_replicas.has_reason(Reason.FORECAST_SCALE_UP) and as_replicas.buffer_replicas == 0
    assert as_replicas.replicas > blind.replicas
    # With it, the replicas follow demand and the headroom is placeholder pods...
    assert buffered.replicas == blind.replicas
    assert buffered.buffer_replicas == as_replicas.replicas - blind.replicas > 0
    assert not buffered.has_reason(Reason.FORECAST_SCALE_UP)
    (why,) = [r for r in buffered.reasons if r.reason is Reason.FORECAST_BUFFER]
    assert why.knob is Knob.CAPACITY_BUFFER and f"{buffered.buffer_replicas} placeholder pods" in why.message
    # ...on the same nodes, paid for and counted within the allowance like any other.
    assert buffered.nodes_by_pool() == as_replicas.nodes_by_pool()
    assert buffered.nodes_by_pool()["pool-a"] > blind.nodes_by_pool()["pool-a"]
    assert buffered.expected_spend_per_hour == as_replicas.expected_spend_per_hour
    assert buffered.expected_spend_per_hour <= buffered.allowed_spend_per_hour
    # The pool's replicas are the real ones; the buffer's chunks are in its nodes only.
    assert sum(a.replicas for a in buffered.pools) == buffered.replicas


def test_an_explicit_buffer_the_cluster_does_not_serve_buys_no_headroom_and_says_so() -> None:
    state = ramp_state()
    plan = decide_for(ramp_obs(served=False), ramp_spec("CapacityBuffer"), state, NOW).plan
    blind = decide_for(ramp_obs(served=False), ramp_spec(enabled=False), state, NOW).plan
    assert plan.buffer_replicas == 0 and plan.replicas == blind.replicas
    assert plan.nodes_by_pool() == blind.nodes_by_pool()
    assert plan.has_reason(Reason.CAPACITY_BUFFER_NOT_SERVED)


def test_headroom_replicas_ignores_the_buffer_api() -> None:
    state = ramp_state()
    plan = decide_for(ramp_obs(served=True), ramp_spec("Replicas"), state, NOW).plan
    assert plan.has_reason(Reason.FORECAST_SCALE_UP) and plan.buffer_replicas == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"at": NOW - timedelta(hours=1)},  # stale sample
        {"error": "connection refused"},  # unreachable
        {"rps": None},  # missing
    ],
)
def test_untrusted_metrics_buy_no_buffer(bad) -> None:
    plan = decide_for(ramp_obs(served=True, **bad), ramp_spec("CapacityBuffer"), ramp_state(), NOW).plan
    assert not plan.metrics_available
    assert plan.buffer_replicas == 0 and plan.forecast is None
    assert not plan.has_reason(Reason.FORECAST_BUFFER)


def test_a_stale_history_buys_no_buffer() -> None:
    state = ramp_state()
    old = state.demand_history
    assert old is not None
    stale = state.model_copy(
        update={"demand_history": old.model_copy(update={"start": old.start - timedelta(hours=1)})}
    )
    plan = decide_for(ramp_obs(served=True), ramp_spec(), stale, NOW).plan
    assert plan.forecast is None and plan.buffer_replicas == 0


def test_the_buffer_gets_only_what_the_allowance_leaves_after_the_replicas() -> None:
    # A steeper ramp (7.8 req/s now): demand now wants 24 replicas (6 nodes), the forecast 3 more
    # (a seventh node).  A ceiling of six nodes buys the replicas and no buffer.
    peaks = list(0.3 * np.arange(40))
    start = NOW - timedelta(seconds=BUCKET * (len(peaks) - 1))
    state = ControllerState(
        token_limit=8192, demand_history=DemandHistory(start=start, bucket_seconds=BUCKET, peaks=peaks)
    )
    obs = ramp_obs(served=True, rps=peaks[-1])
    wide = decide_for(obs, ramp_spec(), state, NOW).plan
    assert (wide.replicas, wide.buffer_replicas, wide.nodes_by_pool()) == (24, 3, {"pool-a": 7})
    per_node = wide.expected_spend_per_hour / 7
    six = {**BUDGET, "ceiling": {"amount": per_node * 6.5, "period": "Hour"}}
    tight = decide_for(obs, ramp_spec(budget=six), state, NOW).plan
    assert tight.buffer_replicas == 0 and tight.nodes_by_pool() == {"pool-a": 6}
    assert tight.expected_spend_per_hour <= tight.allowed_spend_per_hour


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_safety_rules_hold_with_the_buffer(data):
    spec = data.draw(specs())
    headroom = data.draw(st.sampled_from(list(Headroom)))
    look = spec.behavior.forecast.model_copy(update={"headroom": headroom})
    spec = spec.model_copy(update={"behavior": spec.behavior.model_copy(update={"forecast": look})})
    obs = replace(data.draw(observations(spec)), capacity_buffers=data.draw(st.booleans()))
    history, stale = data.draw(histories(NOW))
    state = ControllerState(demand_history=history)
    decision = decide_for(obs, spec, state, NOW)
    plan = decision.plan
    check_invariants(decision, obs, spec, state)
    # The nodes planned hold the replicas and the buffer's placeholder pods: the autoscaler never
    # needs a node the ceiling did not count.
    slots = sum(a.nodes * (spec.pool(a.pool).gpus_per_node // spec.replicas.gpus_per_replica) for a in plan.pools)
    assert plan.replicas + plan.buffer_replicas <= slots
    if not buffers_headroom(spec.behavior.forecast, obs.capacity_buffers):
        assert plan.buffer_replicas == 0
    if stale or not plan.metrics_available:
        assert plan.buffer_replicas == 0  # a forecast never raises spend on stale inputs
