"""Watch caches against the real apiserver: the mirror follows creates, updates and deletes, and
reads cost no request (one LIST and one WATCH, however many reads)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from support import wait_for

from modelbudget.adapters.conflicts import KubeConflictFinder
from modelbudget.adapters.kube import KubeClients
from modelbudget.adapters.watchcache import WatchCache

pytestmark = pytest.mark.e2e


def test_a_watch_cache_follows_the_apiserver_with_one_list_and_one_watch(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    calls: list[str] = []

    def list_config_maps(**kwargs: Any) -> Any:
        calls.append("WATCH" if kwargs.get("watch") else "LIST")
        return core.list_namespaced_config_map(namespace, **kwargs)

    cache = WatchCache(f"ConfigMaps in {namespace}", list_config_maps)
    try:

        def data(name: str) -> dict[str, str] | None:
            found = [o for o in cache.items() if o["metadata"]["name"] == name]
            return (found[0].get("data") or {}) if found else None

        core.create_namespaced_config_map(namespace, {"metadata": {"name": "watched"}, "data": {"k": "1"}})
        wait_for(lambda: data("watched") == {"k": "1"}, 10, "the new ConfigMap in the cache")
        core.patch_namespaced_config_map("watched", namespace, {"data": {"k": "2"}})
        wait_for(lambda: data("watched") == {"k": "2"}, 10, "the change in the cache")
        core.delete_namespaced_config_map("watched", namespace)
        wait_for(lambda: data("watched") is None, 10, "the deletion in the cache")
        for _ in range(200):
            cache.items()
        assert calls == ["LIST", "WATCH"]
    finally:
        cache.stop()


def test_conflicting_hpas_are_seen_from_the_watch(api_client: client.ApiClient, namespace: str) -> None:
    finder = KubeConflictFinder(KubeClients.over(api_client))
    assert finder.find(namespace, "llm") == []  # KEDA's API installed or not: nothing targets it
    hpa = {
        "metadata": {"name": "other"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
            "minReplicas": 1,
            "maxReplicas": 3,
        },
    }
    autoscaling = client.AutoscalingV2Api(api_client)
    autoscaling.create_namespaced_horizontal_pod_autoscaler(namespace, hpa)
    wait_for(lambda: finder.find(namespace, "llm") == ["HorizontalPodAutoscaler/other"], 10, "the HPA")
    assert finder.find(namespace, "web") == []
    autoscaling.delete_namespaced_horizontal_pod_autoscaler("other", namespace)
    wait_for(lambda: finder.find(namespace, "llm") == [], 10, "the HPA gone")
