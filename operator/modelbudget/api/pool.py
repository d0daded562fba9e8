"""The GpuPool: a GPU node pool declared once by the cluster admin and shared by ModelBudgets.

A GpuPool is cluster-scoped, so only whoever may create cluster-scoped objects (the cluster
admin) declares one; tenants refer to it by name from ``spec.sharedPools[].pool`` and may draw
from it only when their namespace is allowed (by name or by label). The operator is the one
writer of the provider object: it sums the ModelBudgets' claims, sizes the pool once within
its bounds, splits capacity when the claims exceed ``maxNodes`` and bills each ModelBudget its
share. Its status shows every claim, grant and share.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from modelbudget.api.rules import CrossFieldRule, cross_field_rules
from modelbudget.api.spec import ApiModel, GpuOffering, Name, ProviderKind, ProviderRef
from modelbudget.api.status import StatusModel

POOL_KIND = "GpuPool"
POOL_PLURAL = "gpupools"


class NamespaceSelector(ApiModel):
    """Namespaces whose labels include all of ``matchLabels``."""

    match_labels: dict[str, str] = Field(min_length=1, max_length=16)


@cross_field_rules(
    CrossFieldRule(
        cel="size(self.namespaces) > 0 || has(self.namespaceSelector)",
        message="allowedNamespaces needs namespaces or a namespaceSelector",
        check=lambda a: bool(a.namespaces) or a.namespace_selector is not None,
    ),
)
class AllowedNamespaces(ApiModel):
    """Who may draw from the pool: a namespace named here, or one whose labels match the selector."""

    namespaces: list[Name] = Field(default_factory=list, max_length=256)
    namespace_selector: NamespaceSelector | None = None

    def allows(self, namespace: str, labels: dict[str, str]) -> bool:
        if namespace in self.namespaces:
            return True
        wanted = self.namespace_selector.match_labels if self.namespace_selector else None
        return wanted is not None and all(labels.get(k) == v for k, v in wanted.items())


@cross_field_rules(
    CrossFieldRule(
        cel="self.minNodes <= self.maxNodes",
        message="minNodes must not exceed maxNodes",
        check=lambda p: p.min_nodes <= p.max_nodes,
    ),
    CrossFieldRule(
        cel="self.providerRef.kind != 'MachineDeployment' || has(self.providerRef.namespace)",
        message="providerRef.namespace is required for a MachineDeployment",
        check=lambda p: (
            p.provider_ref.kind is not ProviderKind.MACHINE_DEPLOYMENT or p.provider_ref.namespace is not None
        ),
    ),
)
class GpuPoolSpec(GpuOffering):
    provider_ref: ProviderRef = Field(description="The object the operator sizes (the only writer of it).")
    allowed_namespaces: AllowedNamespaces
    scale_down_stabilization_seconds: int = Field(
        default=600,
        ge=0,
        le=86_400,
        description="The pool shrinks to the largest size wanted within this window, so it does not flap.",
    )

    @property
    def max_gpus(self) -> int:
        return self.max_nodes * self.gpus_per_node


class PoolGrant(StatusModel):
    """What the pool gives one ModelBudget, and what it bills it."""

    namespace: str
    name: str
    claimed_gpus: int
    granted_gpus: int
    share_per_hour: float = Field(description="Its part of the pool's bill: bill x granted / all granted.")


class SizeWanted(StatusModel):
    at: datetime
    nodes: int


class GpuPoolStatus(StatusModel):
    nodes: int | None = Field(default=None, description="What the provider object was sized to.")
    bill_per_hour: float | None = Field(default=None, description="nodes x gpusPerNode x pricePerGpuHour.")
    unbilled_per_hour: float | None = Field(
        default=None, description="Bill no ModelBudget pays: idle minNodes while nothing is granted."
    )
    grants: list[PoolGrant] = Field(default_factory=list, max_length=1024)
    split: str | None = Field(default=None, description="How capacity was split when claims exceeded maxNodes.")
    message: str | None = Field(default=None, max_length=4096)
    wanted: list[SizeWanted] = Field(
        default_factory=list, max_length=2048, description="Sizes wanted within the stabilisation window."
    )
    updated_at: datetime | None = None
