"""The pool writer's mirror of the ModelBudgets' claims, against a mock apiserver (kmock); the
mirror's reads block, so they run off the loop the mock serves on."""

from __future__ import annotations

import asyncio
from typing import Any

import kmock

from modelbudget.adapters.claims import WatchedPoolClaims
from tests.unit.test_adapters_kube import against_kmock, kube
from tests.unit.test_shared_pools import POOL, shared_spec

API = "/apis/modelbudget.dev/v1alpha1"


def budget(namespace: str, name: str, *claims: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name, "resourceVersion": "7"},
        "spec": shared_spec() if spec is None else spec,
        "status": {"poolClaims": list(claims)},
    }


def claim(gpus: int, pool: str = POOL) -> dict[str, Any]:
    return {"pool": pool, "gpus": gpus, "gpusPerReplica": 1, "payablePerHour": 5.0}


@against_kmock
async def test_claims_come_from_a_mirror_per_served_namespace(kmock: kmock.RawHandler) -> None:
    kmock[f"get {API}/namespaces/team-a/modelbudgets"] << {
        "metadata": {"resourceVersion": "40"},
        "items": [budget("team-a", "chat", claim(2)), budget("team-a", "idle")],
    }
    kmock[f"get {API}/namespaces/team-b/modelbudgets"] << {
        "metadata": {"resourceVersion": "41"},
        "items": [
            budget("team-b", "code", claim(1), claim(3, "elsewhere")),
            budget("team-b", "bad", claim(4), spec={}),
        ],
    }
    claims = WatchedPoolClaims(kube(kmock.url), ["team-a", "team-b"])
    found = sorted((c.namespace, c.name, c.claim.gpus) for c in await asyncio.to_thread(claims.claimants, POOL))
    assert found == [("team-a", "chat", 2), ("team-b", "code", 1)]  # a spec that does not parse claims nothing
    assert [
        c.name for c in await asyncio.to_thread(claims.claimants, "elsewhere")
    ] == []  # a pool the spec does not name


@against_kmock
async def test_cluster_wide_without_namespaces(kmock: kmock.RawHandler) -> None:
    kmock[f"get {API}/modelbudgets"] << {"metadata": {"resourceVersion": "5"}, "items": [budget("x", "y", claim(2))]}
    claims = WatchedPoolClaims(kube(kmock.url), [])
    assert [(c.namespace, c.claim.gpus) for c in await asyncio.to_thread(claims.claimants, POOL)] == [("x", 2)]
