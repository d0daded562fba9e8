"""The HTTPRoute weights adapter: the JSON patch it builds, and what it sends and reads (kmock)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonpatch
import kmock
import pytest

from modelbudget.adapters.errors import Conflict, Rejected
from modelbudget.adapters.routing import (
    PATCH_ATTEMPTS,
    BackendNotInRoute,
    HTTPRouteRouter,
    RouteNotFound,
    TrafficRouter,
    backend_slots,
    weights_in_force,
    weights_patch,
)
from tests.unit.fakes import FakeTrafficRouter
from tests.unit.test_adapters_kube import against_kmock, kube

WHERE = "HTTPRoute demo/chat"
ROUTE_PATH = "/apis/gateway.networking.k8s.io/v1/namespaces/demo/httproutes/chat"


def route() -> dict[str, Any]:
    """Two rules carrying the variants' Services, plus backends that are not the operator's."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "chat", "namespace": "demo", "resourceVersion": "7"},
        "spec": {
            "parentRefs": [{"name": "gw"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                    "backendRefs": [
                        {"name": "llama-70b", "port": 8000, "weight": 90},
                        {"name": "llama-8b", "port": 8000, "weight": 10},
                        {"name": "canary", "port": 8000, "weight": 5},
                    ],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/legacy"}}],
                    "backendRefs": [
                        {"name": "legacy", "port": 80},
                        {"name": "llama-8b", "port": 8000},  # no weight: 1
                        {"name": "llama-70b", "port": 8000, "namespace": "other"},  # another namespace's
                        {"group": "example.dev", "kind": "Bucket", "name": "llama-70b"},  # not a Service
                    ],
                },
            ],
        },
    }


def test_only_services_in_the_routes_namespace_are_backends() -> None:
    slots = [(s.rule, s.index, s.service, s.weight) for s in backend_slots(route())]
    assert slots == [
        (0, 0, "llama-70b", 90),
        (0, 1, "llama-8b", 10),
        (0, 2, "canary", 5),
        (1, 0, "legacy", 1),
        (1, 1, "llama-8b", 1),
    ]


def test_the_patch_sets_the_variants_weights_in_every_rule_and_nothing_else() -> None:
    before = route()
    ops = weights_patch(WHERE, before, {"llama-70b": 30, "llama-8b": 70})
    after = jsonpatch.apply_patch(before, ops)
    assert [(r.get("name"), r.get("weight")) for r in after["spec"]["rules"][0]["backendRefs"]] == [
        ("llama-70b", 30),
        ("llama-8b", 70),
        ("canary", 5),
    ]
    legacy, small, other_ns, bucket = after["spec"]["rules"][1]["backendRefs"]
    assert small == {"name": "llama-8b", "port": 8000, "weight": 70}
    assert (legacy, other_ns, bucket) == tuple(before["spec"]["rules"][1]["backendRefs"][i] for i in (0, 2, 3))
    # Everything but those three weights is as it was.
    for rule, ref in ((0, 0), (0, 1), (1, 1)):
        del after["spec"]["rules"][rule]["backendRefs"][ref]["weight"]
        before["spec"]["rules"][rule]["backendRefs"][ref].pop("weight", None)
    assert after == before
    # Each weight is guarded by a test that its backendRef still names the Service.
    assert ops[:2] == [
        {"op": "test", "path": "/spec/rules/0/backendRefs/0/name", "value": "llama-70b"},
        {"op": "add", "path": "/spec/rules/0/backendRefs/0/weight", "value": 30},
    ]


def test_no_ops_when_the_weights_are_in_force_already() -> None:
    current = route()
    current["spec"]["rules"][1]["backendRefs"][1]["weight"] = 10
    assert weights_patch(WHERE, current, {"llama-70b": 90, "llama-8b": 10}) == []


def test_weight_zero_keeps_the_backend_ref() -> None:
    after = jsonpatch.apply_patch(route(), weights_patch(WHERE, route(), {"llama-70b": 0, "llama-8b": 100}))
    assert after["spec"]["rules"][0]["backendRefs"][0] == {"name": "llama-70b", "port": 8000, "weight": 0}


def test_a_patch_built_on_a_stale_read_fails_instead_of_writing_the_wrong_backend() -> None:
    stale = route()
    ops = weights_patch(WHERE, stale, {"llama-70b": 30, "llama-8b": 70})
    moved = route()
    moved["spec"]["rules"][0]["backendRefs"].reverse()  # someone reordered the list meanwhile
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(moved, ops)


def test_a_missing_backend_is_named_and_nothing_is_patched() -> None:
    with pytest.raises(BackendNotInRoute, match=r"HTTPRoute demo/chat has no backendRef to Service mistral-7b") as err:
        weights_patch(WHERE, route(), {"llama-70b": 50, "mistral-7b": 50})
    assert err.value.missing == ["mistral-7b"]


@pytest.mark.parametrize("weight", [-1, 1_000_001])
def test_weights_out_of_the_routes_bounds_are_refused(weight: int) -> None:
    with pytest.raises(ValueError, match="must be in"):
        weights_patch(WHERE, route(), {"llama-70b": weight})


def test_weights_in_force_are_unknown_where_the_rules_disagree() -> None:
    assert weights_in_force(WHERE, route(), ["llama-70b", "llama-8b"]) == {"llama-70b": 90, "llama-8b": None}
    with pytest.raises(BackendNotInRoute, match="mistral-7b"):
        weights_in_force(WHERE, route(), ["mistral-7b"])


@against_kmock
async def test_publish_sends_a_json_patch_and_reads_back(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ROUTE_PATH}"] << route()
    kmock[f"patch {ROUTE_PATH}"] << route()
    router = HTTPRouteRouter(kube(kmock.url))
    assert await asyncio.to_thread(router.publish, "demo", "chat", {"llama-70b": 30, "llama-8b": 70}) is True
    (sent,) = kmock[f"patch {ROUTE_PATH}"]
    assert sent.headers["Content-Type"] == "application/json-patch+json"
    assert json.loads(sent.body) == weights_patch(WHERE, route(), {"llama-70b": 30, "llama-8b": 70})
    assert await asyncio.to_thread(router.weights, "demo", "chat", ["llama-70b", "canary"]) == {
        "llama-70b": 90,
        "canary": 5,
    }


@against_kmock
async def test_publish_writes_nothing_when_the_weights_match(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ROUTE_PATH}"] << route()
    router = HTTPRouteRouter(kube(kmock.url))
    assert await asyncio.to_thread(router.publish, "demo", "chat", {"llama-70b": 90, "canary": 5}) is False
    assert not kmock["patch"]


@against_kmock
async def test_a_missing_route_is_a_route_not_found(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ROUTE_PATH}"] << 404 << {"kind": "Status", "code": 404}
    router = HTTPRouteRouter(kube(kmock.url))
    with pytest.raises(RouteNotFound, match=r"HTTPRoute demo/chat not found .*Gateway API CRDs"):
        await asyncio.to_thread(router.publish, "demo", "chat", {"llama-70b": 30})
    with pytest.raises(RouteNotFound):
        await asyncio.to_thread(router.weights, "demo", "chat", ["llama-70b"])


@against_kmock
async def test_forbidden_is_a_rejection_not_a_client_exception(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ROUTE_PATH}"] << route()
    kmock[f"patch {ROUTE_PATH}"] << 403 << {"kind": "Status", "code": 403, "reason": "Forbidden"}
    router = HTTPRouteRouter(kube(kmock.url))
    with pytest.raises(Rejected, match="setting backend weights on HTTPRoute demo/chat: HTTP 403"):
        await asyncio.to_thread(router.publish, "demo", "chat", {"llama-70b": 30})


# What a real apiserver answers to a failed JSON patch ``test`` (and to an invalid patch alike).
UNPROCESSABLE = {"kind": "Status", "code": 422, "reason": "Invalid", "message": "the server rejected our request"}


@against_kmock
async def test_a_route_that_keeps_moving_is_read_again_then_a_conflict(kmock: kmock.RawHandler) -> None:
    reads = 0

    def moving_route() -> dict[str, Any]:
        """Someone rotates the first rule's backends before every patch lands."""
        nonlocal reads
        reads += 1
        moved = route()
        refs = moved["spec"]["rules"][0]["backendRefs"]
        moved["spec"]["rules"][0]["backendRefs"] = refs[reads % 3 :] + refs[: reads % 3]
        return moved

    kmock[f"get {ROUTE_PATH}"] << moving_route
    kmock[f"patch {ROUTE_PATH}"] << 422 << UNPROCESSABLE
    router = HTTPRouteRouter(kube(kmock.url))
    with pytest.raises(Conflict, match="kept changing"):
        await asyncio.to_thread(router.publish, "demo", "chat", {"llama-70b": 30})
    assert len(kmock[f"patch {ROUTE_PATH}"]) == PATCH_ATTEMPTS
    assert reads == PATCH_ATTEMPTS + 1
    # Each attempt was built on the latest read: its tests name what that read had at each position.
    first_tests = [json.loads(p.body)[0] for p in kmock[f"patch {ROUTE_PATH}"]]
    assert [t["path"] for t in first_tests] == [f"/spec/rules/0/backendRefs/{i}/name" for i in (2, 1, 0)]


@against_kmock
async def test_an_invalid_patch_on_a_route_that_did_not_move_is_not_retried(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ROUTE_PATH}"] << route()
    kmock[f"patch {ROUTE_PATH}"] << 422 << UNPROCESSABLE
    router = HTTPRouteRouter(kube(kmock.url))
    with pytest.raises(Rejected, match="HTTP 422"):
        await asyncio.to_thread(router.publish, "demo", "chat", {"llama-70b": 30})
    assert len(kmock[f"patch {ROUTE_PATH}"]) == 1


def test_the_fake_router_records_writes_and_skips_unchanged_weights() -> None:
    fake = FakeTrafficRouter(routes={("demo", "chat"): {"llama-70b": 90, "llama-8b": 10, "canary": 5}})
    router: TrafficRouter = fake
    assert router.publish("demo", "chat", {"llama-70b": 90, "llama-8b": 10}) is False
    assert router.publish("demo", "chat", {"llama-70b": 30, "llama-8b": 70}) is True
    assert fake.writes == [("demo", "chat", {"llama-70b": 30, "llama-8b": 70})]
    assert router.weights("demo", "chat", ["llama-8b", "canary"]) == {"llama-8b": 70, "canary": 5}
    with pytest.raises(BackendNotInRoute, match="mistral-7b"):
        router.publish("demo", "chat", {"mistral-7b": 100})
    with pytest.raises(RouteNotFound):
        router.weights("demo", "other", [])
