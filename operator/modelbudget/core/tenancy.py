"""What one ModelBudget may make the operator touch, decided from its spec and its namespace: pure.

Anyone who may create a ModelBudget in one namespace can name node pool providers in its spec,
and the operator holds the rights to resize them. Were ``providerRef.namespace`` honoured as
given, a tenant could have the operator resize another team's (or ``kube-system``'s)
MachineDeployment: a confused deputy. So a ModelBudget may only name provider objects in its
own namespace. The apiserver cannot refuse this at admission -- a CRD's validation rules see
the spec, never ``metadata.namespace`` -- so the reconciler asks here before it observes or
changes anything, and refuses the whole ModelBudget (``PoolNotAllowed``).

Shared capacity is declared by the cluster admin as a GpuPool (cluster-scoped), which says
which namespaces may draw from it; the operator alone writes its provider object. So a
ModelBudget may not name a GpuPool its namespace is not allowed on, nor name inline a provider
object that a GpuPool declares (that would be a second writer of a shared pool). Cluster-scoped
provider objects (Karpenter NodePools, KwokNodePools) belong to no namespace, so no tenant may
name them inline unless the operator is told the cluster has a single tenant.
"""

from __future__ import annotations

from collections.abc import Mapping

from modelbudget.api.pool import GpuPoolSpec
from modelbudget.api.spec import ModelBudgetSpec, ProviderKind, ProviderRef


def _same_object(a: ProviderRef, b: ProviderRef, namespace: str) -> bool:
    return (a.kind, a.name, a.namespace or namespace) == (b.kind, b.name, b.namespace or namespace)


CLUSTER_SCOPED = frozenset({ProviderKind.KARPENTER_NODE_POOL, ProviderKind.KWOK_NODE_POOL})


def pools_not_allowed(
    spec: ModelBudgetSpec,
    namespace: str,
    namespace_labels: Mapping[str, str] | None = None,
    gpu_pools: Mapping[str, GpuPoolSpec | None] | None = None,
    inline_cluster_pools: bool = False,
) -> list[str]:
    """Why each pool of a ModelBudget in ``namespace`` is not its to use (empty: none).

    ``gpu_pools``: every GpuPool the cluster declares, plus each one the spec names
    (``None``: it does not exist); ``namespace_labels``: the namespace's labels.
    ``inline_cluster_pools``: whether a ModelBudget may name a cluster-scoped provider object
    (a Karpenter NodePool, a KwokNodePool) inline; off by default, since any tenant could then
    resize capacity it was never granted (the operator's ``--inline-cluster-pools=allow``, for a
    single-tenant cluster).
    """
    pools = gpu_pools or {}
    refused = []
    for pool in spec.node_pools:
        ref = pool.provider_ref
        if ref is None:
            continue
        if ref.namespace is not None and ref.namespace != namespace:
            refused.append(
                f"node pool {pool.name}: providerRef {ref.kind.value} {ref.namespace}/{ref.name} is in another "
                f"namespace; a ModelBudget may only resize provider objects in its own namespace ({namespace})"
            )
            continue
        declared_by = sorted(
            name for name, gp in pools.items() if gp is not None and _same_object(gp.provider_ref, ref, namespace)
        )
        if declared_by:
            refused.append(
                f"node pool {pool.name}: {ref.kind.value} {ref.name} is shared capacity declared by GpuPool "
                f"{declared_by[0]}; draw from it with sharedPools[].pool: {declared_by[0]} "
                "(the operator alone resizes it)"
            )
        elif ref.kind in CLUSTER_SCOPED and not inline_cluster_pools:
            refused.append(
                f"node pool {pool.name}: {ref.kind.value} {ref.name} is cluster-scoped capacity; a cluster admin "
                f"declares it as a GpuPool (allowing this namespace) and this ModelBudget draws from it with "
                f"sharedPools[].pool (docs/pools.md), or the operator runs with --inline-cluster-pools=allow"
            )
    for shared in spec.shared_pools:
        gp = pools.get(shared.pool)
        if gp is None:
            refused.append(f"shared pool {shared.pool}: no GpuPool {shared.pool} exists (a cluster admin declares it)")
        elif not gp.allowed_namespaces.allows(namespace, dict(namespace_labels or {})):
            refused.append(f"shared pool {shared.pool}: GpuPool {shared.pool} does not allow namespace {namespace}")
        elif gp.gpus_per_node < spec.replicas.gpus_per_replica:
            refused.append(
                f"shared pool {shared.pool}: its nodes have {gp.gpus_per_node} GPUs, a replica needs "
                f"{spec.replicas.gpus_per_replica}"
            )
    return refused
