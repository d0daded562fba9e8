"""GPU node pools: how many nodes run (from Nodes), and the provider object that sizes the pool.

Nodes are counted whether Ready or not: a node that is still booting is already paid for.
Each provider kind is resized through its own field:

* Karpenter ``NodePool`` (karpenter.sh): ``spec.limits["nvidia.com/gpu"]`` = nodes x GPUs per
  node -- Karpenter provisions on demand, the limit is what bounds it; a static NodePool (one
  with ``spec.replicas``, where Karpenter refuses every limit but ``nodes``): ``spec.replicas``;
* Cluster API ``MachineDeployment`` (cluster.x-k8s.io): ``spec.replicas`` (the same path in
  v1beta1 and v1beta2);
* ``KwokNodePool`` (testbed.modelbudget.dev, the local testbed): ``spec.replicas``.

The API version is the one the apiserver prefers for the group (discovery), not a fixed one:
Cluster API v1.13 stores v1beta2 and deprecates v1beta1, and the next releases drop it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from modelbudget.adapters.errors import NotFound
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.adapters.watchcache import WatchCache, keep, labels_match
from modelbudget.api.spec import NodePool, ProviderKind, ProviderRef

GPU_RESOURCE = "nvidia.com/gpu"
POOL_LABEL = "modelbudget.dev/pool"


def node_selector(pool: NodePool) -> dict[str, str]:
    return dict(pool.node_selector) if pool.node_selector else {POOL_LABEL: pool.name}


@dataclass(frozen=True)
class ProviderApi:
    group: str
    plural: str
    namespaced: bool


PROVIDERS = {
    ProviderKind.KARPENTER_NODE_POOL: ProviderApi("karpenter.sh", "nodepools", namespaced=False),
    ProviderKind.MACHINE_DEPLOYMENT: ProviderApi("cluster.x-k8s.io", "machinedeployments", namespaced=True),
    ProviderKind.KWOK_NODE_POOL: ProviderApi("testbed.modelbudget.dev", "kwoknodepools", namespaced=False),
}


def _sized_by_replicas(kind: ProviderKind, spec: dict[str, Any]) -> bool:
    """Whether ``spec.replicas`` is the node count (else: Karpenter's GPU limit)."""
    return kind is not ProviderKind.KARPENTER_NODE_POOL or "replicas" in spec


def size_patch(kind: ProviderKind, obj: dict[str, Any], nodes: int, gpus_per_node: int) -> dict[str, Any]:
    """The merge patch that sizes the provider object ``obj`` (as read now) to ``nodes``."""
    if _sized_by_replicas(kind, obj.get("spec") or {}):
        return {"spec": {"replicas": nodes}}
    return {"spec": {"limits": {GPU_RESOURCE: str(nodes * gpus_per_node)}}}


def sized_nodes(kind: ProviderKind, obj: dict[str, Any], gpus_per_node: int) -> int | None:
    """The node count a provider object is set to now (``None``: not set, or unreadable)."""
    spec = obj.get("spec") or {}
    if not _sized_by_replicas(kind, spec):
        raw = (spec.get("limits") or {}).get(GPU_RESOURCE)
        try:
            return int(str(raw)) // gpus_per_node if raw is not None else None
        except ValueError:
            return None  # a quantity like "1k": not one we wrote
    replicas = spec.get("replicas")
    return replicas if isinstance(replicas, int) else None


def _labels(node: dict[str, Any]) -> dict[str, Any]:
    return keep(node, "metadata.labels")


class NodePools(Protocol):
    def count_nodes(self, selector: dict[str, str]) -> int: ...

    def node_names(self, selector: dict[str, str]) -> list[str]:
        """The names of the Nodes the selector matches (to look up their prices)."""
        ...

    def sized_to(self, pool: NodePool, namespace: str) -> int | None:
        """Raises ``NotFound`` when the provider object (or its CRD) does not exist."""
        ...

    def resize(self, pool: NodePool, namespace: str, nodes: int) -> None: ...

    def provider_sized_to(self, ref: ProviderRef, gpus_per_node: int, namespace: str) -> int | None:
        """``sized_to`` by the provider object itself (a GpuPool's); raises ``NotFound`` likewise."""
        ...

    def resize_provider(self, ref: ProviderRef, gpus_per_node: int, namespace: str, nodes: int) -> None: ...


class KubeNodePools:
    def __init__(self, kube: KubeClients) -> None:
        self._core = kube.core
        self._custom = kube.custom
        self._apis = kube.apis
        self._versions: dict[str, str] = {}  # API group -> the version the server prefers
        self._nodes_lock = threading.Lock()
        self._nodes: WatchCache | None = None  # started by the first count: only the operator counts

    def count_nodes(self, selector: dict[str, str]) -> int:
        return len(self.node_names(selector))

    def node_names(self, selector: dict[str, str]) -> list[str]:
        """From a watched mirror of all Nodes: no request per reconcile."""
        with self._nodes_lock:
            if self._nodes is None:
                self._nodes = WatchCache("Nodes", self._core.list_node, trim=_labels)
        names = (
            (node.get("metadata") or {}).get("name") for node in self._nodes.items() if labels_match(node, selector)
        )
        return [name for name in names if name]

    @staticmethod
    def _ref(pool: NodePool) -> ProviderRef:
        if pool.provider_ref is None:
            raise ValueError(f"pool {pool.name} has no providerRef")
        return pool.provider_ref

    def _version(self, group: str) -> str:
        """The group's preferred version, discovered once per adapter; a group that is not
        installed is asked again next time (its CRD may be installed meanwhile)."""
        if group not in self._versions:
            with kube_errors("discovering API groups"):
                groups = self._apis.get_api_versions().groups
            for g in groups:
                if g.preferred_version is not None:
                    self._versions[g.name] = g.preferred_version.version
        if group not in self._versions:
            raise NotFound(f"the {group} API is not installed")
        return self._versions[group]

    def _call(self, what: str, api: ProviderApi, request: Any) -> dict[str, Any]:
        """Run ``request(version)``; a 404 forgets the version, in case the group changed it."""
        version = self._version(api.group)
        try:
            with kube_errors(what):
                return dict(request(version))
        except NotFound:
            self._versions.pop(api.group, None)
            raise

    def _get(self, ref: ProviderRef, namespace: str) -> dict[str, Any]:
        api = PROVIDERS[ref.kind]
        if api.namespaced:
            ns = ref.namespace or namespace
            return self._call(
                f"{ref.kind.value} {ns}/{ref.name}",
                api,
                lambda v: self._custom.get_namespaced_custom_object(api.group, v, ns, api.plural, ref.name),
            )
        return self._call(
            f"{ref.kind.value} {ref.name}",
            api,
            lambda v: self._custom.get_cluster_custom_object(api.group, v, api.plural, ref.name),
        )

    def sized_to(self, pool: NodePool, namespace: str) -> int | None:
        return self.provider_sized_to(self._ref(pool), pool.gpus_per_node, namespace)

    def provider_sized_to(self, ref: ProviderRef, gpus_per_node: int, namespace: str) -> int | None:
        return sized_nodes(ref.kind, self._get(ref, namespace), gpus_per_node)

    def resize(self, pool: NodePool, namespace: str, nodes: int) -> None:
        self.resize_provider(self._ref(pool), pool.gpus_per_node, namespace, nodes)

    def resize_provider(self, ref: ProviderRef, gpus_per_node: int, namespace: str, nodes: int) -> None:
        api = PROVIDERS[ref.kind]
        # Read first: which field sizes a Karpenter NodePool depends on the object (static or not).
        body = size_patch(ref.kind, self._get(ref, namespace), nodes, gpus_per_node)
        if api.namespaced:
            ns = ref.namespace or namespace
            self._call(
                f"resizing {ref.kind.value} {ns}/{ref.name}",
                api,
                lambda v: self._custom.patch_namespaced_custom_object(api.group, v, ns, api.plural, ref.name, body),
            )
        else:
            self._call(
                f"resizing {ref.kind.value} {ref.name}",
                api,
                lambda v: self._custom.patch_cluster_custom_object(api.group, v, api.plural, ref.name, body),
            )
