"""Other autoscalers on the same Deployment: an HPA (autoscaling/v2) or a KEDA ScaledObject.

Two controllers writing one replica count fight; the operator refuses to act instead.
"""

from __future__ import annotations

from typing import Any, Protocol

from modelbudget.adapters.errors import NotFound
from modelbudget.adapters.kube import KubeClients, kube_errors

KEDA = ("keda.sh", "v1alpha1", "scaledobjects")


class ConflictFinder(Protocol):
    def find(self, namespace: str, deployment: str) -> list[str]:
        """``Kind/name`` of every other autoscaler that targets the Deployment."""
        ...


def _targets(ref: dict[str, Any] | None, deployment: str) -> bool:
    if not ref:
        return False
    # A ScaledObject's kind defaults to Deployment.
    return ref.get("name") == deployment and ref.get("kind", "Deployment") == "Deployment"


class KubeConflictFinder:
    def __init__(self, kube: KubeClients) -> None:
        self._autoscaling = kube.autoscaling
        self._custom = kube.custom

    def find(self, namespace: str, deployment: str) -> list[str]:
        found = []
        with kube_errors(f"listing HorizontalPodAutoscalers in {namespace}"):
            hpas = self._autoscaling.list_namespaced_horizontal_pod_autoscaler(namespace).items
        for hpa in hpas:
            ref = hpa.spec.scale_target_ref
            if ref.kind == "Deployment" and ref.name == deployment and hpa.metadata is not None:
                found.append(f"HorizontalPodAutoscaler/{hpa.metadata.name}")
        scaled: Any
        try:
            with kube_errors(f"listing ScaledObjects in {namespace}"):
                scaled = self._custom.list_namespaced_custom_object(*KEDA[:2], namespace, KEDA[2])
        except NotFound:  # KEDA not installed: nothing to conflict with
            scaled = {"items": []}
        for obj in scaled.get("items", []):
            if _targets(obj.get("spec", {}).get("scaleTargetRef"), deployment):
                found.append(f"ScaledObject/{obj['metadata']['name']}")
        return sorted(found)
