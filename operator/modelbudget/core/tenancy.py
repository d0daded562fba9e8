"""What one ModelBudget may make the operator touch, decided from its spec and its namespace: pure.

Anyone who may create a ModelBudget in one namespace can name node pool providers in its spec,
and the operator holds the rights to resize them. Were ``providerRef.namespace`` honoured as
given, a tenant could have the operator resize another team's (or ``kube-system``'s)
MachineDeployment: a confused deputy. So a ModelBudget may only name provider objects in its
own namespace. The apiserver cannot refuse this at admission -- a CRD's validation rules see
the spec, never ``metadata.namespace`` -- so the reconciler asks here before it observes or
changes anything, and refuses the whole ModelBudget (``PoolNotAllowed``).

Cluster-scoped providers (Karpenter ``NodePool``, ``KwokNodePool``) have no namespace to bound
them by; bounding those needs pools declared by the cluster admin (docs/security.md, Tenancy).
"""

from __future__ import annotations

from modelbudget.api.spec import ModelBudgetSpec


def pools_not_allowed(spec: ModelBudgetSpec, namespace: str) -> list[str]:
    """Why each node pool of a ModelBudget in ``namespace`` is not its to resize (empty: none)."""
    refused = []
    for pool in spec.node_pools:
        ref = pool.provider_ref
        if ref is not None and ref.namespace is not None and ref.namespace != namespace:
            refused.append(
                f"node pool {pool.name}: providerRef {ref.kind.value} {ref.namespace}/{ref.name} is in another "
                f"namespace; a ModelBudget may only resize provider objects in its own namespace ({namespace})"
            )
    return refused
