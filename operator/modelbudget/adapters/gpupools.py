"""Shared GPU pools as the apiserver has them: the GpuPools declared, and namespaces' labels.

A GpuPool whose spec does not parse is left out (the pool reconciler reports it on the pool);
one whose status does not parse is read as having no grants yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from modelbudget.adapters.errors import NotFound
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.api.pool import POOL_PLURAL, GpuPoolSpec, GpuPoolStatus
from modelbudget.api.spec import GROUP, VERSION


@dataclass(frozen=True)
class DeclaredPool:
    spec: GpuPoolSpec
    status: GpuPoolStatus | None  # None: not settled yet


def declared_pool(body: dict[str, Any]) -> DeclaredPool | None:
    """A GpuPool object as read from the apiserver (``None``: its spec is not valid)."""
    try:
        spec = GpuPoolSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None
    try:
        status = GpuPoolStatus.model_validate(body["status"]) if body.get("status") else None
    except ValidationError:
        status = None
    return DeclaredPool(spec, status)


class GpuPools(Protocol):
    def declared(self) -> dict[str, DeclaredPool]:
        """Every GpuPool with a valid spec, by name."""
        ...

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        """Raises ``NotFound`` when the namespace does not exist."""
        ...


class KubeGpuPools:
    def __init__(self, kube: KubeClients) -> None:
        self._core = kube.core
        self._custom = kube.custom

    def declared(self) -> dict[str, DeclaredPool]:
        try:
            with kube_errors("listing GpuPools"):
                listed = dict(self._custom.list_cluster_custom_object(GROUP, VERSION, POOL_PLURAL))  # type: ignore[call-overload]
        except NotFound:
            return {}  # the GpuPool CRD is not installed: no shared pools
        pools = {}
        for body in listed.get("items", []):
            pool = declared_pool(body)
            if pool is not None:
                pools[body["metadata"]["name"]] = pool
        return pools

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        with kube_errors(f"reading Namespace {namespace}"):
            meta = self._core.read_namespace(namespace).metadata
        return dict((meta.labels if meta is not None else None) or {})
