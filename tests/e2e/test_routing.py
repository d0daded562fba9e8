"""Routing published where users route, against the real apiserver and the real Gateway API CRDs
(installed by hack/testbed.sh from the sigs.k8s.io/gateway-api module): the variants' weights on
an HTTPRoute's backendRefs, and in the gates' ConfigMap."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from support import Testbed, token_kubeconfig, unique

from modelbudget.adapters.errors import Rejected
from modelbudget.adapters.kube import KubeClients
from modelbudget.adapters.routing import (
    GROUP,
    JSON_PATCH,
    PLURAL,
    VERSION,
    BackendNotInRoute,
    HTTPRouteRouter,
    RouteNotFound,
)
from modelbudget.adapters.tokenlimit import KubeTokenLimitSink, Published
from modelbudget.api.spec import TokenLimitPublish

pytestmark = pytest.mark.e2e

ROUTE = "chat"
BIG, SMALL, UNRELATED = "llama-70b", "llama-8b", "canary"


@pytest.fixture
def gateway_class(api_client: client.ApiClient) -> Iterator[str]:
    custom = client.CustomObjectsApi(api_client)
    name = unique("e2e-routing")
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GatewayClass",
        "metadata": {"name": name},
        "spec": {"controllerName": "example.dev/gateway-controller"},
    }
    custom.create_cluster_custom_object(GROUP, VERSION, "gatewayclasses", body)
    yield name
    custom.delete_cluster_custom_object(GROUP, VERSION, "gatewayclasses", name)


def route_body() -> dict[str, Any]:
    """Two rules carrying both variants' Services, and a backend that is not a variant's."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": ROUTE},
        "spec": {
            "parentRefs": [{"name": "gw"}],
            "hostnames": ["chat.example.dev"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                    "backendRefs": [
                        {"name": BIG, "port": 8000, "weight": 100},
                        {"name": SMALL, "port": 8000, "weight": 0},
                        {"name": UNRELATED, "port": 8000, "weight": 3},
                    ],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/batch"}}],
                    "backendRefs": [{"name": SMALL, "port": 8000}, {"name": BIG, "port": 8000}],
                },
            ],
        },
    }


@pytest.fixture
def route(api_client: client.ApiClient, namespace: str, gateway_class: str) -> dict[str, Any]:
    """A Gateway and the HTTPRoute attached to it, as created."""
    custom = client.CustomObjectsApi(api_client)
    gateway = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Gateway",
        "metadata": {"name": "gw"},
        "spec": {"gatewayClassName": gateway_class, "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "gateways", gateway)
    created: dict[str, Any] = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, route_body())
    return created


def read_route(api_client: client.ApiClient, namespace: str) -> dict[str, Any]:
    got: dict[str, Any] = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, ROUTE
    )
    return got


def backends(route: dict[str, Any]) -> list[list[tuple[str, int | None]]]:
    return [[(r["name"], r.get("weight")) for r in rule["backendRefs"]] for rule in route["spec"]["rules"]]


def test_the_gateway_api_standard_crds_are_installed(api_client: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api_client)
    for plural in ("gatewayclasses", "gateways", PLURAL):
        crd = ext.read_custom_resource_definition(f"{plural}.{GROUP}")
        assert crd.metadata.annotations["gateway.networking.k8s.io/channel"] == "standard"
        assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)
        assert VERSION in [v.name for v in crd.spec.versions if v.served]


def test_weights_are_set_on_the_variants_backends_only_and_read_back(
    api_client: client.ApiClient, namespace: str, route: dict[str, Any]
) -> None:
    router = HTTPRouteRouter(KubeClients.over(api_client))
    assert router.weights(namespace, ROUTE, [BIG, SMALL, UNRELATED]) == {BIG: None, SMALL: None, UNRELATED: 3}

    assert router.publish(namespace, ROUTE, {BIG: 30, SMALL: 70}) is True
    after = read_route(api_client, namespace)
    assert backends(after) == [[(BIG, 30), (SMALL, 70), (UNRELATED, 3)], [(SMALL, 70), (BIG, 30)]]
    assert router.weights(namespace, ROUTE, [BIG, SMALL]) == {BIG: 30, SMALL: 70}
    # Everything but the variants' weights is as it was created.
    for rule in after["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            if ref["name"] in (BIG, SMALL):
                del ref["weight"]
    expected = copy.deepcopy(route["spec"])
    for rule in expected["rules"]:
        for ref in rule["backendRefs"]:
            if ref["name"] in (BIG, SMALL):
                ref.pop("weight", None)
    assert after["spec"] == expected

    # Unchanged weights: no write at all.
    version = read_route(api_client, namespace)["metadata"]["resourceVersion"]
    assert router.publish(namespace, ROUTE, {BIG: 30, SMALL: 70}) is False
    assert read_route(api_client, namespace)["metadata"]["resourceVersion"] == version

    # Weight 0 keeps the backendRef (it gets no traffic, and can get it back).
    assert router.publish(namespace, ROUTE, {BIG: 0, SMALL: 100}) is True
    assert backends(read_route(api_client, namespace))[0] == [(BIG, 0), (SMALL, 100), (UNRELATED, 3)]


class StaleFirstRead(HTTPRouteRouter):
    """A router whose first read is the route as it was before someone else's edit: the race
    between reading the route and patching it, made to happen every time."""

    def __init__(self, kube: KubeClients, stale: dict[str, Any]) -> None:
        super().__init__(kube)
        self.stale: dict[str, Any] | None = stale
        self.reads = 0

    def _read(self, namespace: str, route: str) -> dict[str, Any]:
        self.reads += 1
        stale, self.stale = self.stale, None
        return stale if stale is not None else super()._read(namespace, route)


def test_a_concurrent_edit_is_kept_and_a_reordered_route_is_read_again(
    api_client: client.ApiClient, namespace: str, route: dict[str, Any]
) -> None:
    custom = client.CustomObjectsApi(api_client)
    kube = KubeClients.over(api_client)

    # Someone changes another field after our read: the weights go in, their edit stays.
    stale = read_route(api_client, namespace)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, ROUTE, {"spec": {"hostnames": ["chat.example.dev", "llm.example.dev"]}}
    )
    router = StaleFirstRead(kube, stale)
    assert router.publish(namespace, ROUTE, {BIG: 40, SMALL: 60}) is True
    after = read_route(api_client, namespace)
    assert after["spec"]["hostnames"] == ["chat.example.dev", "llm.example.dev"]
    assert backends(after)[0] == [(BIG, 40), (SMALL, 60), (UNRELATED, 3)]
    assert router.reads == 1

    # Someone reorders the backends after our read: the stale positions fail the patch's tests
    # (the apiserver writes nothing), the route is read again and the weights land on the right refs.
    stale = read_route(api_client, namespace)
    reordered = stale["spec"]["rules"][0]["backendRefs"][::-1]
    move = [{"op": "replace", "path": "/spec/rules/0/backendRefs", "value": reordered}]
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ROUTE, move, _content_type=JSON_PATCH)
    router = StaleFirstRead(kube, stale)
    assert router.publish(namespace, ROUTE, {BIG: 25, SMALL: 75}) is True
    assert router.reads == 2
    assert backends(read_route(api_client, namespace)) == [
        [(UNRELATED, 3), (SMALL, 75), (BIG, 25)],
        [(SMALL, 75), (BIG, 25)],
    ]


def test_a_missing_route_or_backend_is_a_clear_error_and_nothing_is_written(
    api_client: client.ApiClient, namespace: str, route: dict[str, Any]
) -> None:
    router = HTTPRouteRouter(KubeClients.over(api_client))
    with pytest.raises(RouteNotFound, match=f"HTTPRoute {namespace}/nope not found"):
        router.publish(namespace, "nope", {BIG: 50, SMALL: 50})
    version = read_route(api_client, namespace)["metadata"]["resourceVersion"]
    with pytest.raises(BackendNotInRoute, match="has no backendRef to Service mistral-7b"):
        router.publish(namespace, ROUTE, {BIG: 50, "mistral-7b": 50})
    assert read_route(api_client, namespace)["metadata"]["resourceVersion"] == version


def test_without_patch_rights_the_error_says_forbidden(
    api_client: client.ApiClient, namespace: str, route: dict[str, Any], testbed: Testbed, tmp_path: Path
) -> None:
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rule = {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get"]}
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "reader"}, "rules": [rule]})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    kubeconfig = token_kubeconfig(testbed.kubeconfig, namespace, "reader", testbed, tmp_path / "reader.kubeconfig")
    router = HTTPRouteRouter(KubeClients.over(config.new_client_from_config(config_file=kubeconfig)))
    assert router.weights(namespace, ROUTE, [UNRELATED]) == {UNRELATED: 3}
    with pytest.raises(Rejected, match=f"setting backend weights on HTTPRoute {namespace}/{ROUTE}: HTTP 403"):
        router.publish(namespace, ROUTE, {BIG: 50, SMALL: 50})


def test_the_gates_configmap_carries_the_weights(api_client: client.ApiClient, namespace: str) -> None:
    sink = KubeTokenLimitSink(KubeClients.over(api_client))
    publish = TokenLimitPublish()
    sink.publish(namespace, "chat", publish, Published(1024, None, {SMALL: 70, BIG: 30}))
    data = client.CoreV1Api(api_client).read_namespaced_config_map("chat-token-limit", namespace).data
    assert data == {"max_tokens": "1024", "weights": '{"llama-70b":30,"llama-8b":70}'}
    assert sink.read(namespace, "chat", publish) == Published(1024, None, {BIG: 30, SMALL: 70})
    # No variants any more: the key goes, the limit stays.
    sink.publish(namespace, "chat", publish, Published(1024))
    assert client.CoreV1Api(api_client).read_namespaced_config_map("chat-token-limit", namespace).data == {
        "max_tokens": "1024"
    }
