"""TokenLimitEnforced: what the gates report against what was published, and the plan that follows."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta

import pytest

from modelbudget.api import ControllerState
from modelbudget.api.reasons import Reason
from modelbudget.core.enforcement import assess_enforcement
from modelbudget.core.observation import GateReport
from tests.builders import NOW, decide_for, make_spec, observe

GRACE = 30.0
EARLIER = NOW - timedelta(seconds=10)
LONG_AGO = NOW - timedelta(seconds=120)


@pytest.mark.parametrize(
    ("gates", "published", "since", "reason", "in_force"),
    [
        (GateReport((512.0, 512.0)), 512, None, Reason.ENFORCED, 512),
        (GateReport(()), 512, None, Reason.NO_GATE, math.inf),
        (GateReport((1024.0, 512.0)), 512, None, Reason.PROPAGATING, 1024),  # one gate has not caught up
        (GateReport((1024.0, 512.0)), 512, EARLIER, Reason.PROPAGATING, 1024),
        (GateReport((1024.0, 512.0)), 512, LONG_AGO, Reason.STALE, 1024),
        (GateReport((256.0,)), 512, LONG_AGO, Reason.STALE, 256),
        (GateReport(error="bad_data"), 512, None, Reason.GATES_UNKNOWN, math.inf),
        (None, 512, None, Reason.GATES_UNKNOWN, math.inf),
    ],
)
def test_the_verdict_compares_what_the_gates_apply_with_what_was_published(gates, published, since, reason, in_force):
    verdict = assess_enforcement(gates, published, since, NOW, GRACE)
    assert verdict.reason is reason, verdict.message
    assert verdict.limit_in_force == in_force
    assert verdict.plannable is (reason in (Reason.ENFORCED, Reason.PROPAGATING, Reason.GATES_UNKNOWN))


def test_a_mismatch_is_timed_from_when_it_started_and_forgotten_when_it_ends():
    first = assess_enforcement(GateReport((1024.0,)), 512, None, NOW, GRACE)
    assert first.mismatch_since == NOW
    later = assess_enforcement(GateReport((1024.0,)), 512, first.mismatch_since, NOW + timedelta(seconds=31), GRACE)
    assert later.reason is Reason.STALE and later.mismatch_since == NOW
    agreed = assess_enforcement(GateReport((512.0,)), 512, later.mismatch_since, NOW + timedelta(seconds=40), GRACE)
    assert agreed.reason is Reason.ENFORCED and agreed.mismatch_since is None


# $64/h buys 8 nodes of 4 replicas: 20 req/s wanting 1500 tokens each need 30 unbounded; the value
# of a point makes the planner stop at a limit that 20 replicas carry. The SLO is loose enough that
# latency does not bind (LatencyBound is tested with the planner).
TIGHT = {"budget": {"ceiling": {"amount": 64}}, "slo": {"latencySeconds": 3600}}


def test_without_gates_replicas_are_sized_for_the_requests_as_they_come_within_the_ceiling():
    spec = make_spec(**TIGHT)
    busy = {"rps": 20, "replicas": 32, "nodes": {"pool-a": 8}, "limit": 512, "mean_wanted": 1500}
    enforced = decide_for(observe(**busy), spec, ControllerState(), NOW)
    bare = decide_for(observe(**busy, gates=()), spec, ControllerState(), NOW)
    assert Reason.LIMIT_NOT_ENFORCED not in {r.reason for r in enforced.plan.reasons}
    assert Reason.LIMIT_NOT_ENFORCED in {r.reason for r in bare.plan.reasons}
    # Nothing trims the requests, so the plan does not count on the limit it publishes: replicas
    # for 20 req/s x 1500 tokens (30), within what the allowance buys.
    assert (enforced.plan.replicas, bare.plan.replicas) == (20, 30)
    assert bare.plan.expected_spend_per_hour <= bare.plan.allowed_spend_per_hour + 1e-9
    assert bare.enforcement.reason is Reason.NO_GATE
    assert bare.next_state.limit_unenforced_since == NOW


def test_without_gates_and_without_demand_nothing_is_added():
    spec = make_spec(**TIGHT)
    bare = decide_for(observe(rps=0.0, replicas=1, gates=()), spec, ControllerState(), NOW)
    enforced = decide_for(observe(rps=0.0, replicas=1), spec, ControllerState(), NOW)
    assert bare.plan.replicas == enforced.plan.replicas


def test_unknown_gates_are_no_reason_to_scale_up():
    spec = make_spec(**TIGHT)
    obs = observe(rps=20, replicas=32, nodes={"pool-a": 8}, limit=512, mean_wanted=1500)
    known = decide_for(obs, spec, ControllerState(), NOW)
    unknown = decide_for(replace(obs, demand=replace(obs.demand, gates=None)), spec, ControllerState(), NOW)
    assert unknown.plan.replicas == known.plan.replicas
    assert unknown.enforcement.reason is Reason.GATES_UNKNOWN
