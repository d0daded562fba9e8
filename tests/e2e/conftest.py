"""Fixtures of the e2e tier: one local testbed (hack/testbed.sh) for the whole session.

The session brings the testbed up once (``hack/testbed.sh up`` is idempotent, so an already
running one is reused) and tears it down at the end only if this session started it and
``MB_KEEP_TESTBED`` is not ``1``. Without the binaries from hack/build-binaries.sh the tier
is skipped, except under CI (env ``CI`` set), where that is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelbudget-operator"
TESTBED = REPO / "hack" / "testbed.sh"
POOLS = ("testbed.modelbudget.dev", "v1alpha1", "kwoknodepools")
T = TypeVar("T")


def _wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


@dataclass(frozen=True)
class Testbed:
    kubeconfig: str
    prometheus_url: str
    targets_dir: str  # Prometheus file discovery: one JSON file per extra scrape target
    path: str  # PATH with the testbed's kubectl first

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
            env={**os.environ, "PATH": self.path},
            timeout=120,
        )

    def promql(self, query: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]


def _missing_binaries() -> list[str]:
    dirs = subprocess.run(
        ["bash", "-c", f"source {REPO}/hack/versions.sh; k8s_bin; etcd_bin; kwok_bin"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    wanted = [f"{dirs[0]}/{b}" for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")] + [
        f"{dirs[1]}/etcd",
        f"{dirs[2]}/kwok",
        f"{dirs[2]}/kwokctl",
    ]
    return [b for b in wanted if not os.access(b, os.X_OK)]


def _testbed(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TESTBED), command], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    missing = _missing_binaries()
    if missing:
        reason = f"testbed binaries missing ({', '.join(missing)}): run hack/build-binaries.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    already_up = "apiserver: ready" in _testbed("status").stdout
    up = _testbed("up")
    if up.returncode != 0:
        pytest.fail(f"hack/testbed.sh up failed:\n{up.stdout}\n{up.stderr}")
    sys.stderr.write(up.stdout)
    env = dict(re.findall(r"^export (\w+)=(.*)$", _testbed("env").stdout, re.M))
    yield Testbed(
        kubeconfig=env["KUBECONFIG"],
        prometheus_url=env["PROMETHEUS_URL"],
        targets_dir=env["MB_PROMETHEUS_TARGETS"],
        path=env["PATH"].replace("$PATH", os.environ.get("PATH", "")),
    )
    if not already_up and os.environ.get("MB_KEEP_TESTBED") != "1":
        _testbed("down")


@pytest.fixture(scope="session")
def api_client(testbed: Testbed) -> client.ApiClient:
    return config.new_client_from_config(config_file=testbed.kubeconfig)


@pytest.fixture(scope="session")
def prometheus_url(testbed: Testbed) -> str:
    return testbed.prometheus_url


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(api_client: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted (without waiting) afterwards."""
    core = client.CoreV1Api(api_client)
    name = _unique("e2e-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-"))
    core.create_namespace({"metadata": {"name": name}})
    # Pods need the default ServiceAccount, which kube-controller-manager adds a moment later.
    _wait_for(lambda: _exists(lambda: core.read_namespaced_service_account("default", name)), 30, "default SA")
    yield name
    core.delete_namespace(name)


def _exists(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


@pytest.fixture
def node_pool(api_client: client.ApiClient) -> Iterator[Callable[..., str]]:
    """Factory: ``node_pool(replicas=1, gpus_per_node=2, delay=3)`` creates a KwokNodePool.

    Returns its name (also the ``modelbudget.dev/pool`` label of its nodes). Pools are deleted
    afterwards; their Nodes go with them through garbage collection (owner references).
    """
    custom = client.CustomObjectsApi(api_client)
    created: list[str] = []

    def make(replicas: int = 1, gpus_per_node: int = 2, delay: int = 3, gpu_type: str = "nvidia-l4") -> str:
        name = _unique("pool")
        spec = {"replicas": replicas, "gpusPerNode": gpus_per_node, "gpuType": gpu_type}
        spec["provisioningDelaySeconds"] = delay
        body = {
            "apiVersion": "/".join(POOLS[:2]),
            "kind": "KwokNodePool",
            "metadata": {"name": name},
            "spec": spec,
        }
        custom.create_cluster_custom_object(*POOLS, body)
        created.append(name)
        return name

    yield make
    for name in created:
        if _exists(lambda n=name: custom.get_cluster_custom_object(*POOLS, n)):
            custom.delete_cluster_custom_object(*POOLS, name)


def _gpu_deployment(name: str, pool: str, replicas: int, gpus: int = 1, startup_delay: str = "") -> dict[str, Any]:
    """A Deployment of fake GPU pods pinned to one pool's nodes, tolerating the GPU taint.

    ``startup_delay`` (a Go duration, "45s") keeps each pod Pending that long after it is bound,
    like a model loading (hack/manifests/kwok-stages.yaml).
    """
    labels = {"app": name}
    annotations = {"testbed.modelbudget.dev/startup-delay": startup_delay} if startup_delay else {}
    container = {"name": "server", "image": "fake.invalid/vllm:latest"}
    container["resources"] = {
        "requests": {"nvidia.com/gpu": str(gpus)},
        "limits": {"nvidia.com/gpu": str(gpus)},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    "nodeSelector": {"modelbudget.dev/pool": pool},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [container],
                },
            },
        },
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def model_server(testbed: Testbed) -> Iterator[Callable[..., str]]:
    """Factory: start a synthetic model server that Prometheus scrapes.

    ``model_server(namespace, deployment, *extra_args)`` returns its base URL once it answers.
    Each server gets a free port and registers it in Prometheus' file-based discovery, so
    several can run at once, also from concurrent test sessions sharing one testbed (the
    fixed $MB_MODELSERVER_ADDR is left to demos). Stopped and unregistered afterwards.
    """
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(namespace: str, deployment: str, *args: str) -> str:
        addr = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "modelbudget.testbed.modelserver", "--kubeconfig", testbed.kubeconfig]
        cmd += ["--namespace", namespace, "--deployment", deployment, "--listen", addr, *args]
        proc = subprocess.Popen(cmd, cwd=REPO)
        target = Path(testbed.targets_dir) / f"{namespace}-{deployment}-{addr.rpartition(':')[2]}.json"
        started.append((proc, target))
        url = f"http://{addr}"

        def healthy() -> bool:
            assert proc.poll() is None, f"model server exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    return True
            except OSError:
                return False

        _wait_for(healthy, 30, "the model server")
        # Write then rename: Prometheus must never read a half-written file.
        target.with_suffix(".tmp").write_text(json.dumps([{"targets": [addr]}]))
        target.with_suffix(".tmp").rename(target)
        return url

    yield start
    for proc, target in started:
        target.unlink(missing_ok=True)
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., Any]:
    """``wait_for(predicate, timeout, what)``: poll until truthy, return the value, else fail."""
    return _wait_for


@pytest.fixture(scope="session")
def gpu_deployment() -> Callable[..., dict[str, Any]]:
    """``gpu_deployment(name, pool, replicas, gpus=1, startup_delay="")``: fake GPU pods on one pool."""
    return _gpu_deployment


@pytest.fixture(scope="session")
def modelbudget_crd(api_client: client.ApiClient, testbed: Any, wait_for: Callable[..., Any]) -> None:
    testbed.kubectl("apply", "-f", str(REPO / "crds" / "modelbudget.dev_modelbudgets.yaml"))
    testbed.kubectl("wait", "--for", "condition=Established", "--timeout", "60s", "crd/modelbudgets.modelbudget.dev")


def _helm_binary() -> str:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    cached = subprocess.run(
        ["bash", "-c", f"source {REPO}/hack/versions.sh; helm_bin"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return f"{cached}/helm"


@pytest.fixture(scope="module")
def helm(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = _helm_binary()
    if not os.access(binary, os.X_OK):
        reason = f"helm not found at {binary}: run hack/build-binaries.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("helm-home")
    # Keep helm's cache and config out of $HOME; nothing here uses a chart repository.
    env = {
        **os.environ,
        "HELM_CACHE_HOME": f"{home}/cache",
        "HELM_CONFIG_HOME": f"{home}/config",
        "HELM_DATA_HOME": f"{home}/data",
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [binary, "--kubeconfig", testbed.kubeconfig, *args], capture_output=True, text=True, env=env, timeout=180
        )
        if check:
            assert out.returncode == 0, f"helm {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out

    return run


def token_kubeconfig(admin_kubeconfig: str, namespace: str, service_account: str, testbed: Any, path: Path) -> str:
    """A kubeconfig that authenticates as the ServiceAccount (a short-lived bound token)."""
    token = testbed.kubectl("create", "token", service_account, "-n", namespace, "--duration", "1h").stdout.strip()
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = dict(next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"])
    if "certificate-authority" in cluster:  # inline it: the file path is relative to the admin kubeconfig
        ca = (Path(admin_kubeconfig).parent / cluster.pop("certificate-authority")).read_bytes()
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "testbed", "cluster": cluster}],
                "users": [{"name": service_account, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "testbed", "user": service_account}}],
                "current-context": "sa",
            }
        )
    )
    return str(path)
