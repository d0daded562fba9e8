"""Where the fast knobs are published for the gates: a ConfigMap with the per-request token limit
and each pod's share of the admitted request rate; optionally a pod annotation for the limit.

The ConfigMap is the fast path (the gate watches it and applies a change within seconds, no
restart); the pod-template annotation rolls the Deployment, so it is opt-in (docs/token-limits.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kubernetes import client

from modelbudget.adapters.errors import NotFound
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.api.spec import TokenLimitPublish

ANNOTATION = "modelbudget.dev/max-tokens"
ADMISSION_KEY = "admitted_rps_per_pod"  # absent: every request is admitted
MANAGED_BY = {"app.kubernetes.io/managed-by": "modelbudget"}


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
        name = config_map_name(publish, target)
        admitted = None if values.admitted_rps_per_pod is None else f"{values.admitted_rps_per_pod:g}"
        data = {publish.config_map.key: str(values.token_limit), ADMISSION_KEY: admitted}  # None deletes the key
        try:
            with kube_errors(f"ConfigMap {namespace}/{name}"):
                self._core.patch_namespaced_config_map(name, namespace, {"data": data})
        except NotFound:
            body = client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=name, labels=MANAGED_BY),
                data={k: v for k, v in data.items() if v is not None},
            )
            with kube_errors(f"creating ConfigMap {namespace}/{name}"):
                self._core.create_namespaced_config_map(namespace, body)
        if publish.pod_template_annotation:
            annotation = {ANNOTATION: str(values.token_limit)}
            with kube_errors(f"annotating Deployment {namespace}/{target}"):
                self._apps.patch_namespaced_deployment(
                    target, namespace, {"spec": {"template": {"metadata": {"annotations": annotation}}}}
                )
