"""Watch caches against the real apiserver: the mirror follows creates, updates and deletes, and
reads cost no request (one LIST and one WATCH, however many reads)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from kubernetes import client
from support import wait_for

from modelbudget.adapters.conflicts import KubeConflictFinder
from modelbudget.adapters.errors import Rejected
from modelbudget.adapters.kube import KubeClients
from modelbudget.adapters.tokenlimit import KubeTokenLimitSink, Published
from modelbudget.adapters.watchcache import WatchCache
from modelbudget.api.spec import TokenLimitPublish

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


class _CountingCore(client.CoreV1Api):
    """The real CoreV1Api, counting the GETs of single ConfigMaps."""

    def __init__(self, api_client: client.ApiClient) -> None:
        super().__init__(api_client)
        self.config_map_gets = 0

    def read_namespaced_config_map(self, *args: Any, **kwargs: Any) -> Any:
        self.config_map_gets += 1
        return super().read_namespaced_config_map(*args, **kwargs)


def test_the_token_limit_is_read_from_the_watch_and_written_to_the_api(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = _CountingCore(api_client)
    sink = KubeTokenLimitSink(dataclasses.replace(KubeClients.over(api_client), core=core))
    publish = TokenLimitPublish()
    assert sink.read(namespace, "llm", publish) == Published(None)  # none yet: asked with a GET
    sink.publish(namespace, "llm", publish, Published(2048, 1.5))  # created
    stored = core.read_namespaced_config_map("llm-token-limit", namespace)
    assert stored.data == {"max_tokens": "2048", "admitted_rps_per_pod": "1.5"}
    gets = core.config_map_gets
    # The write is seen at once (the apiserver's answer goes into the mirror), then from the watch.
    assert sink.read(namespace, "llm", publish) == Published(2048, 1.5)
    sink.publish(namespace, "llm", publish, Published(1024))  # a conditional PATCH
    assert sink.read(namespace, "llm", publish) == Published(1024)
    assert core.read_namespaced_config_map("llm-token-limit", namespace).data == {"max_tokens": "1024"}
    gets += 1  # that check's own GET
    # Someone else's change arrives through the watch.
    core.patch_namespaced_config_map("llm-token-limit", namespace, {"data": {"max_tokens": "512"}})
    wait_for(lambda: sink.read(namespace, "llm", publish) == Published(512), 10, "the change in the mirror")
    for _ in range(100):
        sink.read(namespace, "llm", publish)
    assert core.config_map_gets == gets  # no GET per read in the steady state
    # A ConfigMap that is not the operator's is still refused, with the reason.
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "theirs"}, "data": {"max_tokens": "64"}})
    theirs = TokenLimitPublish.model_validate({"configMap": {"name": "theirs"}})
    assert sink.read(namespace, "llm", theirs) == Published(64)
    with pytest.raises(Rejected, match="not managed by modelbudget"):
        sink.publish(namespace, "llm", theirs, Published(128))
