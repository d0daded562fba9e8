"""Two operator processes (Lease leader election): the leader is SIGKILLed during a demand ramp;
the standby takes over within a measured bound and no decision is applied twice."""

from __future__ import annotations

import time

import pytest
from support import (
    NODE_PRICE,
    Env,
    Sampler,
    assert_no_double_actuation,
    budget,
    post_json,
    record,
    status_written_after,
    world,
)

pytestmark = pytest.mark.e2e

LEASE_DURATION = 6  # Env.start_operator's --lease-duration


@world(replicas=1, rps=2.0)
def test_leader_killed_mid_ramp_the_standby_takes_over_once(env: Env) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    procs = {f"operator-{t}": env.start_operator(t).proc for t in ("a", "b")}
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "Ready=True")
    with Sampler(env) as s:
        post_json(f"{env.server}/control", {"rateCurve": "0:2,30:30"})
        env.wait_for(lambda: env.replicas() > 1, 60, "the ramp under way")
        leader = env.wait_for(env.leader, 10, "a leader")
        procs[leader].kill()  # no clean shutdown: the lease has to expire
        killed, killed_wall = time.monotonic(), time.time()
        env.wait_for(lambda: env.leader() not in (None, leader), 30, "the standby holding the lease")
        record("ha_lease_takeover_seconds", time.monotonic() - killed)
        env.wait_for(lambda: status_written_after(env, killed_wall + 0.5), 30, "the new leader deciding")
        took = time.monotonic() - killed
        record("ha_first_decision_after_kill_seconds", took)
        # The bound: the standby waits leaseDuration on an unchanged record, plus a retry
        # period (duration/7.5) to notice, plus one reconcile interval (3 s).
        assert took <= LEASE_DURATION + LEASE_DURATION / 7.5 + 3 + 2

        def converged() -> bool:
            return env.replicas() == 6 and env.pool_size() == 3

        env.wait_for(converged, 120, "6 replicas on 3 nodes", interval=1)
    assert max(max(x["pool"], x["nodes"]) for x in s.samples) * NODE_PRICE <= 3 * NODE_PRICE
    assert_no_double_actuation(env)

    # A clean shutdown (SIGTERM) hands the lease back at once.
    new_leader = env.leader()
    assert new_leader is not None
    replacement = env.start_operator("c").proc
    procs[new_leader].terminate()
    stopped = time.monotonic()
    env.wait_for(lambda: env.leader() == "operator-c", 30, "operator-c taking the released lease")
    record("ha_clean_handover_seconds", time.monotonic() - stopped)
    assert replacement.poll() is None
