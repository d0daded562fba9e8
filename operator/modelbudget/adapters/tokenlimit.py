"""Where the per-request token limit is published: a ConfigMap key, optionally a pod annotation.

The ConfigMap is the fast path (a server or gateway re-reads it within seconds, no restart);
the pod-template annotation rolls the Deployment, so it is opt-in (docs/token-limits.md).
"""

from __future__ import annotations

from typing import Protocol

from kubernetes import client

from modelbudget.adapters.errors import NotFound
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.api.spec import TokenLimitPublish

ANNOTATION = "modelbudget.dev/max-tokens"
MANAGED_BY = {"app.kubernetes.io/managed-by": "modelbudget"}


def config_map_name(publish: TokenLimitPublish, target: str) -> str:
    return publish.config_map.name or f"{target}-token-limit"


class TokenLimitSink(Protocol):
    def read(self, namespace: str, target: str, publish: TokenLimitPublish) -> int | None: ...

    def publish(self, namespace: str, target: str, publish: TokenLimitPublish, limit: int) -> None: ...


class KubeTokenLimitSink:
    def __init__(self, kube: KubeClients) -> None:
        self._core = kube.core
        self._apps = kube.apps

    def read(self, namespace: str, target: str, publish: TokenLimitPublish) -> int | None:
        """The limit in force (``None``: never published, or not a number)."""
        name = config_map_name(publish, target)
        try:
            with kube_errors(f"ConfigMap {namespace}/{name}"):
                cm = self._core.read_namespaced_config_map(name, namespace)
        except NotFound:
            return None
        raw = (cm.data or {}).get(publish.config_map.key)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    def publish(self, namespace: str, target: str, publish: TokenLimitPublish, limit: int) -> None:
        name = config_map_name(publish, target)
        data = {publish.config_map.key: str(limit)}
        try:
            with kube_errors(f"ConfigMap {namespace}/{name}"):
                self._core.patch_namespaced_config_map(name, namespace, {"data": data})
        except NotFound:
            with kube_errors(f"creating ConfigMap {namespace}/{name}"):
                self._core.create_namespaced_config_map(
                    namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=MANAGED_BY), data=data)
                )
        if publish.pod_template_annotation:
            with kube_errors(f"annotating Deployment {namespace}/{target}"):
                self._apps.patch_namespaced_deployment(
                    target, namespace, {"spec": {"template": {"metadata": {"annotations": {ANNOTATION: str(limit)}}}}}
                )
