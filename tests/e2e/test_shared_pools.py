"""Issue 12 on the testbed: two namespaces share one KwokNodePool through one GpuPool.

One operator watches three namespaces. Two are allowed on the GpuPool, one is not. Each
ModelBudget's Prometheus is unreachable, so its plan holds its Deployment's replicas, and that
is what it claims: 3 and 2 GPUs. The pool must be sized once to the sum (3 nodes of 2 GPUs),
each ledger billed its share, the shares adding up to the pool's bill, the size steady over
several reconciles, and the third namespace refused (PoolNotAllowed) with no write to the pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from support import LOGS, free_port, start_modelbudget, stop_process, unique, wait_for

pytestmark = pytest.mark.e2e

GPUS_PER_NODE = 2
PRICE = 3.0
POOLS = ("testbed.modelbudget.dev", "v1alpha1", "kwoknodepools")
GPU_POOLS = ("modelbudget.dev", "v1alpha1", "gpupools")
BUDGETS = ("modelbudget.dev", "v1alpha1")
REPLICAS = {"a": 3, "b": 2, "c": 4}  # c is the namespace the pool does not allow
TICK = 2  # the operator's --interval


@pytest.fixture
def namespaces(api_client: client.ApiClient) -> Iterator[dict[str, str]]:
    core = client.CoreV1Api(api_client)
    names = {key: unique(f"e2e-shared-{key}") for key in REPLICAS}
    for name in names.values():
        core.create_namespace({"metadata": {"name": name}})
    yield names
    for name in names.values():
        core.delete_namespace(name)


def deployment(replicas: int) -> dict[str, Any]:
    labels = {"app": "llm"}
    container = {"name": "server", "image": "fake.invalid/vllm:latest"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llm"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def model_budget(pool: str) -> dict[str, Any]:
    return {
        "apiVersion": "modelbudget.dev/v1alpha1",
        "kind": "ModelBudget",
        "metadata": {"name": "llm"},
        "spec": {
            "targetRef": {"name": "llm"},
            "curve": {"intercept": 0.1, "slope": 0.08, "minTokens": 64, "maxTokens": 4096},
            "budget": {"ceiling": {"amount": 100, "period": "Hour"}, "valuePerPoint": 0.01},
            "replicas": {"min": 1, "max": 8},
            "sharedPools": [{"pool": pool, "tokensPerSecondPerReplica": 1000}],
            "metrics": {"prometheusUrl": f"http://127.0.0.1:{free_port()}", "timeoutSeconds": 1},
        },
    }


class Shared:
    def __init__(self, api: client.ApiClient, names: dict[str, str], kwok: str, pool: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.names, self.kwok, self.pool = names, kwok, pool

    def pool_status(self) -> dict[str, Any]:
        return dict(self.custom.get_cluster_custom_object(*GPU_POOLS, self.pool).get("status") or {})

    def kwok_pool(self) -> dict[str, Any]:
        return dict(self.custom.get_cluster_custom_object(*POOLS, self.kwok))

    def budget(self, key: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(*BUDGETS, self.names[key], "modelbudgets", "llm"))

    def billed(self, key: str) -> float:
        """What the ModelBudget's ledger accrues now ($/h), -1 before its first status."""
        spend = (self.budget(key).get("status") or {}).get("spend") or {}
        return float(spend.get("currentPerHour", -1))

    def condition(self, key: str, kind: str) -> dict[str, Any]:
        status = self.budget(key).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == kind), {})

    def apply_budget(self, key: str) -> None:
        self.custom.create_namespaced_custom_object(*BUDGETS, self.names[key], "modelbudgets", model_budget(self.pool))

    def events(self, namespace: str, reason: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.reason == reason]


@pytest.fixture
def shared(
    api_client: client.ApiClient,
    modelbudget_crd: None,
    namespaces: dict[str, str],
    node_pool: Callable[..., str],
    testbed: Any,
) -> Iterator[Shared]:
    """The KwokNodePool (1 node), its GpuPool allowing a and b, the Deployments, and one operator
    on all three namespaces; afterwards the operator stops and its finalizers are released."""
    kwok = node_pool(replicas=1, gpus_per_node=GPUS_PER_NODE, delay=1)
    pool = unique("shared")
    custom = client.CustomObjectsApi(api_client)
    custom.create_cluster_custom_object(
        *GPU_POOLS,
        {
            "apiVersion": "modelbudget.dev/v1alpha1",
            "kind": "GpuPool",
            "metadata": {"name": pool},
            "spec": {
                "providerRef": {"kind": "KwokNodePool", "name": kwok},
                "gpuType": "nvidia-l4",
                "pricePerGpuHour": PRICE,
                "gpusPerNode": GPUS_PER_NODE,
                "maxNodes": 6,
                "allowedNamespaces": {"namespaces": [namespaces["a"], namespaces["b"]]},
                "scaleDownStabilizationSeconds": 600,
            },
        },
    )
    apps = client.AppsV1Api(api_client)
    for key, replicas in REPLICAS.items():
        apps.create_namespaced_deployment(namespaces[key], deployment(replicas))
    args = ["run", "--kubeconfig", testbed.kubeconfig, "--interval", str(TICK), "--no-leader-election"]
    for name in namespaces.values():
        args += ["-n", name]
    args += ["--metrics-addr", f"127.0.0.1:{free_port()}", "--liveness", f"http://127.0.0.1:{free_port()}/healthz"]
    proc = start_modelbudget(args, LOGS / f"e2e-operator-{pool}.log")
    yield Shared(api_client, namespaces, kwok, pool)
    stop_process(proc)
    release = {"metadata": {"finalizers": None}}
    for name in namespaces.values():
        for mb in custom.list_namespaced_custom_object(*BUDGETS, name, "modelbudgets")["items"]:
            custom.patch_namespaced_custom_object(*BUDGETS, name, "modelbudgets", mb["metadata"]["name"], release)
    custom.patch_cluster_custom_object(*GPU_POOLS, pool, release)
    custom.delete_cluster_custom_object(*GPU_POOLS, pool)


def test_two_namespaces_share_one_pool_and_a_third_is_refused_without_touching_it(shared: Shared) -> None:
    shared.apply_budget("a")
    shared.apply_budget("b")
    claimed = REPLICAS["a"] + REPLICAS["b"]
    nodes = math.ceil(claimed / GPUS_PER_NODE)

    def settled() -> dict[str, Any] | None:
        status = shared.pool_status()
        grants = status.get("grants") or []
        ok = sorted(g["grantedGpus"] for g in grants) == sorted([REPLICAS["a"], REPLICAS["b"]])
        return status if ok and status.get("nodes") == nodes else None

    status = wait_for(settled, 60, f"the GpuPool granting both claims on {nodes} nodes")
    # The pool is sized once, to the sum of the claims, by the operator alone.
    kwok = shared.kwok_pool()
    assert kwok["spec"]["replicas"] == nodes
    bill = nodes * GPUS_PER_NODE * PRICE
    assert status["billPerHour"] == pytest.approx(bill)

    # Each ledger is billed its share; the shares add up to the pool's bill.
    shares = {g["namespace"]: g["sharePerHour"] for g in status["grants"]}
    assert sum(shares.values()) == pytest.approx(bill)
    for key in ("a", "b"):
        expected = bill * REPLICAS[key] / claimed
        assert shares[shared.names[key]] == pytest.approx(expected)
        wait_for(lambda k=key, e=expected: abs(shared.billed(k) - e) < 1e-6, 30, f"{key}'s ledger billed its share")

    # The third namespace is refused, and its manifest causes no write to the pool.
    generation = kwok["metadata"]["generation"]
    shared.apply_budget("c")
    wait_for(lambda: shared.condition("c", "Degraded").get("reason") == "PoolNotAllowed", 30, "PoolNotAllowed on c")
    assert f"does not allow namespace {shared.names['c']}" in shared.condition("c", "Degraded")["message"]
    wait_for(lambda: shared.events(shared.names["c"], "PoolNotAllowed"), 30, "a PoolNotAllowed Event in c")
    assert not (shared.budget("c").get("status") or {}).get("poolClaims")

    # Several more reconciles of all three: the pool's size does not flap, and nothing patched
    # its spec (the generation moves with every spec change; the node controller writes status).
    sizes = []
    for _ in range(5):
        seen = shared.pool_status().get("updatedAt")
        wait_for(lambda s=seen: shared.pool_status().get("updatedAt") != s, 3 * TICK + 5, "a pool reconcile")
        sizes.append(shared.kwok_pool()["spec"]["replicas"])
    assert sizes == [nodes] * len(sizes)
    assert shared.kwok_pool()["metadata"]["generation"] == generation, "the provider object's spec was written"
    assert {g["namespace"] for g in shared.pool_status()["grants"]} == {shared.names["a"], shared.names["b"]}
