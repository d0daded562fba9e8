"""Property tests of the safety rules over random specs and observation sequences."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelbudget.api import ControllerState, ModelBudgetSpec
from modelbudget.api.status import DemandHistory
from modelbudget.core import DemandSample, Observation, resolve
from modelbudget.core.capacity import CapacityLadder, spend_of
from modelbudget.core.generation import GenerationProfile
from tests.builders import NOW, decide_for

pools = st.lists(
    st.fixed_dictionaries(
        {
            "gpuType": st.just("gpu"),
            "pricePerGpuHour": st.floats(0.1, 20),
            "capacityType": st.sampled_from(["Spot", "OnDemand"]),
            "gpusPerNode": st.sampled_from([1, 2, 4, 8]),
            "minNodes": st.integers(0, 3),
            "maxNodes": st.integers(3, 20),
            "tokensPerSecondPerReplica": st.floats(50, 5000),
        }
    ),
    min_size=1,
    max_size=3,
).map(lambda ps: [{**p, "name": f"pool-{i}"} for i, p in enumerate(ps)])


@st.composite
def specs(draw):
    lo = draw(st.integers(16, 512))
    period = draw(st.sampled_from(["Hour", "Day", "Month"]))
    rmin = draw(st.integers(0, 4))
    return ModelBudgetSpec.model_validate(
        {
            "targetRef": {"name": "llm"},
            "curve": {
                "intercept": draw(st.floats(-0.5, 0.5)),
                "slope": draw(st.floats(0.01, 0.2)),
                "minTokens": lo,
                "maxTokens": lo * draw(st.integers(2, 256)),
            },
            "budget": {
                "ceiling": {"amount": draw(st.floats(1, 5000)), "period": period},
                "valuePerPoint": draw(st.floats(1e-5, 0.1)),
                "burstFactor": draw(st.floats(1, 3)),
            },
            "replicas": {"min": rmin, "max": rmin + draw(st.integers(0, 60)), "gpusPerReplica": 1},
            "nodePools": draw(pools),
            "metrics": {"prometheusUrl": "http://p:9090"},
            "behavior": {
                "fallback": {
                    "afterSeconds": draw(st.integers(0, 300)),
                    "action": "ScaleTo",
                    "replicas": draw(st.integers(0, 10)),
                }
            },
        }
    )


bad_number = st.sampled_from([None, math.nan, math.inf, -1.0, 1e12])
rate = st.one_of(st.floats(0, 500), bad_number)


@st.composite
def observations(draw, spec: ModelBudgetSpec):
    replicas = draw(st.integers(0, 80))
    metrics_ok = draw(st.booleans())
    return Observation(
        current_replicas=replicas,
        ready_replicas=draw(st.integers(0, replicas)),
        current_nodes={p.name: draw(st.integers(0, p.max_nodes + 2)) for p in spec.node_pools},
        current_token_limit=draw(st.one_of(st.none(), st.integers(1, 10**6))),
        demand=DemandSample(
            at=NOW if metrics_ok else draw(st.one_of(st.none(), st.just(NOW - timedelta(hours=1)))),
            request_rate=draw(st.floats(0, 500)) if metrics_ok else draw(rate),
            generation=GenerationProfile.exponential(draw(st.floats(1, 20000))) if draw(st.booleans()) else None,
            generated_tokens_per_request=draw(st.one_of(st.floats(1, 20000), bad_number)),
            requests_waiting=draw(st.one_of(st.floats(0, 1000), bad_number)),
            error=None if metrics_ok or draw(st.booleans()) else "connection refused",
        ),
    )


def check_invariants(decision, obs, spec, state):
    resolved = resolve(spec)
    lo, hi = resolved.token_min, resolved.token_max
    # 1. the plan's spend never exceeds the allowed rate
    assert decision.plan.expected_spend_per_hour <= decision.plan.allowed_spend_per_hour + 1e-6
    assert spend_of(decision.plan.nodes_by_pool(), spec) == decision.plan.expected_spend_per_hour
    # token limit within bounds; replicas and nodes within the spec's limits
    assert lo <= decision.plan.token_limit <= hi
    assert decision.plan.replicas <= spec.replicas.max
    for alloc in decision.plan.pools:
        assert 0 <= alloc.nodes <= spec.pool(alloc.pool).max_nodes
    # 2. metrics that cannot be trusted never raise replicas
    if not decision.plan.metrics_available:
        assert decision.plan.replicas <= obs.current_replicas
        previous = state.token_limit or obs.current_token_limit
        if previous is not None:
            assert decision.plan.token_limit <= max(min(previous, hi), lo)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_safety_rules_hold_for_one_decision(data):
    spec = data.draw(specs())
    obs = data.draw(observations(spec))
    plan = decide_for(obs, spec, ControllerState(), NOW)
    check_invariants(plan, obs, spec, ControllerState())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_safety_rules_hold_over_a_sequence(data):
    spec = data.draw(specs())
    state = ControllerState()
    now = NOW
    for _ in range(data.draw(st.integers(2, 12))):
        now += timedelta(seconds=data.draw(st.sampled_from([1, 15, 60, 900])))
        obs = data.draw(observations(spec))
        if obs.demand.at == NOW:  # keep trusted samples fresh as time moves on
            obs = replace(obs, demand=replace(obs.demand, at=now))
        plan = decide_for(obs, spec, state, now)
        check_invariants(plan, obs, spec, state)
        assert plan.next_state.ledger is not None and plan.next_state.ledger.spent >= 0
        state = plan.next_state


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_decide_is_deterministic(data):
    spec = data.draw(specs())
    obs = data.draw(observations(spec))
    first = decide_for(obs, spec, ControllerState(), NOW)
    second = decide_for(obs, spec, ControllerState(), NOW)
    assert first.plan.model_dump() == second.plan.model_dump()
    assert first.next_state == second.next_state


@st.composite
def histories(draw, now):
    """A demand history long enough to forecast from; ``stale`` ones end more than a horizon (the
    default 180 s, plus the bucket it was last seen in) ago.  Shorter gaps are filled."""
    peaks = draw(st.lists(st.floats(0, 500), min_size=40, max_size=120))
    stale = draw(st.booleans())
    end = now - (timedelta(seconds=draw(st.integers(211, 7200))) if stale else timedelta(0))
    start = end - timedelta(seconds=30 * (len(peaks) - 1))
    return DemandHistory(start=start, bucket_seconds=30, peaks=peaks), stale


def without_forecast(spec: ModelBudgetSpec) -> ModelBudgetSpec:
    behavior = spec.behavior.model_copy(
        update={"forecast": spec.behavior.forecast.model_copy(update={"enabled": False})}
    )
    return spec.model_copy(update={"behavior": behavior})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_safety_rules_hold_with_the_forecast_on(data):
    spec = data.draw(specs())
    obs = data.draw(observations(spec))
    history, stale = data.draw(histories(NOW))
    state = ControllerState(demand_history=history)
    decision = decide_for(obs, spec, state, NOW)
    check_invariants(decision, obs, spec, state)
    blind = decide_for(obs, without_forecast(spec), state, NOW)
    if stale or not decision.plan.metrics_available:
        # A forecast never raises spend when its inputs are stale: the plan is the one without it.
        assert decision.plan.model_dump() == blind.plan.model_dump()
    if not decision.plan.metrics_available:
        assert decision.next_state.demand_history == history  # untrusted input is never recorded


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), demand=st.lists(st.floats(0, 1e6), min_size=1, max_size=40), honour=st.booleans())
def test_the_grid_wide_ladder_answers_what_the_one_at_a_time_ladder_does(spec, demand, honour):
    # The planner asks a whole token grid at once; it must get the per-limit answers.
    ladder = CapacityLadder(spec, honour_min_nodes=honour)
    many = ladder.replicas_for_many(np.array(demand)).tolist()
    assert many == [-1 if (n := ladder.replicas_for(d)) is None else n for d in demand]
    counts = list(range(ladder.total_slots + 2))
    spent = ladder.spend_many(np.array(counts))
    assert spent.tolist() == pytest.approx([ladder.spend(n) for n in counts], rel=1e-12, abs=1e-9)
