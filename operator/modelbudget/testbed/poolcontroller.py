"""Reconciles ``KwokNodePool`` objects into kwok fake GPU Nodes: the testbed's node pool provider.

A pool ``p`` with ``spec.replicas = n`` owns the Nodes ``p-0 … p-(n-1)``. Scaling up does not
create Nodes at once: each missing Node is recorded in ``status.provisioning`` with the time it
will appear (now + ``provisioningDelaySeconds``), like a cloud booting a machine, and is created
when that time has passed. Keeping the schedule in status means a restarted controller neither
forgets nor restarts a provisioning. Scaling down cancels pending provisionings and drains the
surplus Nodes, highest index first: cordon, force-delete the pods bound to the Node (they are
kwok fakes running nothing, so there is no grace period to respect; their ReplicaSets recreate
them at once, Pending if nothing fits), then delete the Node. Relying on the pod garbage
collector instead would leave orphaned pods around for ~40 s and make tests slow and racy.

Deleting a pool drains and deletes its Nodes the same way before a finalizer lets it go;
without that, the pods bound to the vanished Nodes would hang in Terminating (no kubelet, and
kwok stops tending pods of Nodes that no longer exist), and so would their namespace. The
Nodes also carry an owner reference to their pool, so garbage collection removes them should
the finalizer be taken off by hand.

The loop polls every second (level-triggered: a few objects on a local apiserver, no watch
reconnect logic) and is run as ``python -m modelbudget.testbed.poolcontroller --kubeconfig …``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

log = logging.getLogger("poolcontroller")

GROUP, VERSION, PLURAL = "testbed.modelbudget.dev", "v1alpha1", "kwoknodepools"
POOL_LABEL = "modelbudget.dev/pool"
FINALIZER = "testbed.modelbudget.dev/drain-nodes"
GPU = "nvidia.com/gpu"


@dataclass(frozen=True)
class Plan:
    create: list[str]  # Nodes whose provisioning delay is over
    delete: list[str]  # surplus Nodes, highest index first
    provisioning: list[dict[str, str]]  # still-pending [{"name", "readyAt"}]


def node_name(pool: str, index: int) -> str:
    return f"{pool}-{index}"


def _index(pool: str, name: str) -> int:
    """The node's index in its pool; -1 for a stray name, so it sorts first and goes last."""
    m = re.fullmatch(re.escape(pool) + r"-(\d+)", name)
    return int(m.group(1)) if m else -1


def _ts(t: datetime) -> str:
    # Milliseconds: whole seconds would truncate, and a node could appear up to 1 s early.
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def plan(
    pool: str,
    replicas: int,
    delay: float,
    existing: set[str],
    provisioning: list[dict[str, str]],
    now: datetime,
) -> Plan:
    """Decide what to create, delete and keep waiting for. Pure: the time is an argument."""
    wanted = {node_name(pool, i) for i in range(replicas)}
    pending = {p["name"]: p["readyAt"] for p in provisioning if p["name"] in wanted and p["name"] not in existing}
    for name in sorted(wanted - existing - set(pending)):
        pending[name] = _ts(now + timedelta(seconds=delay))
    due = sorted(n for n, at in pending.items() if datetime.fromisoformat(at) <= now)
    surplus = sorted(existing - wanted, key=lambda n: _index(pool, n), reverse=True)
    still = [{"name": n, "readyAt": pending[n]} for n in sorted(pending, key=lambda n: _index(pool, n))]
    return Plan(create=due, delete=surplus, provisioning=[p for p in still if p["name"] not in due])


def node_manifest(pool: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pool["spec"]
    resources = {
        "cpu": str(spec.get("cpuPerNode", "32")),
        "memory": str(spec.get("memoryPerNode", "256Gi")),
        "pods": str(spec.get("podsPerNode", 110)),
        GPU: str(spec.get("gpusPerNode", 8)),
    }
    labels = {
        **spec.get("labels", {}),
        "type": "kwok",
        POOL_LABEL: pool["metadata"]["name"],
        f"{GPU}.product": spec["gpuType"],
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }
    owner = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KwokNodePool",
        "name": pool["metadata"]["name"],
        "uid": pool["metadata"]["uid"],
        "controller": True,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            # kwok's mark of a fake Node: a kwok started with a node selector manages only these.
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "ownerReferences": [owner],
        },
        "spec": {"taints": [{"key": GPU, "value": "present", "effect": "NoSchedule"}]},
        "status": {"capacity": resources, "allocatable": resources},
    }


def _ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status and node.status.conditions) or [])


class PoolController:
    def __init__(self, api: client.ApiClient) -> None:
        # Any: the generated client types every model field Optional and wants models, not the
        # plain dicts used here; the apiserver validates what matters.
        self.core: Any = client.CoreV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)

    def reconcile_all(self, now: datetime) -> None:
        pools = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        nodes = self.core.list_node(label_selector=POOL_LABEL).items
        for pool in pools:
            name = pool["metadata"]["name"]
            try:
                self.reconcile(pool, [n for n in nodes if n.metadata.labels[POOL_LABEL] == name], now)
            except ApiException as e:
                log.warning("pool %s: %s %s", name, e.status, e.reason)

    def reconcile(self, pool: dict[str, Any], nodes: list[Any], now: datetime) -> None:
        name, spec, status = pool["metadata"]["name"], pool["spec"], pool.get("status") or {}
        existing = {n.metadata.name: n for n in nodes}
        finalizers = pool["metadata"].get("finalizers") or []
        if pool["metadata"].get("deletionTimestamp"):
            for node in sorted(existing, key=lambda n: _index(name, n), reverse=True):
                log.info("pool %s deleted: draining and deleting node %s", name, node)
                self._drain_and_delete(node)
            self._set_finalizers(name, [f for f in finalizers if f != FINALIZER])
            return
        if FINALIZER not in finalizers:
            self._set_finalizers(name, [*finalizers, FINALIZER])
        p = plan(
            name,
            int(spec.get("replicas", 0)),
            float(spec.get("provisioningDelaySeconds", 20)),
            set(existing),
            status.get("provisioning") or [],
            now,
        )
        for node in p.create:
            log.info("pool %s: node %s provisioned", name, node)
            self.core.create_node(node_manifest(pool, node))
        for node in p.delete:
            log.info("pool %s: draining and deleting node %s", name, node)
            self._drain_and_delete(node)
        kept = [n for n in existing.values() if n.metadata.name not in p.delete]
        new_status = {
            "observedGeneration": pool["metadata"].get("generation"),
            "replicas": len(kept) + len(p.create),
            # Nodes created this round are not Ready until kwok has seen them.
            "readyNodes": sum(_ready(n) for n in kept),
            "selector": f"{POOL_LABEL}={name}",
            "provisioning": p.provisioning,
        }
        if any(status.get(k) != v for k, v in new_status.items()):
            self.custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, name, {"status": new_status})

    def _set_finalizers(self, pool: str, finalizers: list[str]) -> None:
        self.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, pool, {"metadata": {"finalizers": finalizers}})

    def _drain_and_delete(self, node: str) -> None:
        self.core.patch_node(node, {"spec": {"unschedulable": True}})
        for pod in self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items:
            try:
                self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
            except ApiException as e:
                if e.status != 404:
                    raise
        try:
            self.core.delete_node(node)
        except ApiException as e:
            if e.status != 404:
                raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modelbudget.testbed.poolcontroller", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reconcile passes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api = config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    controller = PoolController(api)
    log.info("reconciling %s.%s every %.1fs", PLURAL, GROUP, args.interval)
    while True:
        try:
            controller.reconcile_all(datetime.now(UTC))
        except (ApiException, HTTPError) as e:
            # The apiserver may be restarting or the CRD not installed yet: try again next pass.
            log.warning("reconcile pass failed: %s", e)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
