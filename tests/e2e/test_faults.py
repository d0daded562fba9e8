"""Faults injected for real while the operator runs (a subprocess, as in test_operator.py).

Each test checks the invariants over the whole run (``Sampler``: every 0.5 s): spend never over
the ceiling, no scale-up on bad data, the ledger kept (period-to-date spend never falls), no
decision applied twice (Events), and how long recovery takes once the fault clears (written to
.local/logs/e2e-measurements.txt; docs/robustness.md has the figures).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from support import (
    MB,
    NODE_PRICE,
    POOLS,
    Env,
    FaultyPrometheus,
    PrometheusProcess,
    Sampler,
    assert_no_double_actuation,
    budget,
    gpu_deployment,
    post_json,
    record,
    restart_apiserver,
    status_written_after,
    world,
)

pytestmark = pytest.mark.e2e

CEILING = 3 * NODE_PRICE  # budget()'s default: 3 nodes, 6 replicas
# Hold while blind (no fallback within the test), so "no scale-up" is exact: the replica count
# must not move at all during a metrics fault.
HOLD: dict[str, Any] = {
    "scaleUp": {"maxReplicasPerPeriod": 4, "periodSeconds": 5},
    "scaleDown": {"stabilizationWindowSeconds": 20},
    "nodeScaleDown": {"stabilizationWindowSeconds": 20},
    "fallback": {"afterSeconds": 600, "action": "Hold"},
    "queueDrainSeconds": 30,
}


def within_ceiling(s: Sampler) -> None:
    assert s.samples, "no samples"
    worst = max(max(x["pool"], x["nodes"]) for x in s.samples)
    assert worst * NODE_PRICE <= CEILING + 1e-9, f"{worst} nodes over a ${CEILING}/h ceiling"


def ledger_kept(s: Sampler) -> None:
    """Period-to-date spend never falls within a period (an hourly ceiling's period may roll over
    during a run: the hour boundary starts a new ledger, as it should)."""
    spent = [(x["period"], x["spent"]) for x in s.samples if x["spent"] is not None]
    assert spent, "no spend observed"
    periods = [p for p, _ in spent]
    assert periods == sorted(periods), "the ledger went back to an older period"
    for (p1, a), (p2, b) in itertools.pairwise(spent):
        assert p1 != p2 or b >= a - 1e-9, (p1, a, b)


@world(replicas=2, rps=4.0)
def test_prometheus_sigkilled_holds_then_recovers(env: Env, tmp_path: Path) -> None:
    prom = PrometheusProcess(env.server.removeprefix("http://"), tmp_path)
    prom.start()
    try:
        env.apply_budget(budget("llm", env.pool, prom.url, behavior=HOLD))
        env.start_operator("a")
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 60, "metrics")
        with Sampler(env) as s:
            before, pool_before = env.replicas(), env.pool_size()
            killed_at, killed_wall = time.monotonic(), time.time()
            prom.kill()
            env.demand(40)  # unseen: must not cause a scale-up
            env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "False", 30, "the outage seen")
            record("fault_prometheus_killed_detect_seconds", time.monotonic() - killed_at)
            metrics = env.condition("MetricsAvailable")
            assert metrics["reason"] == "MetricsUnreachable" and "unreachable" in metrics["message"]
            assert env.events("MetricsUnavailable")
            # Blind ticks keep being decided (and written at the heartbeat): still no scale-up.
            env.wait_for(lambda: status_written_after(env, time.time() - 1), 20, "a plan decided while blind")
            restarted = time.monotonic()
            prom.start()
            env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 60, "recovery")
            record("fault_prometheus_killed_recovery_seconds", time.monotonic() - restarted)
            assert s.max("replicas", killed_at, restarted) <= before
            assert s.max("pool", killed_at, restarted) <= pool_before
            env.wait_for(lambda: env.replicas() > before, 30, "scaling up on the demand seen again")
            assert killed_wall < time.time()
        within_ceiling(s)
        ledger_kept(s)
        assert env.events("MetricsRecovered")
        assert_no_double_actuation(env)
    finally:
        prom.kill()


# (mode of the stand-in, MetricsAvailable reason, a fragment of its message)
BAD_ANSWERS = [
    ("hang", "MetricsUnreachable", "unreachable: no answer within 2s"),
    ("error500", "MetricsUnreachable", "HTTP Status Code 500"),
    ("bad_data", "MetricsUnreachable", "bad_data"),
    ("garbage", "MetricsUnreachable", "unexpected series"),
    ("absurd", "MetricsAbsurd", "not plausible"),
]


@world(replicas=2, rps=4.0)
def test_prometheus_hung_erroring_or_answering_garbage_never_scales_up(env: Env) -> None:
    proxy = FaultyPrometheus(env.prometheus)
    proxy.start()
    try:
        env.apply_budget(budget("llm", env.pool, proxy.url, behavior=HOLD))
        env.start_operator("a")
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 60, "metrics")
        with Sampler(env) as s:
            for mode, reason, fragment in BAD_ANSWERS:
                before, pool_before = env.replicas(), env.pool_size()
                faulted = time.monotonic()
                proxy.set(mode)
                env.demand(40)

                def seen(reason: str = reason) -> bool:
                    return env.condition("MetricsAvailable").get("reason") == reason

                env.wait_for(seen, 30, f"{mode}: MetricsAvailable={reason}")
                record(f"fault_prometheus_{mode}_detect_seconds", time.monotonic() - faulted)
                assert fragment in env.condition("MetricsAvailable")["message"]
                assert env.condition("Ready")["reason"] == "MetricsUnavailable"
                cleared = time.monotonic()
                proxy.set("forward")
                env.demand(4)
                env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 30, "recovery")
                record(f"fault_prometheus_{mode}_recovery_seconds", time.monotonic() - cleared)
                assert s.max("replicas", faulted, cleared) <= before, mode
                assert s.max("pool", faulted, cleared) <= pool_before, mode
        within_ceiling(s)
        ledger_kept(s)
        assert len(env.events("MetricsUnavailable")) >= len(BAD_ANSWERS)
        assert_no_double_actuation(env)
    finally:
        proxy.stop()


@world(replicas=1, rps=2.0)
def test_apiserver_restarted_mid_ramp(env: Env, api_client: client.ApiClient) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    proc = env.start_operator("a").proc
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "Ready=True")
    with Sampler(env) as s:
        env.demand(30)
        env.wait_for(lambda: env.replicas() > 1, 60, "the ramp under way")
        down_for = restart_apiserver(api_client, down_for=3)
        back, back_wall = time.monotonic(), time.time()
        record("fault_apiserver_outage_seconds", down_for)
        env.wait_for(lambda: status_written_after(env, back_wall), 60, "a status written after the restart")
        record("fault_apiserver_recovery_seconds", time.monotonic() - back)
        assert proc.poll() is None, "the operator exited"

        def converged() -> bool:
            return env.replicas() == 6 and env.pool_size() == 3

        env.wait_for(converged, 120, "6 replicas on 3 nodes", interval=1)
    within_ceiling(s)
    ledger_kept(s)
    assert_no_double_actuation(env)


@world(replicas=2, rps=4.0)
def test_concurrent_writers_on_the_deployment_and_the_status(env: Env) -> None:
    """Another writer sets the Deployment's replicas and zeroes the ledger in status, repeatedly.
    The operator only sends merge patches without a resourceVersion (on /scale, the provider
    objects and status), so a real apiserver never answers it 409: the last writer wins, and the
    operator, level-triggered, puts its plan back on its next tick. (409s on each write are
    injected in tests/unit/test_bad_input.py.)"""
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    env.start_operator("a")
    env.wait_for(lambda: env.status().get("spend", {}).get("periodToDate", 0) > 0, 60, "spend accrued")
    planned = env.wait_for(lambda: env.status().get("plan", {}).get("replicas"), 30, "a plan")
    env.wait_for(lambda: env.replicas() == env.status()["plan"]["replicas"], 30, "the plan applied")
    spent_before = env.status()["spend"]["periodToDate"]
    stop = threading.Event()

    def rogue() -> None:
        while not stop.is_set():
            with contextlib.suppress(ApiException):
                env.apps.patch_namespaced_deployment_scale("llm", env.ns, {"spec": {"replicas": 7}})
                env.custom.patch_namespaced_custom_object_status(
                    *MB, env.ns, "modelbudgets", "llm", {"status": {"controllerState": {"ledger": {"spent": 0}}}}
                )
            stop.wait(0.5)

    with Sampler(env) as s:
        writer = threading.Thread(target=rogue, daemon=True)
        writer.start()
        env.wait_for(lambda: len(env.events("Rescaled")) >= 2, 30, "the operator undoing the rogue writes")
        stop.set()
        writer.join()
        stopped = time.monotonic()
        planned = env.status()["plan"]["replicas"]
        env.wait_for(lambda: env.replicas() == planned, 15, "the plan back in place")
        record("fault_concurrent_writer_recovery_seconds", time.monotonic() - stopped)
        env.wait_for(lambda: env.status()["spend"]["periodToDate"] >= spent_before, 15, "the ledger restored")
    within_ceiling(s)  # the rogue raised replicas, never nodes: spend stayed under the ceiling


@world(replicas=2, rps=4.0)
def test_target_deployment_deleted_and_recreated(env: Env) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    env.start_operator("a")
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "Ready=True")
    pool_before = env.pool_size()
    env.apps.delete_namespaced_deployment("llm", env.ns)
    deleted = time.monotonic()
    env.wait_for(lambda: env.condition("Ready").get("reason") == "TargetNotFound", 30, "TargetNotFound")
    record("fault_target_deleted_detect_seconds", time.monotonic() - deleted)
    assert "Deployment" in env.condition("Ready")["message"] and "not found" in env.condition("Ready")["message"]
    assert env.events("TargetNotFound")
    assert env.pool_size() == pool_before  # nothing acted on without a target
    env.apps.create_namespaced_deployment(env.ns, gpu_deployment("llm", env.pool, 1))
    recreated = time.monotonic()
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 30, "Ready again")
    record("fault_target_recreated_recovery_seconds", time.monotonic() - recreated)
    env.wait_for(lambda: env.replicas() == env.status()["plan"]["replicas"], 30, "the plan applied to it")
    assert_no_double_actuation(env)


@world(replicas=2, rps=4.0)
def test_node_pool_object_missing(env: Env) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    env.start_operator("a")
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "Ready=True")
    spec = env.custom.get_cluster_custom_object(*POOLS, env.pool)["spec"]
    env.custom.delete_cluster_custom_object(*POOLS, env.pool)
    deleted = time.monotonic()
    env.wait_for(lambda: env.condition("Degraded").get("reason") == "ActuationFailed", 60, "ActuationFailed")
    record("fault_pool_missing_detect_seconds", time.monotonic() - deleted)
    message = env.condition("Degraded")["message"]
    assert env.pool in message and "HTTP 404" in message, message
    assert env.events("ActuationFailed")
    # The pool's nodes went with it: spend is what runs, zero, and nothing was created behind it.
    env.wait_for(lambda: env.status().get("spend", {}).get("currentPerHour") == 0, 60, "spend at zero")
    body = {"apiVersion": "/".join(POOLS[:2]), "kind": "KwokNodePool", "metadata": {"name": env.pool}, "spec": spec}
    env.custom.create_cluster_custom_object(*POOLS, body)
    recreated = time.monotonic()
    env.wait_for(lambda: env.condition("Degraded").get("status") == "False", 60, "Degraded=False")
    record("fault_pool_recreated_recovery_seconds", time.monotonic() - recreated)
    env.wait_for(lambda: env.running_pods() == env.replicas(), 60, "pods running on the new nodes")


KILLS = int(os.environ.get("MB_CHAOS_KILLS", "3"))
SEED = int(os.environ.get("MB_CHAOS_SEED", "7"))


@world(replicas=1, rps=2.0)
def test_operator_killed_at_random_points_during_a_ramp(env: Env) -> None:
    """SIGKILL the operator ``MB_CHAOS_KILLS`` times (seeded) while demand ramps, restarting it at
    once each time (the same identity, so it takes the lease straight back, like a restarted Pod
    of a StatefulSet). bench/chaos.py runs this longer with other seeds."""
    rng = random.Random(SEED)
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    proc = env.start_operator("a").proc
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "Ready=True")
    with Sampler(env) as s:
        post_json(f"{env.server}/control", {"rateCurve": "0:2,40:30"})
        for _ in range(KILLS):
            # A random point in the reconcile cycle (3 s interval): the point of the exercise.
            time.sleep(rng.uniform(0.5, 6.0))
            proc.kill()
            proc.wait()
            proc = env.start_operator("a").proc
        restarted = time.monotonic()

        def converged() -> bool:
            return env.replicas() == 6 and env.pool_size() == 3 and env.running_pods() == 6

        env.wait_for(converged, 150, "6 running replicas on 3 nodes", interval=1)
        record("chaos_converged_after_last_kill_seconds", time.monotonic() - restarted)
    within_ceiling(s)
    ledger_kept(s)
    assert_no_double_actuation(env)
    # Scale-up stays rate-limited across restarts: at most +4 replicas in any 5 s period.
    ups = [(x["t"], x["replicas"]) for x in s.samples]
    for t, r in ups:
        window = [r2 for t2, r2 in ups if t <= t2 <= t + 5]
        assert max(window) - r <= 4, (t, window)
