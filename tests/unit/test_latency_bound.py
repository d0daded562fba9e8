"""The planner respects latency: LatencyBound, replicas sized for the batch the SLO allows."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelbudget.api import ControllerState
from modelbudget.api.reasons import Reason
from modelbudget.core import DemandSample, Observation, resolve
from modelbudget.core.generation import GenerationProfile
from modelbudget.core.serving import serving_speed
from tests.builders import NOW, decide_for, make_spec, observe
from tests.unit.test_planner_properties import specs

# make_spec's pool: 1000 tok/s per replica on a full batch of 256, ITL 20 ms + 0.92 ms per sequence.
LOOSE = {"latencySeconds": 3600}


def reasons(decision) -> set[Reason]:
    return {r.reason for r in decision.plan.reasons}


def latency_of(decision, spec, obs) -> float:
    """The e2e latency, unqueued, of a request at the plan's limit on the batch the serving replicas run."""
    speed = serving_speed(spec.node_pools[0])
    profile = obs.demand.generation
    serving = min(obs.ready_replicas, decision.plan.replicas)
    limit = decision.plan.token_limit
    batch = speed.batch_for(obs.demand.request_rate * profile.mean_generated(limit) / serving)
    tokens = min(profile.quantile_wanted(spec.slo.percentile / 100), limit)
    return speed.latency(0.0, tokens, batch)


def test_a_tight_slo_lowers_the_limit_and_says_so() -> None:
    obs = observe(rps=5, replicas=8, nodes={"pool-a": 2}, mean_wanted=1e9)  # everyone wants more than any limit
    loose = decide_for(obs, make_spec(slo=LOOSE), ControllerState(), NOW)
    tight_spec = make_spec(slo={"latencySeconds": 10})
    tight = decide_for(obs, tight_spec, ControllerState(), NOW)
    assert Reason.LATENCY_BOUND not in reasons(loose)
    assert Reason.LATENCY_BOUND in reasons(tight)
    assert tight.plan.token_limit < loose.plan.token_limit
    # 10 s at no less than ITL(1) = 20.9 ms: at most 479 tokens, whatever the replicas.
    assert tight.plan.token_limit <= 10 / 0.0209 + 1
    assert latency_of(tight, tight_spec, obs) <= 10


def test_a_per_token_target_buys_replicas_for_smaller_batches() -> None:
    obs = observe(rps=20, replicas=8, nodes={"pool-a": 2}, mean_wanted=300)
    plain = decide_for(obs, make_spec(slo=LOOSE), ControllerState(), NOW)
    spec = make_spec(slo={**LOOSE, "timePerOutputTokenSeconds": 0.03})
    tpot = decide_for(obs, spec, ControllerState(), NOW)
    speed = serving_speed(spec.node_pools[0])
    # ITL <= 30 ms: batch <= (0.03 - 0.02) / beta, so each replica generates less than on a full batch.
    batch = (0.03 - speed.alpha) / speed.beta
    assert batch < speed.max_num_seqs
    assert tpot.plan.replicas > plain.plan.replicas
    tokens_per_second = 20 * obs.demand.generation.mean_generated(tpot.plan.token_limit)
    assert tpot.plan.replicas >= math.ceil(tokens_per_second / speed.throughput(batch) - 1e-9)


def test_a_first_token_target_no_prefill_meets_leaves_the_smallest_limit() -> None:
    obs = Observation(
        current_replicas=4,
        ready_replicas=4,
        current_nodes={"pool-a": 1},
        demand=DemandSample(
            at=NOW, request_rate=2.0, generation=GenerationProfile.exponential(500), prompt_tokens_per_request=50_000
        ),
    )
    spec = make_spec(slo={"latencySeconds": 60, "timeToFirstTokenSeconds": 1})  # 50k tokens take 5 s to prefill
    decision = decide_for(obs, spec, ControllerState(), NOW)
    assert decision.plan.token_limit == resolve(spec).grid[0]
    assert Reason.LATENCY_BOUND in reasons(decision)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=specs(),
    latency=st.floats(1, 600),
    rate=st.floats(0.01, 200),
    mean_wanted=st.floats(10, 1e5),
    replicas=st.integers(1, 80),
    data=st.data(),
)
def test_the_limit_meets_the_slo_at_the_batch_the_serving_replicas_run(
    spec, latency, rate, mean_wanted, replicas, data
) -> None:
    spec = spec.model_copy(update={"slo": spec.slo.model_copy(update={"latency_seconds": latency})})
    obs = Observation(
        current_replicas=replicas,
        ready_replicas=data.draw(st.integers(1, replicas)),
        current_nodes={p.name: p.max_nodes for p in spec.node_pools},
        demand=DemandSample(at=NOW, request_rate=rate, generation=GenerationProfile.exponential(mean_wanted)),
    )
    resolved = resolve(spec)
    decision = decide_for(obs, spec, ControllerState(), NOW)
    limit = decision.plan.token_limit
    if limit <= resolved.grid[0]:
        return  # nothing lower to go to: the smallest limit is served, and the reason says why
    speed = resolved.speed
    serving = min(obs.ready_replicas, decision.plan.replicas)
    batch = speed.batch_for(rate * obs.demand.generation.mean_generated(limit) / serving)
    assert batch <= speed.max_num_seqs
    tokens = min(obs.demand.generation.quantile_wanted(spec.slo.percentile / 100), limit)
    assert speed.latency(0.0, tokens, batch) <= latency + 1e-6
