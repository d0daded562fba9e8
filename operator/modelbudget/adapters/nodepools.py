"""GPU node pools: how many nodes run (from Nodes), and the provider object that sizes the pool.

Nodes are counted whether Ready or not: a node that is still booting is already paid for.
Each provider kind is resized through its own field:

* Karpenter ``NodePool`` (karpenter.sh/v1): ``spec.limits["nvidia.com/gpu"]`` = nodes x GPUs per
  node -- Karpenter provisions on demand, the limit is what bounds it;
* Cluster API ``MachineDeployment`` (cluster.x-k8s.io/v1beta1): ``spec.replicas``;
* ``KwokNodePool`` (testbed.modelbudget.dev/v1alpha1, the local testbed): ``spec.replicas``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.api.spec import NodePool, ProviderKind, ProviderRef

GPU_RESOURCE = "nvidia.com/gpu"
POOL_LABEL = "modelbudget.dev/pool"


def node_selector(pool: NodePool) -> dict[str, str]:
    return dict(pool.node_selector) if pool.node_selector else {POOL_LABEL: pool.name}


@dataclass(frozen=True)
class ProviderApi:
    group: str
    version: str
    plural: str
    namespaced: bool

    def size_patch(self, kind: ProviderKind, nodes: int, gpus_per_node: int) -> dict[str, Any]:
        if kind is ProviderKind.KARPENTER_NODE_POOL:
            return {"spec": {"limits": {GPU_RESOURCE: str(nodes * gpus_per_node)}}}
        return {"spec": {"replicas": nodes}}


PROVIDERS = {
    ProviderKind.KARPENTER_NODE_POOL: ProviderApi("karpenter.sh", "v1", "nodepools", namespaced=False),
    ProviderKind.MACHINE_DEPLOYMENT: ProviderApi("cluster.x-k8s.io", "v1beta1", "machinedeployments", namespaced=True),
    ProviderKind.KWOK_NODE_POOL: ProviderApi("testbed.modelbudget.dev", "v1alpha1", "kwoknodepools", namespaced=False),
}


def sized_nodes(kind: ProviderKind, obj: dict[str, Any], gpus_per_node: int) -> int | None:
    """The node count a provider object is set to now (``None``: not set, or unreadable)."""
    spec = obj.get("spec") or {}
    if kind is ProviderKind.KARPENTER_NODE_POOL:
        raw = (spec.get("limits") or {}).get(GPU_RESOURCE)
        try:
            return int(str(raw)) // gpus_per_node if raw is not None else None
        except ValueError:
            return None  # a quantity like "1k": not one we wrote
    replicas = spec.get("replicas")
    return replicas if isinstance(replicas, int) else None


class NodePools(Protocol):
    def count_nodes(self, selector: dict[str, str]) -> int: ...

    def sized_to(self, pool: NodePool, namespace: str) -> int | None:
        """Raises ``NotFound`` when the provider object (or its CRD) does not exist."""
        ...

    def resize(self, pool: NodePool, namespace: str, nodes: int) -> None: ...


class KubeNodePools:
    def __init__(self, kube: KubeClients) -> None:
        self._core = kube.core
        self._custom = kube.custom

    def count_nodes(self, selector: dict[str, str]) -> int:
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        with kube_errors(f"listing Nodes {labels}"):
            return len(self._core.list_node(label_selector=labels).items)

    @staticmethod
    def _ref(pool: NodePool) -> ProviderRef:
        if pool.provider_ref is None:
            raise ValueError(f"pool {pool.name} has no providerRef")
        return pool.provider_ref

    def _get(self, ref: ProviderRef, namespace: str) -> dict[str, Any]:
        api = PROVIDERS[ref.kind]
        obj: Any
        with kube_errors(f"{ref.kind.value} {ref.name}"):
            if api.namespaced:
                obj = self._custom.get_namespaced_custom_object(
                    api.group, api.version, ref.namespace or namespace, api.plural, ref.name
                )
            else:
                obj = self._custom.get_cluster_custom_object(api.group, api.version, api.plural, ref.name)
        return dict(obj)

    def sized_to(self, pool: NodePool, namespace: str) -> int | None:
        ref = self._ref(pool)
        return sized_nodes(ref.kind, self._get(ref, namespace), pool.gpus_per_node)

    def resize(self, pool: NodePool, namespace: str, nodes: int) -> None:
        ref = self._ref(pool)
        api = PROVIDERS[ref.kind]
        body = api.size_patch(ref.kind, nodes, pool.gpus_per_node)
        with kube_errors(f"resizing {ref.kind.value} {ref.name}"):
            if api.namespaced:
                self._custom.patch_namespaced_custom_object(
                    api.group, api.version, ref.namespace or namespace, api.plural, ref.name, body
                )
            else:
                self._custom.patch_cluster_custom_object(api.group, api.version, api.plural, ref.name, body)
