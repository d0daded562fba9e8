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

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from kubernetes import client

from modelbudget.adapters.errors import NotFound, Rejected
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.adapters.watchcache import PerNamespace, WatchCache, keep
from modelbudget.api.spec import TokenLimitPublish

ANNOTATION = "modelbudget.dev/max-tokens"
ADMISSION_KEY = "admitted_rps_per_pod"  # absent: every request is admitted
MANAGED_BY = {"app.kubernetes.io/managed-by": "modelbudget"}  # on objects the operator may write
MANAGED_BY_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())  # the same, as a label selector


def config_map_name(publish: TokenLimitPublish, target: str) -> str:
    return publish.config_map.name or f"{target}-token-limit"


@dataclass(frozen=True)
class Published:
    """The fast knobs as the gates read them."""

    token_limit: int | None  # None: never published, or not a number
    admitted_rps_per_pod: float | None = None  # None: no admission cap
    # With variants: each variant's traffic share in percent, for the gate or any other router.
    variant_weights: Mapping[str, int] | None = None  # None: no variants (or never published)


class TokenLimitSink(Protocol):
    def read(self, namespace: str, target: str, publish: TokenLimitPublish) -> Published: ...

    def publish(self, namespace: str, target: str, publish: TokenLimitPublish, values: Published) -> None: ...


def _number(raw: str | None, kind: type[int] | type[float]) -> float | None:
    try:
        return kind(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def weights_json(weights: Mapping[str, int]) -> str:
    """The weights key's value: a JSON object, variant -> percent, in a stable order (no spurious writes)."""
    return json.dumps(dict(sorted(weights.items())), separators=(",", ":"))


def parse_weights(raw: str | None) -> dict[str, int] | None:
    """The weights as published, or None when absent or not a JSON object of variant -> integer percent."""
    try:
        weights = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(weights, dict) or not all(type(w) is int for w in weights.values()):
        return None
    return weights


def _data(config_map: dict[str, Any]) -> dict[str, Any]:
    return keep(config_map, "data")


class KubeTokenLimitSink:
    """Reads the published knobs from a watched mirror of each namespace's ConfigMaps that the
    operator manages (started on the namespace's first read: no request per reconcile); writes
    with a read just before, so a ConfigMap that is not the operator's is never written."""

    def __init__(self, kube: KubeClients) -> None:
        self._core = kube.core
        self._apps = kube.apps
        self._mirror = PerNamespace(
            lambda namespace: WatchCache(
                f"modelbudget's ConfigMaps in {namespace}",
                partial(self._core.list_namespaced_config_map, namespace, label_selector=MANAGED_BY_SELECTOR),
                trim=_data,
            )
        )

    def read(self, namespace: str, target: str, publish: TokenLimitPublish) -> Published:
        """What is published; ``Published(None)`` when the ConfigMap is missing or not the operator's
        (then the next publish says why it cannot write it)."""
        cm = self._mirror(namespace).get(namespace, config_map_name(publish, target))
        if cm is None:
            return Published(None)
        data = cm.get("data") or {}
        limit = _number(data.get(publish.config_map.key), int)
        return Published(
            None if limit is None else int(limit),
            _number(data.get(ADMISSION_KEY), float),
            parse_weights(data.get(publish.config_map.weights_key)),
        )

    def publish(self, namespace: str, target: str, publish: TokenLimitPublish, values: Published) -> None:
        """Write the fast knobs; raises ``Rejected``, changing nothing, when the ConfigMap exists
        and is not the operator's."""
        name = config_map_name(publish, target)
        where = f"ConfigMap {namespace}/{name}"
        admitted = None if values.admitted_rps_per_pod is None else f"{values.admitted_rps_per_pod:g}"
        weights = None if not values.variant_weights else weights_json(values.variant_weights)
        data = {  # None deletes the key
            publish.config_map.key: str(values.token_limit),
            ADMISSION_KEY: admitted,
            publish.config_map.weights_key: weights,
        }
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
                raise Rejected(
                    f"{where} exists and is not managed by modelbudget, so it is left unchanged: label it "
                    f"{MANAGED_BY_SELECTOR} to let the operator write it, or delete it (or name another ConfigMap in "
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
