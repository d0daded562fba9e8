"""The operator (``modelbudget run`` as a subprocess) on the local testbed.

Each test gets its own namespace, KwokNodePool, model server and operator(s); the specs use
short windows (3 s reconciles, 10 s rate window, 20 s stabilisation) so the whole file runs in a
few minutes.  Prometheus outages are staged with a proxy in front of the shared Prometheus, so
other users of the testbed are not disturbed.
"""

from __future__ import annotations

import time

import pytest
from kubernetes.client.exceptions import ApiException
from support import MB, NODE_PRICE, Env, FaultyPrometheus, budget, record, world

pytestmark = pytest.mark.e2e


@world(replicas=1, rps=1.0)
def test_demand_ramp_scales_replicas_then_nodes_within_the_ceiling_and_back_down(env: Env) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    env.start_operator()
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "Ready=True")
    time.sleep(6)
    base = env.replicas()
    assert base <= 2  # 1 req/s x 400 tokens is about one replica's worth

    # Step: 30 req/s x 400 tokens needs 12 replicas; $12/h buys 3 nodes = 6 replicas.
    step_at = time.monotonic()
    env.demand(30)
    env.wait_for(lambda: env.replicas() > base, 60, "a scale-up")
    record("reaction_seconds_demand_step_to_replicas", time.monotonic() - step_at)
    spends, limits = [], []

    def settled() -> bool:
        s = env.status()
        spends.append(s.get("spend", {}).get("currentPerHour", 0.0))
        limits.append((s.get("plan", {}).get("tokenLimit"), s.get("plan", {}).get("admittedRequestsPerSecond")))
        return env.replicas() == 6 and env.pool_size() == 3 and env.running_pods() == 6

    env.wait_for(settled, 120, "6 running replicas on 3 nodes", interval=1)
    record("reaction_seconds_demand_step_to_pods_running", time.monotonic() - step_at)
    assert max(spends) <= 3 * NODE_PRICE + 1e-9, spends
    assert env.condition("BudgetLimited")["status"] == "True"
    limit = env.token_limit()
    assert limit is not None and limit <= 200  # 6 replicas carry 30 req/s only at <= 200 tokens
    # Tokens are trimmed before requests: no admission cap while a smaller limit still fits.
    assert all(admitted is None for lim, admitted in limits if lim is not None and lim > 64), limits
    assert env.events("TokenLimitChanged") and env.events("NodePoolResized") and env.events("Rescaled")

    # Demand falls: replicas hold for the 20 s stabilisation window, then come down.
    env.demand(1)
    drop_at = time.monotonic()
    env.wait_for(lambda: env.status().get("demand", {}).get("requestsPerSecond", 99) < 5, 60, "demand seen low")
    while time.monotonic() - drop_at < 15:
        assert env.replicas() == 6, "scaled down inside the stabilisation window"
        time.sleep(1)
    env.wait_for(lambda: env.replicas() < 6, 60, "the scale-down after the window")
    record("scale_down_after_demand_drop_seconds", time.monotonic() - drop_at)
    assert time.monotonic() - drop_at >= 20


@world(replicas=3, rps=6.0)
def test_prometheus_outage_holds_then_falls_back_then_recovers(env: Env) -> None:
    proxy = FaultyPrometheus(env.prometheus)
    proxy.start()
    try:
        env.apply_budget(budget("llm", env.pool, proxy.url))
        env.start_operator()
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 60, "metrics")
        before = env.replicas()
        proxy.stop()
        env.demand(40)  # unseen: must not cause a scale-up
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "False", 30, "MetricsAvailable=False")
        assert env.condition("MetricsAvailable")["reason"] == "MetricsUnreachable"
        assert env.replicas() <= before
        assert env.events("MetricsUnavailable")
        env.wait_for(lambda: env.replicas() == 1, 60, "the ScaleTo fallback")
        assert env.condition("Degraded")["reason"] == "MetricsFallback"
        proxy.start()
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 30, "recovery")
        env.wait_for(lambda: env.replicas() > 1, 30, "scaling again after recovery")
        assert env.events("MetricsRecovered")
    finally:
        proxy.stop()


def clear_of_an_hour_boundary(span: float) -> None:
    """Sleep past the next full hour if it comes within ``span`` seconds: an hourly ceiling starts
    a new ledger period there, which a test comparing periods must not straddle."""
    to_boundary = 3600 - time.time() % 3600
    if to_boundary < span:
        time.sleep(to_boundary + 1)


@world(replicas=2, rps=4.0)
def test_two_operators_one_leader_and_a_restart_keeps_the_ledger(env: Env) -> None:
    clear_of_an_hour_boundary(180)  # the test takes about 40 s; this leaves room on a slow machine
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    operators = {"operator-a": env.start_operator("a")}
    time.sleep(1)
    operators["operator-b"] = env.start_operator("b")
    env.wait_for(lambda: env.status().get("spend", {}).get("periodToDate", 0) > 0, 60, "spend accrued")
    time.sleep(6)  # let the first decisions settle before taking the snapshot
    leader = env.leader()
    assert leader in ("operator-a", "operator-b")
    first = env.status()
    period_start = first["spend"]["periodStart"]
    rescaled = len(env.events("Rescaled"))
    replicas = env.replicas()

    operators[leader].proc.kill()  # no clean shutdown: the lease must expire
    killed_at = time.monotonic()
    env.wait_for(lambda: env.leader() not in (None, leader), 30, "the standby taking over")
    record("leader_takeover_seconds", time.monotonic() - killed_at)
    spent = first["spend"]["periodToDate"]
    env.wait_for(lambda: env.status()["spend"]["periodToDate"] > spent + 1e-6, 30, "spend accruing again")
    after = env.status()
    assert after["spend"]["periodStart"] == period_start  # the same period's ledger, not a fresh one
    # Nothing re-applied: same demand, same size, no new Rescaled events.
    assert env.replicas() == replicas
    assert len(env.events("Rescaled")) == rescaled


@world(replicas=1, rps=20.0)
def test_recommend_mode_changes_nothing(env: Env) -> None:
    recommend = budget("llm", env.pool, env.prometheus, mode="Recommend")
    # A window longer than one answer (~13 s): at one replica the batch runs in waves of 32 equal
    # answers, and a shorter window can hold no completion (generated tokens unknown: metrics held).
    recommend["spec"]["metrics"]["window"] = "30s"
    env.apply_budget(recommend)
    env.start_operator()
    env.wait_for(lambda: env.status().get("plan", {}).get("replicas", 1) > 1, 60, "a recommendation")
    time.sleep(6)
    assert env.condition("Ready")["reason"] == "Recommending"
    assert env.replicas() == 1 and env.pool_size() == 1 and env.token_limit() is None


@world(replicas=1, rps=20.0)
def test_invalid_and_conflicting_specs_are_refused(env: Env) -> None:
    bad = budget("llm", env.pool, env.prometheus)
    bad["spec"]["replicas"] = {"min": 5, "max": 2}
    with pytest.raises(ApiException) as rejected:
        env.apply_budget(bad)
    assert rejected.value.status == 422 and "replicas.min must not exceed replicas.max" in str(rejected.value.body)

    # Passes the schema, but its samples cannot give a curve: InvalidSpec, and nothing done.
    unfit = budget("llm", env.pool, env.prometheus)
    falling = [(64, 0.6), (256, 0.5), (1024, 0.4)]  # more tokens, less performance: no slope to fit
    unfit["spec"]["curve"] = {
        "samples": [{"tokens": t, "performance": p} for t, p in falling],
        "minTokens": 64,
        "maxTokens": 4096,
    }
    env.apply_budget(unfit)
    env.start_operator()
    env.wait_for(lambda: env.condition("Ready").get("reason") == "InvalidSpec", 60, "InvalidSpec")
    assert env.events("InvalidSpec") and env.replicas() == 1

    env.autoscaling.create_namespaced_horizontal_pod_autoscaler(
        env.ns,
        {
            "metadata": {"name": "llm"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
                "minReplicas": 1,
                "maxReplicas": 3,
            },
        },
    )
    env.custom.patch_namespaced_custom_object(
        *MB, env.ns, "modelbudgets", "llm", {"spec": {"curve": {"samples": None, "intercept": 0.1, "slope": 0.08}}}
    )
    env.wait_for(lambda: env.condition("Degraded").get("reason") == "ConflictingAutoscaler", 60, "the conflict")
    assert env.condition("Ready")["status"] == "False"
    assert env.events("ConflictingAutoscaler")
    assert env.replicas() == 1 and env.token_limit() is None
