"""The CapacityBuffer adapter against a mock apiserver (kmock): what it creates, when it writes
nothing, what it refuses to touch, how it finds out whether the API is served; and its fake."""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
import pytest

from modelbudget.adapters.capacitybuffer import (
    DISCOVERY_SECONDS,
    Buffer,
    CapacityBuffers,
    KubeCapacityBuffers,
    Owner,
    buffer_of,
)
from modelbudget.adapters.errors import NotFound, Rejected, Unavailable
from tests.unit.fakes import Clock, FakeCapacityBuffers
from tests.unit.test_adapters_kube import MANAGED, against_kmock, kube

API = "/apis/autoscaling.x-k8s.io/v1beta1"
LIST = f"{API}/namespaces/demo/capacitybuffers"
ONE = f"{LIST}/chat"
OWNER = Owner("chat", "8a3c0c1e-0000-4000-8000-000000000001")
DISCOVERY = {
    "kind": "APIResourceList",
    "groupVersion": "autoscaling.x-k8s.io/v1beta1",
    "resources": [
        {
            "name": "capacitybuffers",
            "singularName": "capacitybuffer",
            "namespaced": True,
            "kind": "CapacityBuffer",
            "verbs": ["get"],
        },
        {
            "name": "capacitybuffers/status",
            "singularName": "",
            "namespaced": True,
            "kind": "CapacityBuffer",
            "verbs": ["get"],
        },
    ],
}


def stored(replicas: int = 3, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A CapacityBuffer as the apiserver returns it."""
    return {
        "apiVersion": "autoscaling.x-k8s.io/v1beta1",
        "kind": "CapacityBuffer",
        "metadata": {
            "name": "chat",
            "namespace": "demo",
            "resourceVersion": "12",
            "labels": MANAGED if labels is None else labels,
            "ownerReferences": [
                {"apiVersion": "modelbudget.dev/v1alpha1", "kind": "ModelBudget", "name": "chat", "uid": OWNER.uid}
            ],
        },
        "spec": {
            "provisioningStrategy": "buffer.x-k8s.io/active-capacity",
            "scalableRef": {"apiGroup": "apps", "kind": "Deployment", "name": "llm"},
            "replicas": replicas,
            **spec,
        },
    }


@against_kmock
async def test_a_missing_buffer_is_created_owned_by_the_model_budget(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ONE}"] << 404 << {"kind": "Status", "code": 404}
    kmock[f"post {LIST}"] << stored()
    buffers = KubeCapacityBuffers(kube(kmock.url))
    assert await asyncio.to_thread(buffers.apply, "demo", "chat", OWNER, Buffer("llm", 3)) is True
    created = kmock[f"post {LIST}"][0].data
    assert created["apiVersion"] == "autoscaling.x-k8s.io/v1beta1" and created["kind"] == "CapacityBuffer"
    assert created["metadata"]["name"] == "chat" and created["metadata"]["labels"] == MANAGED
    (ref,) = created["metadata"]["ownerReferences"]
    assert ref == {
        "apiVersion": "modelbudget.dev/v1alpha1",
        "kind": "ModelBudget",
        "name": "chat",
        "uid": OWNER.uid,
        "controller": True,
        "blockOwnerDeletion": False,
    }
    assert created["spec"] == {"scalableRef": {"apiGroup": "apps", "kind": "Deployment", "name": "llm"}, "replicas": 3}
    assert not kmock["patch"]


@against_kmock
async def test_nothing_is_written_when_the_buffer_has_what_is_asked(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ONE}"] << stored(3)
    buffers = KubeCapacityBuffers(kube(kmock.url))
    assert await asyncio.to_thread(buffers.apply, "demo", "chat", OWNER, Buffer("llm", 3)) is False
    assert not kmock["patch"] and not kmock["post"]


@against_kmock
async def test_a_change_is_a_patch_conditional_on_the_version_read(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ONE}"] << stored(3, percentage=20)
    kmock[f"patch {ONE}"] << stored(0)
    buffers = KubeCapacityBuffers(kube(kmock.url))
    assert await asyncio.to_thread(buffers.apply, "demo", "chat", OWNER, Buffer("llm", 0)) is True
    sent = kmock[f"patch {ONE}"][0].data
    assert sent["metadata"]["resourceVersion"] == "12"
    assert sent["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    # replicas 0 is written, not left out (a buffer without it is sized by its limits), and a
    # percentage that would size it besides is cleared.
    assert sent["spec"] == {
        "scalableRef": {"apiGroup": "apps", "kind": "Deployment", "name": "llm"},
        "replicas": 0,
        "percentage": None,
        "podTemplateRef": None,
    }


@against_kmock
async def test_a_buffer_that_is_not_the_operators_is_never_written(kmock: kmock.RawHandler) -> None:
    kmock[f"get {ONE}"] << stored(5, labels={"team": "infra"})
    buffers = KubeCapacityBuffers(kube(kmock.url))
    with pytest.raises(Rejected, match="CapacityBuffer demo/chat exists and is not managed by modelbudget"):
        await asyncio.to_thread(buffers.apply, "demo", "chat", OWNER, Buffer("llm", 3))
    assert not kmock["patch"] and not kmock["post"]


@against_kmock
async def test_reads_come_from_a_mirror_of_the_operators_buffers(kmock: kmock.RawHandler) -> None:
    kmock[f"get {LIST}"] << {"metadata": {"resourceVersion": "40"}, "items": [stored(4)]}
    buffers = KubeCapacityBuffers(kube(kmock.url))
    assert await asyncio.to_thread(buffers.read, "demo", "chat") == Buffer("llm", 4)
    assert await asyncio.to_thread(buffers.read, "demo", "other") is None
    assert kmock[f"get {LIST}"][0].url.query["labelSelector"] == "app.kubernetes.io/managed-by=modelbudget"
    assert not kmock[f"get {ONE}"]


@against_kmock
async def test_served_is_asked_through_discovery_and_kept_a_while(kmock: kmock.RawHandler) -> None:
    kmock[f"get {API}"] << DISCOVERY
    clock = Clock()
    buffers = KubeCapacityBuffers(kube(kmock.url), clock=clock)
    assert await asyncio.to_thread(buffers.served) is True
    assert await asyncio.to_thread(buffers.served) is True
    assert len(kmock[f"get {API}"]) == 1
    clock.t += DISCOVERY_SECONDS
    assert await asyncio.to_thread(buffers.served) is True
    assert len(kmock[f"get {API}"]) == 2


@against_kmock
async def test_a_group_without_capacity_buffers_or_no_group_is_not_served(kmock: kmock.RawHandler) -> None:
    # autoscaling.x-k8s.io also has ProvisioningRequests: the group alone says nothing.
    only_requests = {**DISCOVERY, "resources": [{**DISCOVERY["resources"][0], "name": "provisioningrequests"}]}
    kmock[f"get {API}"] << only_requests
    clock = Clock()
    buffers = KubeCapacityBuffers(kube(kmock.url), clock=clock)
    assert await asyncio.to_thread(buffers.served) is False
    kmock[f"get {API}"].override << 404 << {"kind": "Status", "code": 404}
    clock.t += DISCOVERY_SECONDS
    assert await asyncio.to_thread(buffers.served) is False
    assert len(kmock[f"get {API}"]) == 2


@against_kmock
async def test_a_failed_discovery_keeps_the_last_answer(kmock: kmock.RawHandler) -> None:
    kmock[f"get {API}"] << DISCOVERY
    clock = Clock()
    buffers = KubeCapacityBuffers(kube(kmock.url), clock=clock)
    assert await asyncio.to_thread(buffers.served) is True
    kmock[f"get {API}"].override << 503 << {"kind": "Status", "code": 503}
    clock.t += DISCOVERY_SECONDS
    assert await asyncio.to_thread(buffers.served) is True
    fresh = KubeCapacityBuffers(kube(kmock.url), clock=clock)
    with pytest.raises(Unavailable):  # nothing to keep: the caller decides
        await asyncio.to_thread(fresh.served)


def test_what_a_buffer_carries_of_what_the_operator_sets() -> None:
    assert buffer_of(stored(3)) == Buffer("llm", 3)
    assert buffer_of(stored(3, percentage=20)) == Buffer("llm", None)  # not sized by replicas alone
    assert buffer_of({"spec": {"podTemplateRef": {"name": "t"}, "replicas": 2}}) == Buffer("", None)
    assert buffer_of(
        {"spec": {"scalableRef": {"kind": "StatefulSet", "apiGroup": "apps", "name": "llm"}, "replicas": 1}}
    ) == Buffer("", 1)


def test_the_fake_records_writes_and_skips_unchanged_buffers() -> None:
    fake = FakeCapacityBuffers(foreign={("demo", "theirs")})
    buffers: CapacityBuffers = fake
    assert buffers.served() and buffers.read("demo", "chat") is None
    assert buffers.apply("demo", "chat", OWNER, Buffer("llm", 2)) is True
    assert buffers.apply("demo", "chat", OWNER, Buffer("llm", 2)) is False
    assert buffers.read("demo", "chat") == Buffer("llm", 2)
    assert fake.writes == [("demo", "chat", Buffer("llm", 2))]
    with pytest.raises(Rejected):
        buffers.apply("demo", "theirs", OWNER, Buffer("llm", 1))
    fake.api_served = False
    with pytest.raises(NotFound):
        buffers.apply("demo", "chat", OWNER, Buffer("llm", 1))
