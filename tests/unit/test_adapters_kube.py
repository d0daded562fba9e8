"""The Kubernetes adapters against a mock apiserver (kmock): the requests they send, the answers they read."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

import kmock
import pytest
from kubernetes import client

from modelbudget.adapters.conflicts import KubeConflictFinder
from modelbudget.adapters.errors import Conflict, NotFound, Rejected, Unavailable
from modelbudget.adapters.kube import KubeClients
from modelbudget.adapters.nodepools import KubeNodePools, sized_nodes
from modelbudget.adapters.scaler import DeploymentScaler
from modelbudget.adapters.tokenlimit import KubeTokenLimitSink, Published
from modelbudget.adapters.watchcache import WatchCache
from modelbudget.api.spec import NodePool, ProviderKind, TokenLimitPublish


def against_kmock(test: Callable[..., Any]) -> Callable[..., Any]:
    """An async test talking to a plain mock server (no Kubernetes emulation: every reply is scripted)."""
    return pytest.mark.asyncio(pytest.mark.kmock(cls=kmock.RawHandler)(test))


DEPLOY = "/apis/apps/v1/namespaces/demo/deployments/demo-llm"
DEPLOYMENT = {"kind": "Deployment", "spec": {"selector": {}, "template": {}}}
MANAGED = {"app.kubernetes.io/managed-by": "modelbudget"}


def kube(url: Any) -> KubeClients:
    return KubeClients.over(client.ApiClient(client.Configuration(host=str(url))))


def pool(kind: str, **extra: Any) -> NodePool:
    return NodePool.model_validate(
        {
            "name": "gpu-pool",
            "gpuType": "l4",
            "pricePerGpuHour": 2,
            "gpusPerNode": 4,
            "maxNodes": 6,
            "tokensPerSecondPerReplica": 1000,
            "providerRef": {"kind": kind, "name": "gpu-pool", **extra},
        }
    )


@against_kmock
async def test_scaler_reads_scale_and_ready_and_patches_scale(kmock: kmock.RawHandler) -> None:
    deployment = {"metadata": {"name": "demo-llm"}, "spec": {"replicas": 3}, "status": {"readyReplicas": 2}}
    kmock["get /apis/apps/v1/namespaces/demo/deployments"] << {
        "metadata": {"resourceVersion": "7"},
        "items": [deployment],
    }
    kmock[f"patch {DEPLOY}/scale"] << {"kind": "Scale", "spec": {"replicas": 5}}
    scaler = DeploymentScaler(kube(kmock.url))
    # From the watched mirror of the namespace's Deployments (tests/e2e/test_watch_caches.py: the watch).
    state = await asyncio.to_thread(scaler.get, "demo", "demo-llm")
    assert (state.replicas, state.ready_replicas) == (3, 2)
    with pytest.raises(NotFound, match="Deployment demo/other"):
        await asyncio.to_thread(scaler.get, "demo", "other")
    await asyncio.to_thread(scaler.set_replicas, "demo", "demo-llm", 5)
    assert kmock[f"patch {DEPLOY}/scale"][0].data == {"spec": {"replicas": 5}}


@against_kmock
async def test_token_limit_creates_the_configmap_when_missing(kmock: kmock.RawHandler) -> None:
    cm = "/api/v1/namespaces/demo/configmaps"
    kmock[f"get {cm}/demo-llm-token-limit"] << 404 << {"kind": "Status", "code": 404}
    kmock[f"post {cm}"] << {"kind": "ConfigMap"}
    sink = KubeTokenLimitSink(kube(kmock.url))
    publish = TokenLimitPublish()
    assert await asyncio.to_thread(sink.read, "demo", "demo-llm", publish) == Published(None)
    await asyncio.to_thread(sink.publish, "demo", "demo-llm", publish, Published(2048, 1.25))
    created = kmock[f"post {cm}"][0].data
    assert created["metadata"]["name"] == "demo-llm-token-limit"
    assert created["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "modelbudget"}
    assert created["data"] == {"max_tokens": "2048", "admitted_rps_per_pod": "1.25"}
    assert not kmock["patch"]


@against_kmock
async def test_token_limit_reads_and_patches_with_the_optional_annotation(kmock: kmock.RawHandler) -> None:
    cm = "/api/v1/namespaces/demo/configmaps/limits"
    kmock[f"get {cm}"] << {
        "kind": "ConfigMap",
        "metadata": {"name": "limits", "resourceVersion": "41", "labels": MANAGED},
        "data": {"tokens": "512", "admitted_rps_per_pod": "2.5"},
    }
    kmock[f"patch {cm}"] << {"kind": "ConfigMap"}
    kmock[f"patch {DEPLOY}"] << DEPLOYMENT
    publish = TokenLimitPublish.model_validate(
        {"configMap": {"name": "limits", "key": "tokens"}, "podTemplateAnnotation": True}
    )
    sink = KubeTokenLimitSink(kube(kmock.url))
    assert await asyncio.to_thread(sink.read, "demo", "demo-llm", publish) == Published(512, 2.5)
    await asyncio.to_thread(sink.publish, "demo", "demo-llm", publish, Published(256))
    # No admission cap any more: the key is deleted (a merge patch's null), not left behind; the
    # resourceVersion read makes the patch conditional on nobody having changed it since.
    assert kmock[f"patch {cm}"][0].data == {
        "metadata": {"resourceVersion": "41"},
        "data": {"tokens": "256", "admitted_rps_per_pod": None},
    }
    annotations = kmock[f"patch {DEPLOY}"][0].data["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"modelbudget.dev/max-tokens": "256"}
    # The only Deployment touched is the target, in the ModelBudget's namespace.
    assert [r.url.path for r in kmock["patch"]] == [cm, DEPLOY]


@pytest.mark.parametrize("labels", [None, {"app.kubernetes.io/managed-by": "helm"}], ids=["unlabelled", "helm's"])
@against_kmock
async def test_token_limit_never_writes_a_configmap_it_does_not_manage(
    kmock: kmock.RawHandler, labels: dict[str, str] | None
) -> None:
    cm = "/api/v1/namespaces/demo/configmaps/app-config"
    kmock[f"get {cm}"] << {"kind": "ConfigMap", "metadata": {"name": "app-config", "labels": labels}, "data": {}}
    publish = TokenLimitPublish.model_validate({"configMap": {"name": "app-config"}, "podTemplateAnnotation": True})
    sink = KubeTokenLimitSink(kube(kmock.url))
    with pytest.raises(Rejected) as refused:
        await asyncio.to_thread(sink.publish, "demo", "demo-llm", publish, Published(256))
    message = str(refused.value)
    assert "ConfigMap demo/app-config" in message and "not managed by modelbudget" in message
    assert "label it app.kubernetes.io/managed-by=modelbudget" in message and "creates its own" in message
    assert not kmock["patch"] and not kmock["post"]  # neither the ConfigMap nor the Deployment


def api_groups(*group_versions: str) -> dict[str, Any]:
    """A discovery answer (``GET /apis``): each group with its preferred version."""
    groups = []
    for gv in group_versions:
        group, version = gv.split("/")
        preferred = {"groupVersion": gv, "version": version}
        groups.append({"name": group, "versions": [preferred], "preferredVersion": preferred})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


INSTALLED = ("testbed.modelbudget.dev/v1alpha1", "karpenter.sh/v1", "cluster.x-k8s.io/v1beta2")


@against_kmock
async def test_node_pools_count_by_selector_and_resize_each_provider(kmock: kmock.RawHandler) -> None:
    pooled = {"modelbudget.dev/pool": "gpu-pool"}
    nodes = [{"metadata": {"name": n, "labels": pooled}} for n in "ab"] + [{"metadata": {"name": "c"}}]
    kmock["get /api/v1/nodes"] << {"kind": "NodeList", "metadata": {"resourceVersion": "7"}, "items": nodes}
    kmock["get /apis/"] << api_groups(*INSTALLED)
    kwok = "/apis/testbed.modelbudget.dev/v1alpha1/kwoknodepools/gpu-pool"
    karpenter = "/apis/karpenter.sh/v1/nodepools/gpu-pool"
    capi = "/apis/cluster.x-k8s.io/v1beta2/namespaces/infra/machinedeployments/gpu-pool"
    for path in (kwok, karpenter, capi):
        kmock[f"patch {path}"] << {"kind": "X"}
    kmock[f"get {kwok}"] << {"spec": {"replicas": 2}}
    kmock[f"get {karpenter}"] << {"spec": {"limits": {"nvidia.com/gpu": "8"}, "template": {}}}
    kmock[f"get {capi}"] << {"spec": {"replicas": 1, "clusterName": "c"}}
    pools = KubeNodePools(kube(kmock.url))
    # Counted from the watched mirror of all Nodes (tests/e2e/test_watch_caches.py: the watch itself).
    assert await asyncio.to_thread(pools.count_nodes, pooled) == 2
    assert await asyncio.to_thread(pools.node_names, pooled) == ["a", "b"]
    assert await asyncio.to_thread(pools.sized_to, pool("KwokNodePool"), "demo") == 2
    assert await asyncio.to_thread(pools.sized_to, pool("NodePool"), "demo") == 2
    assert await asyncio.to_thread(pools.sized_to, pool("MachineDeployment", namespace="infra"), "demo") == 1
    await asyncio.to_thread(pools.resize, pool("KwokNodePool"), "demo", 3)
    await asyncio.to_thread(pools.resize, pool("NodePool"), "demo", 3)
    await asyncio.to_thread(pools.resize, pool("MachineDeployment", namespace="infra"), "demo", 3)
    assert kmock[f"patch {kwok}"][0].data == {"spec": {"replicas": 3}}
    assert kmock[f"patch {karpenter}"][0].data == {"spec": {"limits": {"nvidia.com/gpu": "12"}}}
    assert kmock[f"patch {capi}"][0].data == {"spec": {"replicas": 3}}
    assert len(kmock["patch"]) == 3
    # The versions were discovered once, for all six calls.
    assert len(kmock["get /apis/"]) == 1


@against_kmock
async def test_node_pools_use_the_version_the_server_prefers(kmock: kmock.RawHandler) -> None:
    # A Cluster API that still prefers v1beta1 (before v1.13) is spoken to in v1beta1.
    kmock["get /apis/"] << api_groups("cluster.x-k8s.io/v1beta1")
    capi = "/apis/cluster.x-k8s.io/v1beta1/namespaces/demo/machinedeployments/gpu-pool"
    kmock[f"get {capi}"] << {"spec": {"replicas": 4}}
    pools = KubeNodePools(kube(kmock.url))
    assert await asyncio.to_thread(pools.sized_to, pool("MachineDeployment"), "demo") == 4


@against_kmock
async def test_a_missing_provider_api_is_not_found_and_asked_again(kmock: kmock.RawHandler) -> None:
    kmock["get /apis/"] << api_groups("karpenter.sh/v1")
    pools = KubeNodePools(kube(kmock.url))
    for _ in range(2):
        with pytest.raises(NotFound, match=r"^the cluster\.x-k8s\.io API is not installed$"):
            await asyncio.to_thread(pools.resize, pool("MachineDeployment"), "demo", 2)
    assert len(kmock["get /apis/"]) == 2  # not cached: the CRD may be installed meanwhile
    assert not kmock["patch"]


@against_kmock
async def test_a_missing_provider_object_is_not_found_and_rediscovers(kmock: kmock.RawHandler) -> None:
    kmock["get /apis/"] << api_groups(*INSTALLED)
    capi = "/apis/cluster.x-k8s.io/v1beta2/namespaces/demo/machinedeployments/gone"
    kmock[f"get {capi}"] << 404 << {"kind": "Status", "code": 404}
    pools = KubeNodePools(kube(kmock.url))
    missing = pool("MachineDeployment", name="gone")
    for _ in range(2):
        with pytest.raises(NotFound, match="MachineDeployment demo/gone: HTTP 404"):
            await asyncio.to_thread(pools.sized_to, missing, "demo")
    # A 404 may mean the group moved to another version: it is looked up again.
    assert len(kmock["get /apis/"]) == 2


@against_kmock
async def test_a_static_karpenter_node_pool_is_sized_by_replicas(kmock: kmock.RawHandler) -> None:
    kmock["get /apis/"] << api_groups(*INSTALLED)
    karpenter = "/apis/karpenter.sh/v1/nodepools/gpu-pool"
    kmock[f"get {karpenter}"] << {"spec": {"replicas": 2, "limits": {"nodes": "10"}, "template": {}}}
    kmock[f"patch {karpenter}"] << {"kind": "NodePool"}
    pools = KubeNodePools(kube(kmock.url))
    assert await asyncio.to_thread(pools.sized_to, pool("NodePool"), "demo") == 2
    await asyncio.to_thread(pools.resize, pool("NodePool"), "demo", 5)
    # Karpenter refuses any limit but `nodes` on a static NodePool: the GPU limit is not written.
    assert kmock[f"patch {karpenter}"][0].data == {"spec": {"replicas": 5}}


def test_sized_nodes_reads_each_provider_shape() -> None:
    assert sized_nodes(ProviderKind.KARPENTER_NODE_POOL, {"spec": {"limits": {"nvidia.com/gpu": "12"}}}, 4) == 3
    assert sized_nodes(ProviderKind.KARPENTER_NODE_POOL, {"spec": {"limits": {"nvidia.com/gpu": "1k"}}}, 4) is None
    assert sized_nodes(ProviderKind.KARPENTER_NODE_POOL, {"spec": {"replicas": 3, "limits": {"nodes": 9}}}, 4) == 3
    assert sized_nodes(ProviderKind.KWOK_NODE_POOL, {"spec": {}}, 4) is None


@against_kmock
async def test_conflicts_find_hpas_and_scaled_objects_on_the_target(kmock: kmock.RawHandler) -> None:
    def hpa(name: str, target: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name},
            "spec": {
                "maxReplicas": 3,
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            },
        }

    kmock["get /apis/autoscaling/v2/namespaces/demo/horizontalpodautoscalers"] << {
        "kind": "HorizontalPodAutoscalerList",
        "metadata": {"resourceVersion": "7"},
        "items": [hpa("mine", "demo-llm"), hpa("other", "web")],
    }
    kmock["get /apis/keda.sh/v1alpha1/namespaces/demo/scaledobjects"] << {
        "metadata": {"resourceVersion": "7"},
        "items": [{"metadata": {"name": "keda"}, "spec": {"scaleTargetRef": {"name": "demo-llm"}}}],
    }
    finder = KubeConflictFinder(kube(kmock.url))
    found = await asyncio.to_thread(finder.find, "demo", "demo-llm")
    assert found == ["HorizontalPodAutoscaler/mine", "ScaledObject/keda"]


@against_kmock
async def test_conflicts_without_keda_installed(kmock: kmock.RawHandler) -> None:
    kmock["get /apis/autoscaling/v2/namespaces/demo/horizontalpodautoscalers"] << {
        "metadata": {"resourceVersion": "7"},
        "items": [],
    }
    kmock["get /apis/keda.sh/v1alpha1/namespaces/demo/scaledobjects"] << 404 << {"kind": "Status", "code": 404}
    assert await asyncio.to_thread(KubeConflictFinder(kube(kmock.url)).find, "demo", "demo-llm") == []


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, NotFound), (409, Conflict), (403, Rejected), (422, Rejected), (429, Unavailable), (500, Unavailable)],
)
@against_kmock
async def test_apiserver_answers_become_domain_errors(kmock: kmock.RawHandler, status: int, error: type) -> None:
    kmock[f"patch {DEPLOY}/scale"] << status << {"kind": "Status", "code": status}
    scaler = DeploymentScaler(kube(kmock.url))
    with pytest.raises(error, match=f"scaling Deployment demo/demo-llm: HTTP {status}"):
        await asyncio.to_thread(scaler.set_replicas, "demo", "demo-llm", 5)


def test_an_unreachable_apiserver_is_unavailable_not_a_client_exception() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = client.Configuration(host=f"http://127.0.0.1:{port}")
    config.retries = False
    kube = KubeClients.over(client.ApiClient(config))
    with pytest.raises(Unavailable, match="scaling Deployment demo/demo-llm: apiserver unreachable"):
        DeploymentScaler(kube).set_replicas("demo", "demo-llm", 2)
    # A mirror that cannot list says so when read, after a bounded wait.
    mirror = WatchCache("Deployments in demo", partial(kube.apps.list_namespaced_deployment, "demo"), sync_wait=0.2)
    with pytest.raises(Unavailable, match="Deployments in demo: not listed yet"):
        mirror.items()
    mirror.stop()
