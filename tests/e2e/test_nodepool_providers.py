"""The node pool engines' real schemas on the testbed, and what a tenant's ModelBudget may touch.

``hack/testbed.sh up`` installs the real CRDs (hack/crds.sh: Karpenter's NodePool, Cluster API's
MachineDeployment), so the objects here pass the same OpenAPI and CEL validation as in a real
cluster, and the real adapter (``KubeNodePools``) resizes them at the version the apiserver
prefers. Then the operator itself (``modelbudget run``) is given ModelBudgets that name what
their namespace does not own (issue 12): a MachineDeployment in ``kube-system``, someone else's
ConfigMap. Everything is read back with kubectl.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import LOGS, free_port, start_modelbudget, stop_process, unique, wait_for

from modelbudget.adapters.errors import NotFound
from modelbudget.adapters.kube import KubeClients
from modelbudget.adapters.nodepools import KubeNodePools
from modelbudget.api.spec import NodePool

pytestmark = pytest.mark.e2e

CAPI_V1BETA2 = "cluster.x-k8s.io/v1beta2"
GPUS_PER_NODE = 4


class Cluster:
    """kubectl on the testbed, with JSON in and out."""

    def __init__(self, testbed: Any) -> None:
        self.testbed = testbed

    def apply(self, manifest: dict[str, Any]) -> None:
        # Server-side: the creation is an Apply, so every Update in managedFields is the adapter's.
        self.testbed.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(manifest))

    def get(self, resource: str, name: str, namespace: str | None = None, *flags: str) -> dict[str, Any]:
        where = ["-n", namespace] if namespace else []
        out = self.testbed.kubectl("get", resource, name, *where, "-o", "json", *flags).stdout
        return dict(json.loads(out))

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        out = self.testbed.kubectl(
            "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
        return list(json.loads(out)["items"])

    def delete(self, *args: str) -> None:
        self.testbed.kubectl("delete", "--ignore-not-found", "--wait=false", *args)


@pytest.fixture(scope="module")
def cluster(testbed: Any) -> Cluster:
    return Cluster(testbed)


@pytest.fixture(scope="module")
def adapter(testbed: Any) -> KubeNodePools:
    return KubeNodePools(KubeClients.connect(testbed.kubeconfig))


def pool(provider: dict[str, Any], max_nodes: int = 6) -> NodePool:
    return NodePool.model_validate(
        {
            "name": provider["name"],
            "gpuType": "nvidia-h100-80gb",
            "pricePerGpuHour": 4.0,
            "gpusPerNode": GPUS_PER_NODE,
            "maxNodes": max_nodes,
            "tokensPerSecondPerReplica": 1000,
            "providerRef": provider,
        }
    )


def karpenter_node_pool(name: str, **spec: Any) -> dict[str, Any]:
    """A NodePool as Karpenter's docs write one; the node class it names need not exist."""
    template = {
        "spec": {
            "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "gpu"},
            "requirements": [{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]}],
        }
    }
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": {"name": name},
        "spec": {"template": template, **spec},
    }


def machine_deployment(name: str, namespace: str, replicas: int) -> dict[str, Any]:
    """A v1beta2 MachineDeployment with every field the schema requires; no Cluster API
    controllers run on the testbed, so the Cluster and templates it names need not exist."""
    labels = {"cluster.x-k8s.io/deployment-name": name}
    return {
        "apiVersion": CAPI_V1BETA2,
        "kind": "MachineDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterName": "gpu-cluster",
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "clusterName": "gpu-cluster",
                    "bootstrap": {"dataSecretName": f"{name}-bootstrap"},
                    "infrastructureRef": {
                        "apiGroup": "infrastructure.cluster.x-k8s.io",
                        "kind": "DockerMachineTemplate",
                        "name": name,
                    },
                },
            },
        },
    }


def written_at(obj: dict[str, Any], field: str) -> list[str]:
    """The API versions of the updates (not the creation) whose managed fields include ``field``."""
    return [
        m["apiVersion"]
        for m in obj["metadata"].get("managedFields", [])
        if m["operation"] == "Update" and field in json.dumps(m.get("fieldsV1", {}))
    ]


# --- the real adapter on the real schemas ------------------------------------------------------


def test_a_karpenter_node_pool_is_resized_by_its_gpu_limit(cluster: Cluster, adapter: KubeNodePools) -> None:
    name = unique("gpu")
    cluster.apply(karpenter_node_pool(name, limits={"cpu": "1000", "nvidia.com/gpu": "8"}))
    try:
        ref = pool({"kind": "NodePool", "name": name})
        assert adapter.sized_to(ref, "default") == 2
        adapter.resize(ref, "default", 5)
        spec = cluster.get("nodepools.karpenter.sh", name)["spec"]
        assert spec["limits"] == {"cpu": "1000", "nvidia.com/gpu": "20"}  # 5 nodes x 4 GPUs; cpu untouched
        assert "replicas" not in spec
        assert adapter.sized_to(ref, "default") == 5
    finally:
        cluster.delete("nodepools.karpenter.sh", name)


def test_a_static_karpenter_node_pool_is_resized_by_its_replicas(cluster: Cluster, adapter: KubeNodePools) -> None:
    name = unique("static")
    cluster.apply(karpenter_node_pool(name, replicas=2, limits={"nodes": "10"}))
    try:
        # Karpenter's CEL rule, enforced by this apiserver: a static NodePool takes no GPU limit.
        refused = cluster.testbed.kubectl(
            "patch", "nodepools.karpenter.sh", name, "--type", "merge",
            "-p", '{"spec": {"limits": {"nvidia.com/gpu": "8"}}}', check=False,
        )  # fmt: skip
        assert refused.returncode != 0 and "only 'limits.nodes' is supported on static NodePools" in refused.stderr
        ref = pool({"kind": "NodePool", "name": name})
        assert adapter.sized_to(ref, "default") == 2
        adapter.resize(ref, "default", 4)
        spec = cluster.get("nodepools.karpenter.sh", name)["spec"]
        assert spec["replicas"] == 4 and spec["limits"] == {"nodes": "10"}
    finally:
        cluster.delete("nodepools.karpenter.sh", name)


def test_a_machine_deployment_is_resized_at_v1beta2(cluster: Cluster, adapter: KubeNodePools, namespace: str) -> None:
    crd = cluster.get("crd", "machinedeployments.cluster.x-k8s.io")
    storage = [v["name"] for v in crd["spec"]["versions"] if v["storage"]]
    deprecated = [v["name"] for v in crd["spec"]["versions"] if v.get("deprecated")]
    assert (storage, deprecated) == (["v1beta2"], ["v1beta1"])
    cluster.apply(machine_deployment("gpus", namespace, replicas=2))
    ref = pool({"kind": "MachineDeployment", "name": "gpus"})
    assert adapter.sized_to(ref, namespace) == 2
    adapter.resize(ref, namespace, 3)
    md = cluster.get("machinedeployments.v1beta2.cluster.x-k8s.io", "gpus", namespace, "--show-managed-fields")
    assert md["spec"]["replicas"] == 3
    assert md["spec"]["template"]["spec"]["bootstrap"] == {"dataSecretName": "gpus-bootstrap"}  # the rest untouched
    # The adapter wrote through the version discovery preferred, not the deprecated one.
    assert written_at(md, "f:replicas") == [CAPI_V1BETA2]


def test_a_missing_provider_object_is_not_found_and_nothing_is_created(
    cluster: Cluster, adapter: KubeNodePools, namespace: str
) -> None:
    missing = pool({"kind": "MachineDeployment", "name": "absent"})
    with pytest.raises(NotFound, match=f"MachineDeployment {namespace}/absent: HTTP 404"):
        adapter.sized_to(missing, namespace)
    with pytest.raises(NotFound):
        adapter.resize(missing, namespace, 2)
    with pytest.raises(NotFound, match="NodePool absent: HTTP 404"):
        adapter.resize(pool({"kind": "NodePool", "name": "absent"}), namespace, 2)
    listed = cluster.testbed.kubectl("get", "machinedeployments.cluster.x-k8s.io", "-n", namespace, "-o", "name")
    assert listed.stdout.strip() == ""


# --- what a tenant's ModelBudget may make the operator touch -----------------------------------


class TenantOperator:
    """``modelbudget run`` for one namespace, with its /metrics endpoint."""

    def __init__(self, kubeconfig: str, namespace: str) -> None:
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        self.log = LOGS / f"e2e-operator-{namespace}.log"
        args = ["run", "--kubeconfig", kubeconfig, "-n", namespace, "--interval", "2"]
        args += ["--no-leader-election", "--metrics-addr", self.metrics_addr, "--inline-cluster-pools=allow"]
        args += ["--liveness", f"http://127.0.0.1:{free_port()}/healthz"]
        self.proc = start_modelbudget(args, self.log)

    def metric(self, series: str) -> float:
        """One series of the operator's /metrics, e.g. ``modelbudget_reconcile_duration_seconds_count``."""
        assert self.proc.poll() is None, f"the operator exited, see {self.log}"
        try:
            with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def errors(self, reason: str) -> float:
        """How many reconciles so far hit ``reason``."""
        return self.metric(f'modelbudget_reconcile_errors_total{{reason="{reason}"}}')

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def tenant(
    cluster: Cluster, namespace: str, modelbudget_crd: None
) -> Iterator[tuple[str, Callable[[], TenantOperator]]]:
    """The tenant's namespace (the ModelBudget CRD installed); ``start()`` runs an operator on it.
    ModelBudgets are released from the operator's finalizer once it has stopped."""
    started: list[TenantOperator] = []

    def start() -> TenantOperator:
        started.append(TenantOperator(cluster.testbed.kubeconfig, namespace))
        return started[-1]

    yield namespace, start
    for op in started:
        op.stop()
    names = cluster.testbed.kubectl("get", "modelbudgets", "-n", namespace, "-o", "name").stdout.split()
    for name in names:
        cluster.testbed.kubectl(
            "patch", name, "-n", namespace, "--type", "merge", "-p", '{"metadata": {"finalizers": null}}'
        )


def deployment(name: str) -> dict[str, Any]:
    """The serving Deployment a ModelBudget targets (its pods need not run here)."""
    labels = {"app": name}
    container = {"name": "server", "image": "fake.invalid/vllm:latest"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def model_budget(name: str, provider: dict[str, Any] | None, **spec: Any) -> dict[str, Any]:
    """Issue 12's tenant: maxNodes 1, and a Prometheus that does not answer (a closed port)."""
    node_pool: dict[str, Any] = {
        "name": "p",
        "gpuType": "nvidia-h100-80gb",
        "pricePerGpuHour": 4.0,
        "gpusPerNode": GPUS_PER_NODE,
        "maxNodes": 1,
        "tokensPerSecondPerReplica": 1000,
    }
    if provider is not None:
        node_pool["providerRef"] = provider
    body = {
        "targetRef": {"name": name},
        "curve": {"intercept": 0.1, "slope": 0.08, "minTokens": 64, "maxTokens": 4096},
        "budget": {"ceiling": {"amount": 100, "period": "Hour"}, "valuePerPoint": 0.01},
        "replicas": {"min": 1, "max": 4},
        "nodePools": [node_pool],
        "metrics": {"prometheusUrl": f"http://127.0.0.1:{free_port()}", "timeoutSeconds": 1},
        **spec,
    }
    return {"apiVersion": "modelbudget.dev/v1alpha1", "kind": "ModelBudget", "metadata": {"name": name}, "spec": body}


def condition(cluster: Cluster, namespace: str, name: str, kind: str) -> dict[str, Any]:
    status = cluster.get("modelbudgets.modelbudget.dev", name, namespace).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def test_a_machine_deployment_in_another_namespace_is_never_patched(
    cluster: Cluster, tenant: tuple[str, Callable[[], TenantOperator]]
) -> None:
    """Issue 12's reproduction: t1's ModelBudget names kube-system's MachineDeployment (7 replicas)
    with maxNodes 1. A control ModelBudget next to it names one in its own namespace: that one
    the operator does resize, 7 -> 1, so the refusal is the check at work."""
    ns, start = tenant
    foreign = unique("prod-gpus")
    cluster.apply(machine_deployment(foreign, "kube-system", replicas=7))
    try:
        cluster.apply(machine_deployment("own-gpus", ns, replicas=7))
        before = cluster.get("machinedeployments.cluster.x-k8s.io", foreign, "kube-system")
        for name in ("llm", "control"):
            cluster.testbed.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(deployment(name)))
        cross = {"kind": "MachineDeployment", "name": foreign, "namespace": "kube-system"}
        cluster.testbed.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(model_budget("llm", cross)))
        own = {"kind": "MachineDeployment", "name": "own-gpus"}
        cluster.testbed.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(model_budget("control", own)))
        operator = start()

        wait_for(
            lambda: cluster.get("machinedeployments.cluster.x-k8s.io", "own-gpus", ns)["spec"]["replicas"] == 1,
            60,
            "the control's own MachineDeployment resized 7 -> 1",
        )
        # Counted whatever each reconcile decides: both ModelBudgets have had several ticks.
        wait_for(lambda: operator.metric("modelbudget_reconcile_duration_seconds_count") >= 10, 60, "ten reconciles")
        after = cluster.get("machinedeployments.cluster.x-k8s.io", foreign, "kube-system")
        assert after["spec"]["replicas"] == 7
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # zero writes
        assert operator.errors("PoolNotAllowed") >= 3  # refused on every tick, not skipped

        for kind in ("Ready", "Degraded"):
            assert condition(cluster, ns, "llm", kind)["reason"] == "PoolNotAllowed"
        assert f"kube-system/{foreign}" in condition(cluster, ns, "llm", "Degraded")["message"]
        events = [e for e in cluster.events(ns, "llm") if e["reason"] == "PoolNotAllowed"]
        assert len(events) == 1 and events[0]["type"] == "Warning"
        assert f"kube-system/{foreign}" in events[0]["message"]
        # Nothing else was done for the refused ModelBudget either.
        assert cluster.get("deployment", "llm", ns)["spec"]["replicas"] == 1
        missing = cluster.testbed.kubectl("get", "configmap", "llm-token-limit", "-n", ns, check=False)
        assert "NotFound" in missing.stderr
    finally:
        cluster.delete("machinedeployments.cluster.x-k8s.io", foreign, "-n", "kube-system")


def test_someone_elses_configmap_is_left_unchanged_and_the_status_says_why(
    cluster: Cluster, tenant: tuple[str, Callable[[], TenantOperator]]
) -> None:
    ns, start = tenant
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config"}}
    theirs["data"] = {"owner": "team-b", "feature-flags": "on"}
    cluster.testbed.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(theirs))
    before = cluster.get("configmap", "app-config", ns)
    cluster.testbed.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(deployment("llm")))
    publish = {"publish": {"configMap": {"name": "app-config"}, "podTemplateAnnotation": True}}
    body = model_budget("llm", None, tokenLimits=publish)
    cluster.testbed.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(body))
    operator = start()

    degraded = wait_for(
        lambda: (c := condition(cluster, ns, "llm", "Degraded")).get("reason") == "ActuationFailed" and c,
        60,
        "Degraded=ActuationFailed",
    )
    wait_for(lambda: operator.errors("ActuationFailed") >= 3, 60, "three refused publishes")
    assert f"ConfigMap {ns}/app-config exists and is not managed by modelbudget" in degraded["message"]
    assert "label it app.kubernetes.io/managed-by=modelbudget" in degraded["message"]
    events = [e for e in cluster.events(ns, "llm") if e["reason"] == "ActuationFailed"]
    assert events and events[0]["type"] == "Warning" and "not managed by modelbudget" in events[0]["message"]

    after = cluster.get("configmap", "app-config", ns)
    assert after["data"] == theirs["data"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # The pod-template annotation goes out only with a ConfigMap the operator may write.
    annotations = cluster.get("deployment", "llm", ns)["spec"]["template"]["metadata"].get("annotations") or {}
    assert "modelbudget.dev/max-tokens" not in annotations

    # Labelled by its owner, the ConfigMap is the operator's to write: the limit is published.
    cluster.testbed.kubectl("label", "configmap", "app-config", "-n", ns, "app.kubernetes.io/managed-by=modelbudget")
    published = wait_for(
        lambda: cluster.get("configmap", "app-config", ns)["data"].get("max_tokens"), 60, "the limit published"
    )
    assert int(published) >= 64
    assert cluster.get("configmap", "app-config", ns)["data"]["owner"] == "team-b"  # their keys are kept
