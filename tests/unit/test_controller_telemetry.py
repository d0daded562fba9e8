"""The operator's /metrics as a projection of one reconcile, and series that leave with their ModelBudget."""

from __future__ import annotations

from prometheus_client import REGISTRY

from modelbudget.api import ControllerState
from modelbudget.api.pool import GpuPoolStatus, PoolGrant
from modelbudget.api.status import Condition, ConditionType
from modelbudget.controller import telemetry
from tests.builders import NOW, decide_for, make_spec, observe


def series(namespace: str, name: str) -> list[str]:
    return [
        f"{s.name}{s.labels}"
        for family in REGISTRY.collect()
        for s in family.samples
        if s.labels.get("namespace") == namespace and s.labels.get("name") == name
    ]


def record(name: str) -> None:
    spec = make_spec()
    decision = decide_for(observe(rps=5.0, replicas=2), spec, ControllerState(), NOW)
    ready = Condition(type=ConditionType.READY, status="True", reason="Enforcing", last_transition_time=NOW)
    telemetry.record("tel", name, spec, observe(rps=5.0, replicas=2), decision, [ready], 12.5)


def test_a_reconcile_is_projected_onto_the_gauges() -> None:
    record("projected")
    assert (
        REGISTRY.get_sample_value("modelbudget_projected_period_end_dollars", {"namespace": "tel", "name": "projected"})
        == 12.5
    )
    labels = {"namespace": "tel", "name": "projected", "type": "Ready"}
    assert REGISTRY.get_sample_value("modelbudget_condition", {**labels, "status": "True"}) == 1
    assert REGISTRY.get_sample_value("modelbudget_condition", {**labels, "status": "False"}) == 0
    assert (
        REGISTRY.get_sample_value("modelbudget_period_to_date_dollars", {"namespace": "tel", "name": "projected"}) == 0
    )
    replicas = {"namespace": "tel", "name": "projected"}
    assert REGISTRY.get_sample_value("modelbudget_replicas", {**replicas, "state": "buffer"}) == 0  # no forecast yet


def test_a_deleted_modelbudget_takes_its_series_with_it() -> None:
    record("gone")
    record("stays")
    assert series("tel", "gone") and series("tel", "stays")
    telemetry.forget("tel", "gone")
    assert series("tel", "gone") == []
    assert series("tel", "stays")


def test_a_pool_settlement_is_projected_and_a_claimant_that_left_takes_its_series() -> None:
    both = GpuPoolStatus(
        nodes=2,
        bill_per_hour=16.0,
        grants=[
            PoolGrant(namespace="tel-a", name="llm", claimed_gpus=3, granted_gpus=3, share_per_hour=9.6),
            PoolGrant(namespace="tel-b", name="llm", claimed_gpus=2, granted_gpus=2, share_per_hour=6.4),
        ],
    )
    telemetry.record_pool("tel-pool", both)
    share = {"pool": "tel-pool", "namespace": "tel-a", "name": "llm"}
    assert REGISTRY.get_sample_value("modelbudget_pool_share_dollars_per_hour", share) == 9.6
    assert REGISTRY.get_sample_value("modelbudget_pool_bill_dollars_per_hour", {"pool": "tel-pool"}) == 16.0
    telemetry.record_pool("tel-pool", both.model_copy(update={"grants": both.grants[1:]}))
    assert REGISTRY.get_sample_value("modelbudget_pool_share_dollars_per_hour", share) is None
    assert REGISTRY.get_sample_value("modelbudget_pool_granted_gpus", {**share, "namespace": "tel-b"}) == 2
