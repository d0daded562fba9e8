"""Secret values (Prometheus credentials, CA bundles): read, decoded, never logged."""

from __future__ import annotations

import base64
import hashlib
import tempfile
from pathlib import Path
from typing import Protocol

from modelbudget.adapters.errors import AdapterError
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.adapters.metrics import PrometheusCredentials
from modelbudget.api.spec import Metrics


class SecretMissing(AdapterError):
    """A referenced Secret or key does not exist; the message names it, never its content."""


class SecretSource(Protocol):
    def read(self, namespace: str, name: str, key: str) -> str: ...


class KubeSecrets:
    def __init__(self, kube: KubeClients) -> None:
        self._core = kube.core

    def read(self, namespace: str, name: str, key: str) -> str:
        try:
            with kube_errors(f"Secret {namespace}/{name}"):
                secret = self._core.read_namespaced_secret(name, namespace)
        except AdapterError as exc:
            raise SecretMissing(str(exc)) from None
        data = secret.data or {}
        if key not in data:
            raise SecretMissing(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode()


def _ca_file(pem: str) -> str:
    """requests wants a CA bundle as a path: write it once per content (it is not a secret)."""
    path = Path(tempfile.gettempdir()) / f"modelbudget-ca-{hashlib.sha256(pem.encode()).hexdigest()[:16]}.pem"
    if not path.exists():
        path.write_text(pem)
    return str(path)


def prometheus_credentials(secrets: SecretSource, metrics: Metrics, namespace: str) -> PrometheusCredentials:
    """The spec's secret references resolved; raises ``SecretMissing``."""
    bearer = basic = ca = None
    auth = metrics.auth
    if auth is not None and auth.bearer_token_secret_ref is not None:
        ref = auth.bearer_token_secret_ref
        bearer = secrets.read(namespace, ref.name, ref.key).strip()
    if auth is not None and auth.basic_auth_secret_ref is not None:
        name = auth.basic_auth_secret_ref
        basic = (secrets.read(namespace, name, "username"), secrets.read(namespace, name, "password"))
    if metrics.ca_secret_ref is not None:
        ca = _ca_file(secrets.read(namespace, metrics.ca_secret_ref.name, metrics.ca_secret_ref.key))
    return PrometheusCredentials(bearer_token=bearer, basic_auth=basic, ca_bundle_path=ca)
