"""The serving Deployment's size, through its ``/scale`` subresource."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from modelbudget.adapters.kube import KubeClients, kube_errors


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
    def __init__(self, kube: KubeClients) -> None:
        self._apps = kube.apps

    def get(self, namespace: str, name: str) -> ScaleState:
        with kube_errors(f"Deployment {namespace}/{name}"):
            scale = self._apps.read_namespaced_deployment_scale(name, namespace).spec
            # /scale has no ready count; the Deployment's status has it.
            status = self._apps.read_namespaced_deployment_status(name, namespace).status
        return ScaleState(
            replicas=(scale.replicas if scale else 0) or 0, ready_replicas=(status.ready_replicas if status else 0) or 0
        )

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        with kube_errors(f"scaling Deployment {namespace}/{name}"):
            self._apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}})
