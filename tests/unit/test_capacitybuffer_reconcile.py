"""The reconcile flow with a CapacityBuffer API (fakes): the forecast's headroom is written to the
ModelBudget's buffer, set to 0 on stale metrics and when headroom no longer goes there (never
deleted), and never written where the cluster does not serve the API."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest

from modelbudget.adapters.capacitybuffer import Buffer, Owner
from modelbudget.api.status import ControllerState, DemandHistory
from modelbudget.controller.reconciler import ObjectRef
from modelbudget.core.observation import DemandSample
from tests.unit.fakes import FakeCluster, demand
from tests.unit.test_controller_reconcile import T0, Harness, demo_spec

REF = ObjectRef("demo", "demo-llm", generation=1, uid="0b6f-uid")
PEAKS = list(0.25 * np.arange(40))  # demand ramping to 9.75 req/s: the forecast wants 3 more replicas


@pytest.fixture
def cluster() -> FakeCluster:
    c = FakeCluster()
    c.pools.nodes = c.pools.sizes = {"gpu-pool": 1}
    c.tokens.limit = 8192
    c.scaler.replicas = c.scaler.ready = 4
    c.buffers.api_served = True
    return c


def ramping(cluster: FakeCluster, spec: dict[str, Any] | None = None) -> Harness:
    h = Harness(cluster, spec or demo_spec(), REF)
    start = T0 - timedelta(seconds=30 * (len(PEAKS) - 1))
    h.carried = ControllerState(
        token_limit=8192, demand_history=DemandHistory(start=start, bucket_seconds=30, peaks=PEAKS)
    )
    cluster.metrics.next = demand(T0, rps=PEAKS[-1])
    return h


def with_headroom(headroom: str) -> dict[str, Any]:
    spec = demo_spec()
    spec["behavior"] = {**spec["behavior"], "forecast": {"headroom": headroom}}
    return spec


def test_forecast_headroom_becomes_the_model_budgets_buffer(cluster: FakeCluster) -> None:
    h = ramping(cluster)
    out = h.tick(T0)
    plan = out.reconciled.decision.plan
    assert plan.buffer_replicas == 3 and plan.replicas == 4
    assert cluster.buffers.buffers == {("demo", "demo-llm"): (Buffer("demo-llm", 3), Owner("demo-llm", "0b6f-uid"))}
    assert cluster.scaler.sets == []  # the replicas follow demand; the buffer holds the headroom
    assert cluster.pools.resizes == [("gpu-pool", 2)]  # the buffer's node is in the pool's size
    kinds = [a.knob.value for a in out.actions]
    assert kinds.index("Nodes") < kinds.index("CapacityBuffer")  # room first, then placeholders
    assert "CapacityBufferResized" in {e.reason for e in out.events}
    assert h.status["plan"]["bufferReplicas"] == 3
    assert h.status["plan"]["expectedSpendPerHour"] <= h.status["plan"]["allowedSpendPerHour"]
    # The same buffer next tick: nothing is written.
    cluster.metrics.next = demand(T0 + timedelta(seconds=15), rps=PEAKS[-1])
    again = h.tick(T0 + timedelta(seconds=15))
    assert again.reconciled.decision.plan.buffer_replicas == 3
    assert len(cluster.buffers.writes) == 1 and "CapacityBuffer" not in [a.knob.value for a in again.actions]


def test_stale_metrics_set_the_buffer_to_zero_and_keep_it(cluster: FakeCluster) -> None:
    h = ramping(cluster)
    h.tick(T0)
    cluster.metrics.next = DemandSample(error="request rate: http://prom unreachable: ConnectionError")
    out = h.tick(T0 + timedelta(seconds=15))
    assert out.reconciled.decision.plan.buffer_replicas == 0
    assert cluster.buffers.read("demo", "demo-llm") == Buffer("demo-llm", 0)
    assert [(a.knob.value, a.before, a.after) for a in out.actions if a.knob.value == "CapacityBuffer"] == [
        ("CapacityBuffer", 3, 0)
    ]
    h.tick(T0 + timedelta(seconds=30))
    assert len(cluster.buffers.writes) == 2


def test_no_buffer_is_created_for_zero(cluster: FakeCluster) -> None:
    cluster.metrics.next = demand(T0, rps=1)  # no history: no forecast, no headroom
    Harness(cluster, demo_spec(), REF).tick(T0)
    assert cluster.buffers.writes == [] and cluster.buffers.buffers == {}


def test_headroom_moved_to_replicas_sets_the_buffer_left_from_before_to_zero(cluster: FakeCluster) -> None:
    h = ramping(cluster)
    h.tick(T0)
    h.spec = with_headroom("Replicas")
    cluster.metrics.next = demand(T0 + timedelta(seconds=15), rps=PEAKS[-1])
    out = h.tick(T0 + timedelta(seconds=15))
    assert cluster.buffers.read("demo", "demo-llm") == Buffer("demo-llm", 0)
    assert out.reconciled.decision.plan.buffer_replicas == 0
    assert cluster.scaler.sets and cluster.scaler.sets[-1] > 4  # the headroom is replicas again


def test_without_the_api_auto_buys_replicas_and_writes_no_buffer(cluster: FakeCluster) -> None:
    cluster.buffers.api_served = False
    h = ramping(cluster)
    out = h.tick(T0)
    assert out.reconciled.decision.plan.buffer_replicas == 0
    assert cluster.scaler.sets == [7]
    assert cluster.buffers.writes == []


def test_an_explicit_buffer_without_the_api_buys_nothing_and_says_why(cluster: FakeCluster) -> None:
    cluster.buffers.api_served = False
    h = ramping(cluster, with_headroom("CapacityBuffer"))
    out = h.tick(T0)
    plan = out.reconciled.decision.plan
    assert plan.buffer_replicas == 0 and cluster.scaler.sets == [] and cluster.buffers.writes == []
    assert "CapacityBufferNotServed" in [r["reason"] for r in h.status["plan"]["reasons"]]


def test_a_buffer_that_is_not_the_operators_degrades_while_the_other_knobs_move(cluster: FakeCluster) -> None:
    cluster.buffers.foreign = {("demo", "demo-llm")}
    h = ramping(cluster)
    out = h.tick(T0)
    assert cluster.buffers.writes == []
    assert h.condition("Degraded")["reason"] == "ActuationFailed"
    assert "not managed by modelbudget" in h.condition("Degraded")["message"]
    assert ("gpu-pool", 2) in cluster.pools.resizes
    assert "TokenLimit" in [a.knob.value for a in out.actions]


def test_recommend_mode_writes_no_buffer(cluster: FakeCluster) -> None:
    spec = demo_spec(mode="Recommend")
    h = ramping(cluster, spec)
    out = h.tick(T0)
    assert out.reconciled.decision.plan.buffer_replicas == 3
    assert cluster.buffers.writes == [] and cluster.writes() == 0
