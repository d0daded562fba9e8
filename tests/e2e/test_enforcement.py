"""TokenLimitEnforced against real gates: the operator publishes the limit, a real ``modelbudget gate``
per pod applies it (watching the ConfigMap through the testbed apiserver) and Prometheus scrapes
what each gate applies. When the gates stop, the operator says the knob is not enforced -- a
Warning Event, the condition False, a plan that no longer counts on the limit -- and when they come
back it says so too."""

from __future__ import annotations

from pathlib import Path

import pytest
from gatekit import GateProcess, scrape, start_gate
from support import LOGS, Env, Testbed, budget, wait_for, world

pytestmark = pytest.mark.e2e

PODS = ("llm-gate-0", "llm-gate-1")


def start_gates(env: Env, testbed: Testbed) -> list[tuple[GateProcess, Path]]:
    """One gate per (pretend) pod, in front of the world's model server, scraped as that pod."""
    gates = []
    for pod in PODS:
        args = ["--namespace", env.ns, "--kubeconfig", env.kubeconfig, "--default-max-tokens", "4096"]
        gate = start_gate(env.server, *args, target="llm", log=LOGS / f"e2e-gate-{env.ns}-{pod}.log")
        gates.append((gate, scrape(testbed.targets_dir, gate, env.ns, pod)))
    return gates


def stop_gates(gates: list[tuple[GateProcess, Path]]) -> None:
    for gate, target in gates:
        gate.stop()
        target.unlink(missing_ok=True)


def enforced(env: Env) -> tuple[str | None, str | None]:
    cond = env.condition("TokenLimitEnforced")
    return cond.get("status"), cond.get("reason")


@world(replicas=2, rps=2.0, builtin_gate=False)
def test_token_limit_enforced_follows_the_real_gates(env: Env, testbed: Testbed) -> None:
    gates = start_gates(env, testbed)
    try:
        env.apply_budget(budget("llm", env.pool, env.prometheus, tokenLimits={"enforcementGraceSeconds": 5}))
        env.start_operator()
        wait_for(lambda: enforced(env) == ("True", "Enforced"), 90, "TokenLimitEnforced=True")
        published = env.token_limit()
        assert all(gate.metric("modelbudget_gate_token_limit") == published for gate, _ in gates)
        # Demand is the gates' arrivals once the first answers give token figures (metrics held before).
        wait_for(lambda: env.status().get("demand", {}).get("source") == "Gate", 60, "demand read from the gates")
        warnings_before = len(env.events("NoGate"))

        stop_gates(gates)
        wait_for(lambda: enforced(env) == ("False", "NoGate"), 60, "TokenLimitEnforced=False/NoGate")
        warnings = env.events("NoGate")
        assert len(warnings) > warnings_before and all(e.type == "Warning" for e in warnings)
        assert {e.source.component for e in warnings} == {"modelbudget-operator"}
        reasons = wait_for(
            lambda: {r["reason"] for r in env.status()["plan"]["reasons"]} & {"LimitNotEnforced"},
            30,
            "a plan that does not count on the limit",
        )
        assert reasons == {"LimitNotEnforced"}

        gates = start_gates(env, testbed)
        wait_for(lambda: enforced(env) == ("True", "Enforced"), 60, "TokenLimitEnforced=True again")
        assert env.events("Enforced")
    finally:
        stop_gates(gates)
