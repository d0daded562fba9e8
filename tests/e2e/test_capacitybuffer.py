"""The forecast's headroom as a SIG Autoscaling CapacityBuffer, against the real CRD
(``autoscaling.x-k8s.io_capacitybuffers.yaml`` from sigs.k8s.io/karpenter v1.15.0, installed by
hack/testbed.sh): the operator keeps one buffer per ModelBudget, its scalableRef the target and its
replicas the plan's placeholder pods, their nodes within the ceiling; stale metrics set it to 0;
it goes with its ModelBudget.  No autoscaler runs on the testbed: nothing creates the placeholder
pods, so what is checked is what the operator asks for and pays for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import support
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from support import GPUS_PER_NODE, MB, NODE_PRICE, Env, FaultyPrometheus, budget, record, wait_for, world

from modelbudget.adapters.capacitybuffer import GROUP, PLURAL, VERSION, Buffer, KubeCapacityBuffers, Owner
from modelbudget.adapters.errors import Rejected
from modelbudget.adapters.kube import KubeClients

pytestmark = pytest.mark.e2e

RPS = 2.0
# Thirty-nine buckets of history, as the operator would have recorded it: steady demand with a
# jump of 6 req/s every sixth bucket.  Three minutes ahead the forecast's median peak is 8 req/s,
# which wants two replicas more than the 2 req/s of now (`modelbudget plan` on support.budget's
# spec with this history: 2 replicas, a buffer of 2, 2 nodes, $8/h of $12/h).
PEAKS = ([RPS] * 5 + [RPS + 6]) * 6 + [RPS] * 3
BUCKET = 30


def seed_history(env: Env) -> None:
    """The ModelBudget's demand history, in its status as an earlier operator would have left it
    (the operator reads its controller state from there on its first tick)."""
    now = datetime.now(UTC)
    start = now - timedelta(seconds=BUCKET * (len(PEAKS) - 1))
    history = {"start": start.isoformat(), "bucketSeconds": BUCKET, "peaks": PEAKS}
    body = {"status": {"controllerState": {"demandHistory": history}}}
    env.custom.patch_namespaced_custom_object_status(*MB, env.ns, "modelbudgets", "llm", body)


def buffer(env: Env) -> dict[str, Any] | None:
    try:
        return dict(env.custom.get_namespaced_custom_object(GROUP, VERSION, env.ns, PLURAL, "llm"))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def plan(env: Env) -> dict[str, Any]:
    return dict(env.status().get("plan") or {})


def assert_within_the_ceiling(env: Env, ceiling: float) -> None:
    """What the plan pays for, and what the pool is sized to, holds the replicas and the buffer's
    placeholder pods, within the ceiling."""
    p = plan(env)
    assert p["expectedSpendPerHour"] <= p["allowedSpendPerHour"] + 1e-9 <= ceiling + 1e-9
    size = env.pool_size()
    assert size * NODE_PRICE <= ceiling
    assert size * GPUS_PER_NODE >= p["replicas"] + p.get("bufferReplicas", 0)


@world(replicas=2, rps=RPS)
def test_forecast_headroom_is_a_capacity_buffer_within_the_ceiling_and_zero_on_stale_metrics(env: Env) -> None:
    ceiling = 3 * NODE_PRICE
    proxy = FaultyPrometheus(env.prometheus)
    proxy.start()
    try:
        env.apply_budget(budget("llm", env.pool, proxy.url, ceiling=ceiling))
        seed_history(env)
        env.start_operator()

        # The buffer: named after the ModelBudget, owned by it, sized like its target's pods.
        made = env.wait_for(lambda: (b := buffer(env)) and (b["spec"].get("replicas") or 0) > 0 and b, 60, "a buffer")
        mb = env.custom.get_namespaced_custom_object(*MB, env.ns, "modelbudgets", "llm")
        assert made["spec"]["scalableRef"] == {"apiGroup": "apps", "kind": "Deployment", "name": "llm"}
        assert made["spec"]["provisioningStrategy"] == "buffer.x-k8s.io/active-capacity"  # the CRD's default
        (owner,) = made["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("ModelBudget", "llm", mb["metadata"]["uid"])
        assert made["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "modelbudget"
        env.wait_for(lambda: plan(env).get("bufferReplicas") == made["spec"]["replicas"], 30, "the plan's buffer")
        p = plan(env)
        reasons = {r["reason"] for r in p["reasons"]}
        assert "ForecastBuffer" in reasons and "ForecastScaleUp" not in reasons
        assert p["forecast"]["upperRequestsPerSecond"] > RPS
        # The replicas follow demand; the buffer's nodes are paid for, within the ceiling.
        env.wait_for(lambda: env.pool_size() * GPUS_PER_NODE >= p["replicas"] + p["bufferReplicas"], 30, "the nodes")
        assert env.replicas() == p["replicas"]
        assert_within_the_ceiling(env, ceiling)
        assert env.events("CapacityBufferResized")
        record("capacitybuffer_replicas", made["spec"]["replicas"])
        record("capacitybuffer_pool_nodes", env.pool_size())

        # Stale metrics: no headroom -- the buffer goes to 0 (and stays), nothing scales up.
        replicas_before = env.replicas()
        proxy.set("stale")
        env.demand(20)  # unseen
        env.wait_for(lambda: env.condition("MetricsAvailable").get("reason") == "MetricsStale", 30, "MetricsStale")
        env.wait_for(lambda: (buffer(env) or {}).get("spec", {}).get("replicas") == 0, 30, "the buffer at 0")
        assert plan(env).get("bufferReplicas", 0) == 0
        assert env.replicas() <= replicas_before
        assert_within_the_ceiling(env, ceiling)

        # It goes with its ModelBudget (garbage collection through the ownerReference).
        env.custom.delete_namespaced_custom_object(*MB, env.ns, "modelbudgets", "llm")
        env.wait_for(lambda: buffer(env) is None, 60, "the buffer gone with its ModelBudget")
    finally:
        proxy.stop()


def test_the_adapter_against_the_real_crd(
    testbed: support.Testbed, api_client: client.ApiClient, modelbudget_crd: None, namespace: str
) -> None:
    """KubeCapacityBuffers on the real apiserver: the API is discovered, what it creates passes
    the CRD's schema and rules, reads come from its mirror, an unchanged buffer is not written, and
    a buffer that is not the operator's is left alone."""
    custom = client.CustomObjectsApi(api_client)
    mb = custom.create_namespaced_custom_object(
        *MB, namespace, "modelbudgets", budget("llm", "p", testbed.prometheus_url)
    )
    owner = Owner("llm", mb["metadata"]["uid"])
    buffers = KubeCapacityBuffers(KubeClients.over(api_client))
    assert buffers.served()
    assert buffers.apply(namespace, "llm", owner, Buffer("llm", 2)) is True
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "llm")
    assert stored["spec"] == {
        "provisioningStrategy": "buffer.x-k8s.io/active-capacity",
        "scalableRef": {"apiGroup": "apps", "kind": "Deployment", "name": "llm"},
        "replicas": 2,
    }
    wait_for(lambda: buffers.read(namespace, "llm") == Buffer("llm", 2), 10, "the mirror")
    assert buffers.apply(namespace, "llm", owner, Buffer("llm", 2)) is False
    assert buffers.apply(namespace, "llm", owner, Buffer("llm", 0)) is True
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "llm")["spec"]["replicas"] == 0
    theirs = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CapacityBuffer",
        "metadata": {"name": "theirs"},
        "spec": {"scalableRef": {"apiGroup": "apps", "kind": "Deployment", "name": "llm"}, "percentage": 20},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, theirs)
    with pytest.raises(Rejected, match="not managed by modelbudget"):
        buffers.apply(namespace, "theirs", owner, Buffer("llm", 1))
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "theirs")["spec"]["percentage"] == 20
    assert buffers.read(namespace, "theirs") is None  # not in the operator's mirror
