"""One place that builds the kubernetes clients, once, for all adapters, and one place that turns
the client's exceptions into the adapters' domain errors (``adapters.errors``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from modelbudget.adapters.errors import AdapterError, Conflict, NotFound, Rejected, Unavailable


@dataclass(frozen=True)
class KubeClients:
    core: client.CoreV1Api
    apps: client.AppsV1Api
    custom: client.CustomObjectsApi
    autoscaling: client.AutoscalingV2Api
    coordination: client.CoordinationV1Api
    apis: client.ApisApi  # discovery: which API groups the server has, at which preferred version

    @staticmethod
    def connect(kubeconfig: str | None = None) -> KubeClients:
        """In-cluster credentials when running in a Pod, else the kubeconfig (``$KUBECONFIG``)."""
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        return KubeClients.over(client.ApiClient())

    @staticmethod
    def over(api: client.ApiClient) -> KubeClients:
        """The typed clients sharing one connection pool."""
        return KubeClients(
            core=client.CoreV1Api(api),
            apps=client.AppsV1Api(api),
            custom=client.CustomObjectsApi(api),
            autoscaling=client.AutoscalingV2Api(api),
            coordination=client.CoordinationV1Api(api),
            apis=client.ApisApi(api),
        )


def _domain_error(what: str, exc: ApiException) -> AdapterError:
    message = f"{what}: HTTP {exc.status} {exc.reason}"
    if exc.status == 404:
        return NotFound(message)
    if exc.status == 409:
        return Conflict(message)
    if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
        return Rejected(message)
    return Unavailable(message)


@contextlib.contextmanager
def kube_errors(what: str) -> Iterator[None]:
    """Run apiserver calls, raising ``AdapterError``s that name ``what`` was being done."""
    try:
        yield
    except ApiException as exc:
        raise _domain_error(what, exc) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise Unavailable(f"{what}: apiserver unreachable ({type(exc).__name__})") from exc
