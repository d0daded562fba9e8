"""A tenant's ModelBudget cannot make the operator resize node pools in another namespace (issue 12's
reproduction: kube-system/prod-gpus patched from 7 replicas to 1 by a ModelBudget in t1)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.controller.reconciler import ObjectRef
from modelbudget.core.tenancy import pools_not_allowed
from tests.builders import spec_dict
from tests.unit.fakes import FakeCluster
from tests.unit.test_controller_reconcile import Harness

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
TENANT = "t1"


def pool(name: str, **provider: Any) -> dict[str, Any]:
    return {**spec_dict()["nodePools"][0], "name": name, "maxNodes": 1, "providerRef": {"name": name, **provider}}


def spec(*pools: dict[str, Any]) -> dict[str, Any]:
    return spec_dict(nodePools=list(pools), targetRef={"name": "llm"})


@pytest.mark.parametrize(
    "pools",
    [
        [pool("a", kind="MachineDeployment")],
        [pool("a", kind="MachineDeployment", namespace=TENANT)],
        [{**spec_dict()["nodePools"][0]}],  # no providerRef: observed, never resized
    ],
    ids=["own namespace by default", "own namespace named", "no provider"],
)
def test_pools_in_the_own_namespace_are_allowed(pools: list[dict[str, Any]]) -> None:
    assert pools_not_allowed(ModelBudgetSpec.model_validate(spec(*pools)), TENANT) == []


def test_cluster_scoped_pools_inline_are_refused_unless_the_operator_allows_them() -> None:
    # A Karpenter NodePool or a KwokNodePool belongs to no namespace: any tenant naming it inline
    # could resize capacity it was never granted. The message says how to migrate.
    mb = ModelBudgetSpec.model_validate(spec(pool("a", kind="NodePool"), pool("b", kind="KwokNodePool")))
    refused = pools_not_allowed(mb, TENANT)
    assert len(refused) == 2
    assert "NodePool a is cluster-scoped capacity" in refused[0]
    assert "sharedPools[].pool" in refused[0] and "--inline-cluster-pools=allow" in refused[0]
    assert "KwokNodePool b" in refused[1]
    assert pools_not_allowed(mb, TENANT, inline_cluster_pools=True) == []


def test_each_pool_in_another_namespace_is_named() -> None:
    mb = ModelBudgetSpec.model_validate(
        spec(
            pool("mine", kind="MachineDeployment"),
            pool("prod-gpus", kind="MachineDeployment", namespace="kube-system"),
            pool("other", kind="MachineDeployment", namespace="team-b"),
        )
    )
    refused = pools_not_allowed(mb, TENANT)
    assert len(refused) == 2
    assert "MachineDeployment kube-system/prod-gpus is in another namespace" in refused[0]
    assert "only resize provider objects in its own namespace (t1)" in refused[0]
    assert "team-b/other" in refused[1]


def reproduction(namespace: str | None) -> tuple[FakeCluster, Harness]:
    """Issue 12: a ModelBudget in t1 names MachineDeployment prod-gpus (7 replicas) with maxNodes 1;
    its Deployment exists, its Prometheus is unreachable (the fake's default: no sample)."""
    cluster = FakeCluster()
    cluster.pools.nodes = {"prod-gpus": 7}
    cluster.pools.sizes = {"prod-gpus": 7}
    provider = {"kind": "MachineDeployment"} | ({"namespace": namespace} if namespace else {})
    return cluster, Harness(cluster, spec(pool("prod-gpus", **provider)), ObjectRef(TENANT, "llm", generation=1))


def test_a_pool_in_another_namespace_is_refused_and_nothing_is_read_or_written() -> None:
    cluster, h = reproduction("kube-system")
    out = h.tick(T0)
    assert cluster.pools.resizes == [] and cluster.writes() == 0
    assert cluster.pools.reads == [] and cluster.metrics.calls == []  # not even looked at
    assert out.reconciled is None and out.problems == ["PoolNotAllowed"]
    for kind in ("Ready", "Degraded"):
        assert h.condition(kind)["reason"] == "PoolNotAllowed"
    assert "kube-system/prod-gpus" in h.condition("Degraded")["message"]
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "PoolNotAllowed")]
    assert "kube-system/prod-gpus" in out.events[0].message
    # Said once; later ticks change nothing and write nothing.
    later = h.tick(T0 + timedelta(seconds=15))
    assert later.events == [] and later.status_patch is None and cluster.writes() == 0


def test_the_same_pool_in_the_own_namespace_is_resized_as_before() -> None:
    # The control: without the cross-namespace reference the very same spec does resize 7 -> 1,
    # so the refusal above is the check at work, not a plan that happened to change nothing.
    cluster, h = reproduction(None)
    h.tick(T0)
    assert cluster.pools.resizes == [("prod-gpus", 1)]


def test_fixing_the_reference_lifts_the_refusal() -> None:
    cluster, h = reproduction("kube-system")
    h.tick(T0)
    h.spec = spec(pool("prod-gpus", kind="MachineDeployment"))
    h.tick(T0 + timedelta(seconds=15))
    assert h.condition("Degraded")["reason"] != "PoolNotAllowed"
    assert cluster.pools.reads == ["prod-gpus"]


def test_an_inline_cluster_scoped_pool_is_resized_only_where_the_operator_allows_it() -> None:
    for allowed in (False, True):
        cluster = FakeCluster()
        cluster.pools.nodes = cluster.pools.sizes = {"shared-l4": 7}
        h = Harness(cluster, spec(pool("shared-l4", kind="KwokNodePool")), ObjectRef(TENANT, "llm", generation=1))
        h.reconciler.inline_cluster_pools = allowed
        out = h.tick(T0)
        if allowed:
            assert cluster.pools.resizes == [("shared-l4", 1)]
        else:
            assert cluster.pools.resizes == [] and cluster.pools.reads == []
            assert out.problems == ["PoolNotAllowed"]
            assert "--inline-cluster-pools=allow" in h.condition("Degraded")["message"]
