"""Where the fast knobs are published for the gates: a ConfigMap with the per-request token limit
and each pod's share of the admitted request rate; optionally a pod annotation for the limit.

The ConfigMap is the fast path (the gate watches it and applies a change within seconds, no
restart); the pod-template annotation rolls the Deployment, so it is opt-in (docs/token-limits.md).

What a tenant can make the operator write is bounded (docs/security.md, Tenancy): only a
ConfigMap the operator created or one labelled ``app.kubernetes.io/managed-by: modelbudget``
-- a ModelBudget that names someone else's ConfigMap cannot overwrite it -- and only the
Deployment the ModelBudget targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kubernetes import client

from modelbudget.adapters.errors import NotFound, Rejected
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.api.spec import TokenLimitPublish

ANNOTATION = "modelbudget.dev/max-tokens"
ADMISSION_KEY = "admitted_rps_per_pod"  # absent: every request is admitted
MANAGED_BY = {"app.kubernetes.io/managed-by": "modelbudget"}  # on ConfigMaps the operator may write


def config_map_name(publish: TokenLimitPublish, target: str) -> str:
    return publish.config_map.name or f"{target}-token-limit"


@dataclass(frozen=True)
class Published:
    """The fast knobs as the gates read them."""

    token_limit: int | None  # None: never published, or not a number
    admitted_rps_per_pod: float | None = None  # None: no admission cap


class TokenLimitSink(Protocol):
    def read(self, namespace: str, target: str, publish: TokenLimitPublish) -> Published: ...

    def publish(self, namespace: str, target: str, publish: TokenLimitPublish, values: Published) -> None: ...


def _number(raw: str | None, kind: type[int] | type[float]) -> float | None:
    try:
        return kind(raw) if raw not in (None, "") else None
    except ValueError:
        return None


class KubeTokenLimitSink:
    def __init__(self, kube: KubeClients) -> None:
        self._core = kube.core
        self._apps = kube.apps

    def read(self, namespace: str, target: str, publish: TokenLimitPublish) -> Published:
        name = config_map_name(publish, target)
        try:
            with kube_errors(f"ConfigMap {namespace}/{name}"):
                cm = self._core.read_namespaced_config_map(name, namespace)
        except NotFound:
            return Published(None)
        data = cm.data or {}
        limit = _number(data.get(publish.config_map.key), int)
        return Published(None if limit is None else int(limit), _number(data.get(ADMISSION_KEY), float))

    def publish(self, namespace: str, target: str, publish: TokenLimitPublish, values: Published) -> None:
        """Write the fast knobs; raises ``Rejected``, changing nothing, when the ConfigMap exists
        and is not the operator's."""
        name = config_map_name(publish, target)
        where = f"ConfigMap {namespace}/{name}"
        admitted = None if values.admitted_rps_per_pod is None else f"{values.admitted_rps_per_pod:g}"
        data = {publish.config_map.key: str(values.token_limit), ADMISSION_KEY: admitted}  # None deletes the key
        try:
            with kube_errors(where):
                existing = self._core.read_namespaced_config_map(name, namespace)
        except NotFound:
            existing = None
        if existing is None:
            body = client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=name, labels=MANAGED_BY),
                data={k: v for k, v in data.items() if v is not None},
            )
            with kube_errors(f"creating {where}"):  # a Conflict if someone created it meanwhile
                self._core.create_namespaced_config_map(namespace, body)
        else:
            meta = existing.metadata or client.V1ObjectMeta()
            labels = meta.labels or {}
            if any(labels.get(k) != v for k, v in MANAGED_BY.items()):
                label = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
                raise Rejected(
                    f"{where} exists and is not managed by modelbudget, so it is left unchanged: label it "
                    f"{label} to let the operator write it, or delete it (or name another ConfigMap in "
                    "spec.tokenLimits.publish.configMap.name) and the operator creates its own"
                )
            # The resourceVersion makes the patch conditional: if the ConfigMap changed since it was
            # read (its label removed, say), the apiserver answers Conflict and nothing is written.
            patch = {"metadata": {"resourceVersion": meta.resource_version}, "data": data}
            with kube_errors(where):
                self._core.patch_namespaced_config_map(name, namespace, patch)
        if publish.pod_template_annotation:
            # Only the Deployment this ModelBudget targets, in its own namespace, is ever rolled.
            annotation = {ANNOTATION: str(values.token_limit)}
            with kube_errors(f"annotating Deployment {namespace}/{target}"):
                self._apps.patch_namespaced_deployment(
                    target, namespace, {"spec": {"template": {"metadata": {"annotations": annotation}}}}
                )
