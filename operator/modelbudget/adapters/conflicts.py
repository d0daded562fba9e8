"""Other autoscalers on the same Deployment: an HPA (autoscaling/v2) or a KEDA ScaledObject.

Two controllers writing one replica count fight; the operator refuses to act instead.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

from modelbudget.adapters.kube import KubeClients
from modelbudget.adapters.watchcache import PerNamespace, WatchCache, keep

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


def _target_field(autoscaler: dict[str, Any]) -> dict[str, Any]:
    return keep(autoscaler, "spec.scaleTargetRef")


class KubeConflictFinder:
    """From watched mirrors of each namespace's HPAs and ScaledObjects, started on the namespace's
    first look: no request per reconcile."""

    def __init__(self, kube: KubeClients) -> None:
        self._autoscaling = kube.autoscaling
        self._custom = kube.custom
        self._hpas = PerNamespace(
            lambda namespace: WatchCache(
                f"HorizontalPodAutoscalers in {namespace}",
                partial(self._autoscaling.list_namespaced_horizontal_pod_autoscaler, namespace),
                trim=_target_field,
            )
        )
        self._scaled_objects = PerNamespace(  # empty while KEDA is not installed
            lambda namespace: WatchCache(
                f"ScaledObjects in {namespace}",
                partial(self._custom.list_namespaced_custom_object, *KEDA[:2], namespace, KEDA[2]),
                trim=_target_field,
            )
        )

    def find(self, namespace: str, deployment: str) -> list[str]:
        hpas, scaled = self._hpas(namespace), self._scaled_objects(namespace)
        found = [
            f"HorizontalPodAutoscaler/{hpa['metadata']['name']}"
            for hpa in hpas.items()
            if (ref := (hpa.get("spec") or {}).get("scaleTargetRef"))
            and ref.get("kind") == "Deployment"
            and ref.get("name") == deployment
        ]
        for obj in scaled.items():
            if _targets((obj.get("spec") or {}).get("scaleTargetRef"), deployment):
                found.append(f"ScaledObject/{obj['metadata']['name']}")
        return sorted(found)
