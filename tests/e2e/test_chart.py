"""The Helm chart against the local cluster: server-side validation, install, RBAC, uninstall.

The operator image cannot run here (no container runtime), so the chart is installed with
``replicaCount=0`` and the operator runs as a local process with the chart ServiceAccount's
token: whatever it manages to do, the chart's RBAC allows; whatever it needs and is refused
shows up as a 403 in its log or its status.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from support import (
    CHART,
    MB,
    POOLS,
    free_port,
    gpu_deployment,
    start_modelbudget,
    stop_process,
    token_kubeconfig,
    wait_for,
)

pytestmark = pytest.mark.e2e

CRD_NAME = "modelbudgets.modelbudget.dev"
CRD_NAMES = (CRD_NAME, "gpupools.modelbudget.dev")
# kopf scans namespaces and CRDs to follow them at run time unless settings.scanning.disabled;
# without list on those (not granted: the operator does not need them) it retries, warns and
# carries on. These refusals are expected; any other is a permission the chart lacks.
TIMESTAMP = re.compile(r"^\[[^\]]*\]")  # a log line's "[2026-11-23 22:27:13,403]"
KOPF_SCANNING = (
    "GET https://127.0.0.1:16443/apis/apiextensions.k8s.io/v1/customresourcedefinitions ->",
    "/api/v1/namespaces ->",
    "Not enough permissions to",
)


def _server_dry_run(testbed: Any, manifests: str) -> subprocess.CompletedProcess[str]:
    return testbed.kubectl("apply", "--dry-run=server", "-f", "-", stdin=manifests, check=False)


@pytest.mark.parametrize(
    "sets",
    [
        pytest.param((), id="default"),
        pytest.param(("watchNamespaces={NS}", "replicaCount=2", "podDisruptionBudget.enabled=true"), id="ha"),
        pytest.param(("dashboard.enabled=true", "rbac.nodePoolProviders.kwok=true"), id="dashboard"),
    ],
)
def test_rendered_manifests_pass_server_side_validation(
    helm: Callable[..., subprocess.CompletedProcess[str]], testbed: Any, namespace: str, sets: tuple[str, ...]
) -> None:
    # The ServiceMonitor needs prometheus-operator's CRD, which the testbed does not have; the
    # unit tier checks its shape.
    args = ["template", f"dry-{secrets.token_hex(3)}", str(CHART), "-n", namespace]
    for s in sets:
        args += ["--set", s.replace("{NS}", "{" + namespace + "}")]
    out = _server_dry_run(testbed, helm(*args).stdout)
    assert out.returncode == 0, out.stderr
    assert "(server dry run)" in out.stdout


def let_release_adopt_the_crd(testbed: Any, release: str, namespace: str) -> None:
    """Let this release take over the CRDs other tests may have applied with kubectl.

    Helm adopts an existing object only when it carries the release's ownership metadata; the
    CRDs stay (resource-policy keep) when the release goes, so nothing else loses them.
    """
    for crd in CRD_NAMES:
        if testbed.kubectl("get", "crd", crd, check=False).returncode != 0:
            continue  # the release creates it
        testbed.kubectl("label", "crd", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        testbed.kubectl(
            "annotate",
            "crd",
            crd,
            f"meta.helm.sh/release-name={release}",
            f"meta.helm.sh/release-namespace={namespace}",
            "--overwrite",
        )


def _budget(name: str, pool: str, prometheus_url: str) -> dict[str, Any]:
    # Every permission gets exercised: the Prometheus token is read from a Secret; metrics of a
    # model server that is not running are missing, so the fallback scales the Deployment and
    # the node pool down at once (no stabilisation) and the token limit is published to a
    # ConfigMap and the pod template.
    return {
        "apiVersion": "/".join(MB),
        "kind": "ModelBudget",
        "metadata": {"name": name},
        "spec": {
            "targetRef": {"name": name},
            "curve": {"intercept": 0.1, "slope": 0.08, "minTokens": 128, "maxTokens": 4096},
            "budget": {"ceiling": {"amount": 50, "period": "Hour"}, "valuePerPoint": 0.01},
            "replicas": {"min": 0, "max": 4},
            "nodePools": [
                {
                    "name": pool,
                    "gpuType": "nvidia-l4",
                    "pricePerGpuHour": 1.0,
                    "gpusPerNode": 2,
                    "minNodes": 0,
                    "maxNodes": 3,
                    "tokensPerSecondPerReplica": 500,
                    "providerRef": {"kind": "KwokNodePool", "name": pool},
                }
            ],
            "tokenLimits": {"publish": {"podTemplateAnnotation": True}},
            "metrics": {
                "prometheusUrl": prometheus_url,
                "auth": {"bearerTokenSecretRef": {"name": "prometheus-token", "key": "token"}},
            },
            "behavior": {
                "fallback": {"afterSeconds": 0, "action": "ScaleTo", "replicas": 0},
                "scaleDown": {"stabilizationWindowSeconds": 0},
                "nodeScaleDown": {"stabilizationWindowSeconds": 0},
            },
        },
    }


@pytest.fixture
def operator_process(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"operator-{len(procs)}.log"
        proc = start_modelbudget(["run", *args], log)
        procs.append((proc, log))
        return proc

    yield start
    for proc, log in procs:
        stop_process(proc, grace=20)
        sys.stderr.write(f"--- {log.name} (last lines) ---\n" + "\n".join(log.read_text().splitlines()[-40:]) + "\n")


@pytest.mark.parametrize("watch", ["all-namespaces", "watch-namespaces"])
def test_install_rbac_is_enough_and_no_wider_then_uninstall_keeps_the_crd(
    helm: Callable[..., subprocess.CompletedProcess[str]],
    testbed: Any,
    api_client: client.ApiClient,
    namespace: str,
    node_pool: Callable[..., str],
    operator_process: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    watch: str,
) -> None:
    release = f"mbchart-{secrets.token_hex(3)}"
    fullname = f"{release}-modelbudget-operator"
    sets = ["replicaCount=0", "rbac.nodePoolProviders.kwok=true"]
    if watch == "watch-namespaces":
        sets.append(f"watchNamespaces={{{namespace}}}")
    let_release_adopt_the_crd(testbed, release, namespace)
    helm("install", release, str(CHART), "-n", namespace, *(a for s in sets for a in ("--set", s)))
    testbed.kubectl("wait", "--for", "condition=Established", "--timeout", "60s", *[f"crd/{c}" for c in CRD_NAMES])

    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    pool = node_pool(replicas=1, gpus_per_node=2, delay=1)
    apps.create_namespaced_deployment(namespace, gpu_deployment("llm", pool, 1))
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "prometheus-token"}, "stringData": {"token": "not-checked-by-the-testbed"}}
    )
    custom.create_namespaced_custom_object(*MB, namespace, "modelbudgets", _budget("llm", pool, testbed.prometheus_url))
    sa_kubeconfig = token_kubeconfig(testbed.kubeconfig, namespace, fullname, testbed, tmp_path / "sa.kubeconfig")

    # The chart's flags (templates/deployment.yaml) on local ports, quicker ticks for the test.
    flags = {
        "--kubeconfig": sa_kubeconfig,
        "--namespace": namespace,
        "--interval": "2",
        "--status-heartbeat": "5",
        "--lease-namespace": namespace,
        "--lease-name": fullname,
        "--lease-duration": "6",
        "--identity": "chart-e2e",
        "--metrics-addr": f"127.0.0.1:{free_port()}",
        "--liveness": f"http://127.0.0.1:{free_port()}/healthz",
        "--inline-cluster-pools": "allow",  # as tenancy.inlineClusterPools=true renders: one tenant here
    }
    operator = operator_process(*(arg for flag in flags.items() for arg in flag))
    try:

        def status() -> dict[str, Any]:
            return custom.get_namespaced_custom_object(*MB, namespace, "modelbudgets", "llm").get("status") or {}

        def conditions() -> dict[str, dict[str, Any]]:
            return {c["type"]: c for c in status().get("conditions", [])}

        # Reconciled: status written through modelbudgets/status, with every condition.
        conds = wait_for(lambda: len(conditions()) >= 5 and conditions(), 60, "status conditions")
        # The Secret was readable (a 403 would read "credentials: Secret ...: HTTP 403").
        assert "403" not in conds["MetricsAvailable"]["message"], conds["MetricsAvailable"]
        assert conds["MetricsAvailable"]["reason"] == "MetricsMissing", conds["MetricsAvailable"]
        # Acted: /scale patched, the pool resized, the token limit published both ways.
        wait_for(
            # A zero is omitted from the answer: replicas comes back as None.
            lambda: not apps.read_namespaced_deployment_scale("llm", namespace).spec.replicas,
            60,
            "the fallback to scale the Deployment to 0",
        )
        wait_for(
            lambda: custom.get_cluster_custom_object(*POOLS, pool)["spec"]["replicas"] == 0,
            60,
            "the pool resized to 0",
        )
        limit = core.read_namespaced_config_map("llm-token-limit", namespace).data["max_tokens"]
        template = apps.read_namespaced_deployment("llm", namespace).spec.template.metadata.annotations or {}
        assert template.get("modelbudget.dev/max-tokens") == limit
        # Events posted, the leader Lease held under the chart's name.
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=llm").items
        assert any(e.reason == "MetricsUnavailable" for e in events), [e.reason for e in events]
        lease = client.CoordinationV1Api(api_client).read_namespaced_lease(fullname, namespace)
        assert lease.spec.holder_identity == "chart-e2e"
        # Every actuation went through (a refused one would make Degraded read ActuationFailed).
        assert conditions()["Degraded"]["reason"] == "MetricsFallback", conditions()["Degraded"]

        # No wider than needed: the same token is refused what the operator never does.
        sa = config.new_client_from_config(config_file=sa_kubeconfig)
        refused: list[tuple[str, Callable[[], Any]]] = [
            ("list Secrets cluster-wide", lambda: client.CoreV1Api(sa).list_secret_for_all_namespaces()),
            ("list Secrets in the namespace", lambda: client.CoreV1Api(sa).list_namespaced_secret(namespace)),
            ("delete a Secret", lambda: client.CoreV1Api(sa).delete_namespaced_secret("prometheus-token", namespace)),
            (
                "delete a ModelBudget",
                lambda: client.CustomObjectsApi(sa).delete_namespaced_custom_object(
                    *MB, namespace, "modelbudgets", "llm"
                ),
            ),
            ("delete the Deployment", lambda: client.AppsV1Api(sa).delete_namespaced_deployment("llm", namespace)),
            (
                "create a Pod",
                lambda: client.CoreV1Api(sa).create_namespaced_pod(
                    namespace, {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}}
                ),
            ),
            ("delete a node pool", lambda: client.CustomObjectsApi(sa).delete_cluster_custom_object(*POOLS, pool)),
            ("read another Lease", lambda: client.CoordinationV1Api(sa).read_namespaced_lease("other", namespace)),
            ("delete the CRD", lambda: client.ApiextensionsV1Api(sa).delete_custom_resource_definition(CRD_NAME)),
        ]
        if watch == "watch-namespaces":
            refused.append(
                (
                    "list ModelBudgets cluster-wide",
                    lambda: client.CustomObjectsApi(sa).list_cluster_custom_object(*MB, "modelbudgets"),
                )
            )
        allowed = []
        for what, call in refused:
            try:
                call()
                allowed.append(what)
            except ApiException as exc:
                assert exc.status == 403, f"{what}: HTTP {exc.status}"
        assert not allowed, f"the chart's ServiceAccount may {allowed}"
    finally:
        # Stopped before the uninstall, which revokes its token.
        operator.terminate()
        operator.wait(timeout=20)
    # Past the timestamp, whose milliseconds may read 403 too.
    said = (TIMESTAMP.sub("", line) for log in tmp_path.glob("operator-*.log") for line in log.read_text().splitlines())
    forbidden = [
        line for line in said if ("403" in line or "Forbidden" in line) and not any(w in line for w in KOPF_SCANNING)
    ]
    assert not forbidden, "the operator was refused:\n" + "\n".join(forbidden[:10])

    # Uninstall keeps the CRD and the ModelBudgets (and so their spend ledgers).
    helm("uninstall", release, "-n", namespace)
    assert testbed.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0
    mb = custom.get_namespaced_custom_object(*MB, namespace, "modelbudgets", "llm")
    assert mb["status"]["controllerState"]["ledger"]["spent"] >= 0
    # Without the release nothing remains that could act or be granted anything.
    rbac = client.RbacAuthorizationV1Api(api_client)
    assert not [r for r in rbac.list_cluster_role().items if r.metadata.name.startswith(fullname)]
    # Nothing may keep holding the ModelBudget (the finalizer) once no operator runs, or the
    # namespace would never finish deleting.
    with contextlib.suppress(ApiException):
        custom.patch_namespaced_custom_object(*MB, namespace, "modelbudgets", "llm", {"metadata": {"finalizers": None}})
