"""The reconcile flow against in-memory fakes: what it changes, what it refuses, what it writes."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelbudget.api.status import ControllerState
from modelbudget.controller import status as st
from modelbudget.controller.reconciler import ObjectRef, Outcome
from modelbudget.core.observation import DemandSample, GateReport
from tests.unit.fakes import FakeCluster, as_the_apiserver_stores_it, demand, example_reconciler

EXAMPLE = Path(__file__).parents[2] / "examples" / "local-demo.yaml"
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
REF = ObjectRef("demo", "demo-llm", generation=1)


def demo_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())["spec"]
    spec.update(overrides)
    return spec


def apply_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = apply_patch(out[key], value)
        else:
            out[key] = value
    return out


class Harness:
    """Runs ticks like the kopf handler does: status stored between ticks, state carried in memory."""

    def __init__(self, cluster: FakeCluster, spec: dict[str, Any], ref: ObjectRef = REF) -> None:
        self.cluster = cluster
        self.spec = spec
        self.ref = ref
        self.status: dict[str, Any] = {}
        self.carried: ControllerState | None = None
        self.reconciler = example_reconciler(cluster.adapters)
        self.writes = 0

    def tick(self, now: datetime) -> Outcome:
        outcome = asyncio.run(self.reconciler.reconcile(self.ref, self.spec, self.status, self.carried, now))
        self.carried = outcome.reconciled.decision.next_state if outcome.reconciled else None
        if outcome.status_patch:
            self.writes += 1
            self.status = as_the_apiserver_stores_it(apply_patch(self.status, outcome.status_patch))
        return outcome

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == type_)


@pytest.fixture
def cluster() -> FakeCluster:
    c = FakeCluster()
    c.pools.nodes = {"gpu-pool": 1}
    c.pools.sizes = {"gpu-pool": 1}
    c.tokens.limit = 8192
    return c


def test_demand_raises_nodes_before_replicas_and_reports_it(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=20)
    h = Harness(cluster, demo_spec())
    out = h.tick(T0)
    assert cluster.pools.resizes and cluster.pools.resizes[0][1] > 1
    assert cluster.scaler.sets == [5]  # scale-up limit: +4 per period from 1
    kinds = [a.knob.value for a in out.actions]
    assert kinds.index("Nodes") < kinds.index("Replicas")
    assert {"NodePoolResized", "Rescaled"} <= {e.reason for e in out.events}
    assert h.status["plan"]["replicas"] == 5
    assert h.status["spend"]["currentPerHour"] == 8.0
    assert h.condition("Ready")["status"] == "True"
    assert h.status["controllerState"]["ledger"]["spent"] == 0.0


def test_nothing_changed_means_no_status_write_and_no_events(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=0.5)
    h = Harness(cluster, demo_spec())
    h.tick(T0)
    assert h.writes == 1
    cluster.metrics.next = demand(T0 + timedelta(seconds=15), rps=0.5)
    second = h.tick(T0 + timedelta(seconds=15))
    assert second.status_patch is None and second.events == [] and h.writes == 1
    cluster.metrics.next = demand(T0 + timedelta(seconds=75), rps=0.5)
    assert h.tick(T0 + timedelta(seconds=75)).status_patch is not None  # heartbeat


def test_a_steady_model_budget_writes_only_when_its_budget_period_rolls_over(cluster: FakeCluster) -> None:
    """Steady state: an hour of ticks, one write at the start and one when the period rolls over
    (the ledger starts again, which must survive a restart); everything else waits for the
    heartbeat. A restart then bills the time since the last write: nothing is under-counted."""
    h = Harness(cluster, demo_spec())  # ceiling per Hour
    h.reconciler.heartbeat = timedelta(hours=2)
    for k in range(240):  # 12:00:00 .. 12:59:45, every 15 s, demand measured with noise
        at = T0 + timedelta(seconds=15 * k)
        cluster.metrics.next = demand(at, rps=0.5 + 0.01 * (k % 7))
        h.tick(at)
    assert h.writes == 1  # neither the noise nor the forecast made from it (which starts meanwhile)
    assert "forecast" not in h.status["plan"]
    at = T0 + timedelta(hours=1)
    cluster.metrics.next = demand(at, rps=0.5)
    h.tick(at)
    assert h.writes == 2 and h.status["spend"]["periodStart"] == "2026-01-05T13:00:00Z"
    for k in range(1, 40):  # ten more minutes, nothing written
        at = T0 + timedelta(hours=1, seconds=15 * k)
        cluster.metrics.next = demand(at, rps=0.5)
        h.tick(at)
    assert h.writes == 2
    restarted = Harness(cluster, h.spec)
    restarted.status = h.status
    at = T0 + timedelta(hours=1, minutes=10)
    cluster.metrics.next = demand(at, rps=0.5)
    restarted.tick(at)
    assert restarted.status["spend"]["periodToDate"] == pytest.approx(8.0 / 6)  # one $8/h node, ten minutes


def test_recommend_mode_computes_but_changes_nothing(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=20)
    h = Harness(cluster, demo_spec(mode="Recommend"))
    out = h.tick(T0)
    assert cluster.writes() == 0 and out.actions == []
    assert h.status["plan"]["replicas"] > 1
    assert h.condition("Ready")["reason"] == "Recommending"


def test_a_conflicting_autoscaler_blocks_every_action(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=20)
    cluster.conflicts.found = ["HorizontalPodAutoscaler/demo-llm"]
    h = Harness(cluster, demo_spec())
    out = h.tick(T0)
    assert cluster.writes() == 0
    assert h.condition("Degraded")["reason"] == "ConflictingAutoscaler"
    assert h.condition("Ready")["status"] == "False"
    assert [e.reason for e in out.events if e.type == "Warning"] == ["ConflictingAutoscaler"]
    cluster.metrics.next = demand(T0 + timedelta(seconds=15), rps=20)
    assert h.tick(T0 + timedelta(seconds=15)).events == []  # said once, not every tick


def test_recommend_mode_next_to_an_hpa_is_a_shadow_run_not_a_conflict(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=20)
    cluster.conflicts.found = ["HorizontalPodAutoscaler/demo-llm"]
    h = Harness(cluster, demo_spec(mode="Recommend"))
    h.tick(T0)
    assert cluster.writes() == 0
    assert h.condition("Ready")["reason"] == "Recommending"
    assert h.condition("Degraded")["status"] == "False"


def test_invalid_spec_sets_a_condition_and_an_event_and_touches_nothing(cluster: FakeCluster) -> None:
    spec = demo_spec()
    spec["replicas"] = {"min": 5, "max": 2}
    h = Harness(cluster, spec)
    out = h.tick(T0)
    assert cluster.writes() == 0 and cluster.metrics.calls == []
    assert h.condition("Ready")["reason"] == "InvalidSpec"
    assert "replicas.min must not exceed replicas.max" in h.condition("Ready")["message"]
    assert [e.reason for e in out.events] == ["InvalidSpec"]
    assert h.tick(T0 + timedelta(seconds=15)).status_patch is None


def test_metrics_outage_holds_then_falls_back_then_recovers(cluster: FakeCluster) -> None:
    spec = demo_spec()
    spec["behavior"]["fallback"] = {"afterSeconds": 60, "action": "ScaleTo", "replicas": 2}
    cluster.scaler.replicas = cluster.scaler.ready = 4
    cluster.pools.nodes = cluster.pools.sizes = {"gpu-pool": 1}
    h = Harness(cluster, spec)
    cluster.metrics.next = demand(T0, rps=20)
    h.tick(T0)
    replicas = cluster.scaler.replicas
    cluster.metrics.next = DemandSample(error="request rate: http://prom unreachable: ConnectionError")
    out = h.tick(T0 + timedelta(seconds=15))
    assert cluster.scaler.replicas == replicas  # no scale-up while blind
    assert h.condition("MetricsAvailable")["status"] == "False"
    assert "MetricsUnavailable" in [e.reason for e in out.events]
    h.tick(T0 + timedelta(seconds=90))
    assert cluster.scaler.replicas == 2
    assert h.condition("Degraded")["reason"] == "MetricsFallback"
    cluster.metrics.next = demand(T0 + timedelta(seconds=105), rps=20)
    out = h.tick(T0 + timedelta(seconds=105))
    assert h.condition("MetricsAvailable")["status"] == "True"
    assert "MetricsRecovered" in [e.reason for e in out.events]


def test_a_failed_secondary_query_is_reported_while_the_rate_is_used(cluster: FakeCluster) -> None:
    h = Harness(cluster, demo_spec())
    cluster.metrics.next = dataclasses.replace(demand(T0, rps=20), unread=("latencyP95: prom unreachable",))
    out = h.tick(T0)
    metrics = h.condition("MetricsAvailable")
    assert metrics["status"] == "True" and "not read: latencyP95: prom unreachable" in metrics["message"]
    assert "MetricsPartial" in out.problems
    cluster.metrics.next = demand(T0 + timedelta(seconds=15), rps=20)
    out = h.tick(T0 + timedelta(seconds=15))
    assert "not read" not in h.condition("MetricsAvailable")["message"] and "MetricsPartial" not in out.problems


def test_nan_and_absurd_metrics_never_scale_up(cluster: FakeCluster) -> None:
    h = Harness(cluster, demo_spec())
    for sample in (
        DemandSample(at=T0, request_rate=None),
        DemandSample(at=T0, request_rate=1e12),
        DemandSample(at=T0 - timedelta(hours=1), request_rate=50.0, generated_tokens_per_request=400),
    ):
        cluster.metrics.next = sample
        h.tick(T0)
        assert cluster.scaler.sets == []
    assert h.condition("MetricsAvailable")["reason"] == "MetricsStale"


def test_restart_resumes_the_ledger_from_status(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=0.5)
    h = Harness(cluster, demo_spec())
    h.tick(T0)
    cluster.metrics.next = demand(T0 + timedelta(minutes=30), rps=0.5)
    h.tick(T0 + timedelta(minutes=30))  # heartbeat: spend so far written
    spent = h.status["spend"]["periodToDate"]
    assert spent == pytest.approx(4.0)  # one $8/h node for half an hour
    restarted = Harness(cluster, h.spec)
    restarted.status = h.status
    applied_before_restart = list(cluster.scaler.sets)
    cluster.metrics.next = demand(T0 + timedelta(minutes=45), rps=0.5)
    restarted.tick(T0 + timedelta(minutes=45))
    assert restarted.status["spend"]["periodToDate"] == pytest.approx(6.0)
    assert cluster.scaler.sets == applied_before_restart  # nothing re-applied


def test_the_ceiling_binds_the_token_limit_first(cluster: FakeCluster) -> None:
    spec = demo_spec()
    spec["budget"]["ceiling"]["amount"] = 16  # two nodes at most
    cluster.scaler.replicas = cluster.scaler.ready = 8
    cluster.pools.nodes = cluster.pools.sizes = {"gpu-pool": 2}
    cluster.metrics.next = demand(T0, rps=40, generated=4000)
    h = Harness(cluster, spec)
    out = h.tick(T0)
    assert cluster.tokens.published and cluster.tokens.published[0] < 8192
    assert out.actions[0].knob.value == "TokenLimit"
    assert h.status["plan"]["expectedSpendPerHour"] <= 16
    assert h.condition("BudgetLimited")["status"] == "True"


def test_a_failing_knob_degrades_but_the_others_still_move(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=20)
    cluster.pools.fail_resize = True
    h = Harness(cluster, demo_spec())
    h.tick(T0)
    assert cluster.scaler.sets
    assert h.condition("Degraded")["reason"] == "ActuationFailed"
    assert "HTTP 403" in h.condition("Degraded")["message"]


def test_missing_deployment_is_reported_not_created(cluster: FakeCluster) -> None:
    cluster.scaler.exists = False
    cluster.metrics.next = demand(T0, rps=20)
    h = Harness(cluster, demo_spec())
    h.tick(T0)
    assert cluster.writes() == 0
    assert h.condition("Ready")["reason"] == "TargetNotFound"


def test_credentials_come_from_secrets_and_a_missing_one_is_a_metrics_error(cluster: FakeCluster) -> None:
    spec = demo_spec()
    spec["metrics"]["auth"] = {"bearerTokenSecretRef": {"name": "prom", "key": "token"}}
    h = Harness(cluster, spec)
    cluster.metrics.next = demand(T0, rps=1)
    h.tick(T0)
    assert h.condition("MetricsAvailable")["reason"] == "MetricsUnreachable"
    assert "prom" in h.condition("MetricsAvailable")["message"]
    cluster.secrets.data[("demo", "prom", "token")] = "s3cret"
    h.tick(T0 + timedelta(seconds=15))
    assert cluster.metrics.calls[-1][1].bearer_token == "s3cret"
    assert "s3cret" not in repr(cluster.metrics.calls[-1][1])
    assert "s3cret" not in str(h.status)


def test_status_document_round_trips_through_the_api_model(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=5)
    h = Harness(cluster, demo_spec())
    h.tick(T0)
    from modelbudget.api.status import ModelBudgetStatus

    parsed = ModelBudgetStatus.model_validate(h.status)
    assert st.status_document(parsed)["plan"] == h.status["plan"]


def test_stopped_gates_turn_token_limit_enforced_false_with_a_warning_and_back(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=4)
    h = Harness(cluster, demo_spec())
    h.tick(T0)
    assert h.condition("TokenLimitEnforced")["status"] == "True"
    cluster.gates_running = False
    cluster.metrics.next = demand(T0 + timedelta(seconds=15), rps=4)
    out = h.tick(T0 + timedelta(seconds=15))
    assert (h.condition("TokenLimitEnforced")["status"], h.condition("TokenLimitEnforced")["reason"]) == (
        "False",
        "NoGate",
    )
    assert [(e.type, e.reason) for e in out.events if e.type == "Warning"] == [("Warning", "NoGate")]
    assert "LimitNotEnforced" in {r["reason"] for r in h.status["plan"]["reasons"]}
    cluster.gates_running = True
    cluster.metrics.next = demand(T0 + timedelta(seconds=30), rps=4)
    out = h.tick(T0 + timedelta(seconds=30))
    assert h.condition("TokenLimitEnforced")["status"] == "True"
    assert ("Normal", "Enforced") in [(e.type, e.reason) for e in out.events]


def test_a_gate_that_keeps_an_old_limit_past_the_grace_period_is_stale(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=4)
    h = Harness(cluster, demo_spec())
    h.tick(T0)
    stuck = float(cluster.tokens.limit or 0) * 2  # what a gate that stopped reading the ConfigMap applies
    cluster.metrics.gates = lambda: GateReport((stuck,))
    for t in (15, 30):
        cluster.metrics.next = demand(T0 + timedelta(seconds=t), rps=4)
        h.tick(T0 + timedelta(seconds=t))
        assert h.condition("TokenLimitEnforced")["status"] == "True"  # within the 30 s grace: Propagating
    cluster.metrics.next = demand(T0 + timedelta(seconds=50), rps=4)
    out = h.tick(T0 + timedelta(seconds=50))
    assert (h.condition("TokenLimitEnforced")["status"], h.condition("TokenLimitEnforced")["reason"]) == (
        "False",
        "Stale",
    )
    assert ("Warning", "Stale") in [(e.type, e.reason) for e in out.events]


def test_the_admission_cap_is_published_per_ready_pod_and_removed_when_it_lifts(cluster: FakeCluster) -> None:
    cluster.scaler.replicas = cluster.scaler.ready = 4
    cluster.metrics.next = demand(T0, rps=500)  # far more than the ceiling buys even at the smallest limit
    h = Harness(cluster, demo_spec())
    out = h.tick(T0)
    admitted = h.status["plan"]["admittedRequestsPerSecond"]
    assert cluster.tokens.admitted_rps_per_pod == pytest.approx(admitted / 4, rel=1e-2)
    assert "AdmissionChanged" in {e.reason for e in out.events}
    cluster.metrics.next = demand(T0 + timedelta(seconds=15), rps=1)
    h.tick(T0 + timedelta(seconds=15))
    assert cluster.tokens.admitted_rps_per_pod is None
