"""The serving Deployment's size, through its ``/scale`` subresource."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from modelbudget.adapters.errors import NotFound
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.adapters.watchcache import WatchCache


@dataclass(frozen=True)
class ScaleState:
    replicas: int  # desired (spec.replicas)
    ready_replicas: int


class Scaler(Protocol):
    def get(self, namespace: str, name: str) -> ScaleState:
        """Raises ``NotFound`` when the Deployment does not exist."""
        ...

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None: ...


class DeploymentScaler:
    """Reads each namespace's Deployments from a watched mirror, started on the namespace's first
    read (no request per reconcile); writes through ``/scale``."""

    def __init__(self, kube: KubeClients) -> None:
        self._apps = kube.apps
        self._lock = threading.Lock()
        self._mirrors: dict[str, WatchCache] = {}

    def _mirror(self, namespace: str) -> WatchCache:
        with self._lock:
            mirror = self._mirrors.get(namespace)
            if mirror is None:
                listing = partial(self._apps.list_namespaced_deployment, namespace)
                mirror = self._mirrors[namespace] = WatchCache(f"Deployments in {namespace}", listing)
            return mirror

    def get(self, namespace: str, name: str) -> ScaleState:
        # /scale's spec.replicas is the Deployment's; its status has the ready count /scale lacks.
        for obj in self._mirror(namespace).items():
            if obj["metadata"]["name"] == name:
                spec, status = obj.get("spec") or {}, obj.get("status") or {}
                return ScaleState(replicas=spec.get("replicas") or 0, ready_replicas=status.get("readyReplicas") or 0)
        raise NotFound(f"Deployment {namespace}/{name}: HTTP 404 Not Found")

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        with kube_errors(f"scaling Deployment {namespace}/{name}"):
            self._apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}})
