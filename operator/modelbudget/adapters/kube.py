"""One place that builds the kubernetes clients, once, for all adapters."""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


@dataclass(frozen=True)
class KubeClients:
    core: client.CoreV1Api
    apps: client.AppsV1Api
    custom: client.CustomObjectsApi
    autoscaling: client.AutoscalingV2Api
    coordination: client.CoordinationV1Api

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
        )


def is_not_found(exc: ApiException) -> bool:
    return bool(exc.status == 404)
