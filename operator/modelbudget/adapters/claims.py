"""The ModelBudgets' claims on shared GPU pools, as the pool's one writer sums them.

A watched mirror of the served ModelBudgets, each kept only as the claims its status states
(``core.pools.stated_claims``, worked out once per change instead of on every pool tick).  It
replaced a kopf index: kopf holds every handler until an index has seen every object, and the
way it waits costs time in the square of the number of objects -- at 3,000 ModelBudgets no
reconcile ran for minutes after a start.  A mirror that has not listed yet raises
``Unavailable``, so a pool is never settled on part of its claims.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

from modelbudget.adapters.kube import KubeClients
from modelbudget.adapters.watchcache import WatchCache
from modelbudget.api.spec import GROUP, PLURAL, VERSION
from modelbudget.core.pools import Claimant, stated_claims


class PoolClaims(Protocol):
    def claimants(self, pool: str) -> list[Claimant]:
        """Every served ModelBudget's claim on ``pool``; raises ``Unavailable`` until the
        ModelBudgets have been listed."""
        ...


class WatchedPoolClaims:
    """Claims from a mirror of the ModelBudgets in ``namespaces`` (empty: cluster-wide), started
    on the first ask: only a pool's writer pays for it."""

    def __init__(self, kube: KubeClients, namespaces: Sequence[str]) -> None:
        self._custom = kube.custom
        self._namespaces = tuple(namespaces)
        self._lock = threading.Lock()  # pool ticks ask from several threads: one set of mirrors
        self._mirrors: list[WatchCache] | None = None

    def claimants(self, pool: str) -> list[Claimant]:
        with self._lock:
            if self._mirrors is None:
                self._mirrors = [self._mirror(ns) for ns in self._namespaces] or [self._mirror(None)]
            mirrors = self._mirrors
        return [claim for mirror in mirrors for obj in mirror.items() if (claim := obj["claims"].get(pool)) is not None]

    def _mirror(self, namespace: str | None) -> WatchCache:
        if namespace is None:
            listing = partial(self._custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        else:
            listing = partial(self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
        return WatchCache(f"ModelBudgets in {namespace or 'all namespaces'}", listing, trim=_claims)


def _claims(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace") or "", meta.get("name") or ""
    claims = stated_claims(namespace, name, obj.get("spec") or {}, obj.get("status") or {})
    return {"metadata": {"namespace": namespace, "name": name}, "claims": claims}
