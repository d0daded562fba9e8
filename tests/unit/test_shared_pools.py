"""Shared GPU pools over in-memory fakes: ModelBudgets claim, one pool reconciler writes the
provider object, each ledger is billed its share, and a namespace not allowed touches nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from modelbudget.adapters.gpupools import DeclaredPool, declared_pool
from modelbudget.api.pool import GpuPoolStatus
from modelbudget.controller.pools import PoolReconciler
from modelbudget.controller.reconciler import ObjectRef
from modelbudget.core.pools import Claimant, stated_claims
from tests.unit.fakes import FakeCluster, demand
from tests.unit.test_controller_reconcile import T0, Harness, apply_patch, demo_spec

POOL = "shared-l4"
POOL_BODY: dict[str, Any] = {
    "metadata": {"name": POOL},
    "spec": {
        "providerRef": {"kind": "KwokNodePool", "name": "kwok-shared"},
        "gpuType": "nvidia-l4",
        "pricePerGpuHour": 2.0,
        "gpusPerNode": 4,
        "minNodes": 0,
        "maxNodes": 4,
        "allowedNamespaces": {"namespaces": ["team-a"], "namespaceSelector": {"matchLabels": {"gpu-tenant": "yes"}}},
        "scaleDownStabilizationSeconds": 600,
    },
}


def shared_spec() -> dict[str, Any]:
    spec = demo_spec(sharedPools=[{"pool": POOL, "tokensPerSecondPerReplica": 1000}])
    del spec["nodePools"]
    return spec


class World:
    """ModelBudgets and one GpuPool, ticked like the handlers tick them, on one fake cluster."""

    def __init__(self, *namespaces: str) -> None:
        self.cluster = FakeCluster()
        self.cluster.tokens.limit = 8192
        self.cluster.gpu_pools.labels = {"team-b": {"gpu-tenant": "yes"}}
        self.cluster.pools.sizes = {"kwok-shared": 0}
        self.pool_status: dict[str, Any] = {}
        self._publish_pool()
        self.budgets = {
            ns: Harness(self.cluster, shared_spec(), ObjectRef(ns, "llm", generation=1)) for ns in namespaces
        }
        self.pools = PoolReconciler(self.cluster.pools, self.cluster.gpu_pools)

    def _publish_pool(self) -> None:
        pool = declared_pool({**POOL_BODY, "status": self.pool_status})
        assert pool is not None
        self.cluster.gpu_pools.pools = {POOL: pool}

    def claimants(self) -> list[Claimant]:
        """What the pool's writer reads from its mirror of the ModelBudgets (adapters/claims.py)."""
        return [c for ns, h in self.budgets.items() for c in stated_claims(ns, "llm", shared_spec(), h.status).values()]

    def tick(self, now: Any, rps: dict[str, float]) -> None:
        for ns, h in self.budgets.items():
            self.cluster.metrics.next = demand(now, rps=rps.get(ns, 0.0))
            h.tick(now)
        outcome = asyncio.run(self.pools.reconcile(POOL, POOL_BODY["spec"], self.pool_status, self.claimants(), now))
        if outcome.status_patch:
            self.pool_status = apply_patch(self.pool_status, outcome.status_patch)
        self._publish_pool()

    @property
    def status(self) -> GpuPoolStatus:
        return GpuPoolStatus.model_validate(self.pool_status)


def test_two_namespaces_share_one_pool_sized_to_the_sum_of_their_claims() -> None:
    world = World("team-a", "team-b")
    for i in range(4):
        world.tick(T0 + timedelta(seconds=30 * i), {"team-a": 8.0, "team-b": 4.0})
    status = world.status
    claimed = sum(g.claimed_gpus for g in status.grants)
    assert claimed > 0 and [g.namespace for g in status.grants] == ["team-a", "team-b"]
    assert all(g.granted_gpus == g.claimed_gpus for g in status.grants)
    assert world.cluster.pools.sizes["kwok-shared"] == status.nodes == -(-claimed // 4)
    # Only the pool reconciler wrote the provider object, and it is sized to whole nodes.
    assert {name for name, _ in world.cluster.pools.resizes} == {"kwok-shared"}


def test_each_ledger_is_billed_its_share_and_the_shares_add_up_to_the_bill() -> None:
    world = World("team-a", "team-b")
    for i in range(4):
        world.tick(T0 + timedelta(seconds=30 * i), {"team-a": 8.0, "team-b": 4.0})
    status = world.status
    assert status.bill_per_hour is not None
    shares = {g.namespace: g.share_per_hour for g in status.grants}
    assert sum(shares.values()) == pytest.approx(status.bill_per_hour)
    for ns, h in world.budgets.items():
        # What each ModelBudget's ledger accrues now is its share of the pool's bill.
        assert h.status["spend"]["currentPerHour"] == pytest.approx(shares[ns])


def test_the_pool_size_does_not_flap_when_demand_dips() -> None:
    world = World("team-a", "team-b")
    for i in range(3):
        world.tick(T0 + timedelta(seconds=30 * i), {"team-a": 8.0, "team-b": 4.0})
    peak = world.status.nodes
    sizes = []
    for i in range(3, 10):
        world.tick(T0 + timedelta(seconds=30 * i), {"team-a": 8.0 if i % 2 else 1.0, "team-b": 1.0})
        sizes.append(world.cluster.pools.sizes["kwok-shared"])
    assert sizes == [peak] * len(sizes)


def test_a_namespace_not_allowed_is_refused_and_causes_no_write_to_the_pool() -> None:
    world = World("team-a", "team-c")
    world.tick(T0, {"team-a": 4.0, "team-c": 50.0})
    refused = world.budgets["team-c"]
    assert refused.condition("Degraded")["reason"] == "PoolNotAllowed"
    assert "GpuPool shared-l4 does not allow namespace team-c" in refused.condition("Degraded")["message"]
    assert refused.status.get("poolClaims", []) == []
    assert [g.namespace for g in world.status.grants] == ["team-a"]


def test_a_claim_from_a_namespace_the_pool_no_longer_allows_is_ignored() -> None:
    world = World("team-a")
    world.tick(T0, {"team-a": 4.0})
    stale = world.claimants()[0]
    forged = Claimant("team-z", "llm", stale.claim.model_copy(update={"gpus": 16}))
    outcome = asyncio.run(
        world.pools.reconcile(POOL, POOL_BODY["spec"], world.pool_status, [stale, forged], T0 + timedelta(seconds=30))
    )
    assert outcome.status_patch is not None
    grants = apply_patch(world.pool_status, outcome.status_patch)["grants"]
    assert [g["namespace"] for g in grants] == ["team-a"]


def test_inline_provider_ref_to_a_shared_pool_is_refused_with_the_pool_to_use() -> None:
    world = World()
    spec = demo_spec()
    spec["nodePools"][0]["providerRef"] = {"kind": "KwokNodePool", "name": "kwok-shared"}
    h = Harness(world.cluster, spec, ObjectRef("team-a", "llm", generation=1))
    h.tick(T0)
    message = h.condition("Degraded")["message"]
    assert h.condition("Degraded")["reason"] == "PoolNotAllowed"
    assert "declared by GpuPool shared-l4" in message and "sharedPools[].pool: shared-l4" in message
    assert world.cluster.pools.resizes == []


def test_a_missing_gpu_pool_is_refused() -> None:
    cluster = FakeCluster()
    h = Harness(cluster, shared_spec(), ObjectRef("team-a", "llm", generation=1))
    h.tick(T0)
    assert "no GpuPool shared-l4 exists" in h.condition("Degraded")["message"]
    assert cluster.writes() == 0


def test_recommend_mode_claims_nothing() -> None:
    world = World("team-a")
    world.budgets["team-a"].spec["mode"] = "Recommend"
    world.tick(T0, {"team-a": 8.0})
    assert world.budgets["team-a"].status.get("poolClaims", []) == []
    assert world.cluster.pools.resizes == []


def test_the_pool_reports_a_provider_it_cannot_resize_and_keeps_the_grants() -> None:
    world = World("team-a")
    world.tick(T0, {"team-a": 8.0})
    granted = world.status.grants
    world.cluster.pools.fail_resize = True
    world.tick(T0 + timedelta(seconds=30), {"team-a": 30.0})
    assert "403" in (world.status.message or "")
    assert world.status.grants[0].namespace == granted[0].namespace


def test_an_unreadable_status_of_a_gpu_pool_reads_as_no_grants() -> None:
    pool = declared_pool({**POOL_BODY, "status": {"grants": "garbage"}})
    assert isinstance(pool, DeclaredPool) and pool.status is None
    assert declared_pool({"spec": {"maxNodes": -1}}) is None


def test_stated_claims_are_bounded_by_the_spec_and_refuse_what_does_not_parse() -> None:
    spec = shared_spec()  # replicas.max x GPUs per replica bounds any claim
    most = spec["replicas"]["max"] * spec["replicas"].get("gpusPerReplica", 1)
    claim = {"pool": POOL, "gpus": most + 8, "gpusPerReplica": 1, "payablePerHour": 10.0}
    other = {**claim, "pool": "not-named-in-the-spec"}
    stated = stated_claims("team-a", "llm", spec, {"poolClaims": [claim, other, {"pool": POOL, "gpus": "many"}]})
    assert list(stated) == [POOL]  # the pool the spec does not name, and the malformed claim, are dropped
    assert stated[POOL].key == ("team-a", "llm") and stated[POOL].claim.gpus == most
    assert stated_claims("team-a", "llm", {"curve": "broken"}, {"poolClaims": [claim]}) == {}
    assert stated_claims("team-a", "llm", spec, {}) == {}
