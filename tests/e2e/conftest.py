"""Fixtures of the e2e tier: one local testbed (hack/testbed.sh) for the whole session, and one
test's world (``env``), parametrised indirectly with ``support.world``.

The session brings the testbed up once (``hack/testbed.sh up`` is idempotent, so an already
running one is reused) and tears it down at the end only if this session started it and
``MB_KEEP_TESTBED`` is not ``1``. Without the binaries from hack/build-binaries.sh the tier
is skipped, except under CI (env ``CI`` set), where that is a failure. Helpers the tests share
are in support.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from support import (
    GPUS_PER_NODE,
    MAX_NUM_SEQS,
    POOLS,
    REPO,
    Env,
    Testbed,
    World,
    free_port,
    gpu_deployment,
    missing_binaries,
    run_testbed,
    skip_or_fail,
    stop_process,
    unique,
    wait_for,
)


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    missing = missing_binaries()
    if missing:
        skip_or_fail(f"testbed binaries missing ({', '.join(missing)}): run hack/build-binaries.sh")
    already_up = "apiserver: ready" in run_testbed("status").stdout
    up = run_testbed("up")
    if up.returncode != 0:
        pytest.fail(f"hack/testbed.sh up failed:\n{up.stdout}\n{up.stderr}")
    sys.stderr.write(up.stdout)
    env = dict(re.findall(r"^export (\w+)=(.*)$", run_testbed("env").stdout, re.M))
    yield Testbed(
        kubeconfig=env["KUBECONFIG"],
        prometheus_url=env["PROMETHEUS_URL"],
        targets_dir=env["MB_PROMETHEUS_TARGETS"],
        path=env["PATH"].replace("$PATH", os.environ.get("PATH", "")),
    )
    if not already_up and os.environ.get("MB_KEEP_TESTBED") != "1":
        run_testbed("down")


@pytest.fixture(scope="session")
def api_client(testbed: Testbed) -> client.ApiClient:
    return config.new_client_from_config(config_file=testbed.kubeconfig)


@pytest.fixture
def namespace(api_client: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted (without waiting) afterwards."""
    core = client.CoreV1Api(api_client)
    name = unique("e2e-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-"))
    core.create_namespace({"metadata": {"name": name}})
    # Pods need the default ServiceAccount, which kube-controller-manager adds a moment later.
    wait_for(lambda: _exists(lambda: core.read_namespaced_service_account("default", name)), 30, "default SA")
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
        name = unique("pool")
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

        wait_for(healthy, 30, "the model server")
        # Write then rename: Prometheus must never read a half-written file.
        target.with_suffix(".tmp").write_text(json.dumps([{"targets": [addr]}]))
        target.with_suffix(".tmp").rename(target)
        return url

    yield start
    for proc, target in started:
        target.unlink(missing_ok=True)
        stop_process(proc, grace=10)


@pytest.fixture(scope="session")
def modelbudget_crd(testbed: Testbed) -> None:
    """The operator's CRDs (ModelBudget, GpuPool), applied and Established once per session."""
    testbed.kubectl("apply", "-f", str(REPO / "crds" / "modelbudget.dev_modelbudgets.yaml"))
    testbed.kubectl("apply", "-f", str(REPO / "crds" / "modelbudget.dev_gpupools.yaml"))
    testbed.kubectl(
        "wait",
        "--for",
        "condition=Established",
        "--timeout",
        "60s",
        "crd/modelbudgets.modelbudget.dev",
        "crd/gpupools.modelbudget.dev",
    )


@pytest.fixture
def env(
    testbed: Testbed,
    api_client: client.ApiClient,
    modelbudget_crd: None,
    namespace: str,
    node_pool: Callable[..., str],
    model_server: Callable[..., str],
    request: pytest.FixtureRequest,
) -> Iterator[Env]:
    """One test's world, parametrised indirectly with a ``World`` (``@world(replicas, rps)``): a
    namespace, a pool of 2-GPU nodes big enough for the replicas, Deployment ``llm`` with them all
    Running, and a model server with steady, even demand of 400-token requests. The test applies
    its ModelBudget and starts its operators through ``Env``; afterwards the operators are
    stopped and the ModelBudgets freed of the finalizer, then the namespace and pool go."""
    spec: World = request.param
    nodes = max(1, -(-spec.replicas // GPUS_PER_NODE))
    pool = node_pool(replicas=nodes, gpus_per_node=GPUS_PER_NODE, delay=spec.delay)
    client.AppsV1Api(api_client).create_namespaced_deployment(namespace, gpu_deployment("llm", pool, spec.replicas))
    demand = ["--rate-curve", f"0:{spec.rps}", "--arrivals", "even", "--tokens-sigma", "0"]
    demand += ["--generated-tokens-mean", "400", "--prompt-tokens-mean", "100"]
    gate = [] if spec.builtin_gate else ["--no-builtin-gate"]
    # Batches of 32 (as support.budget's pools say): a 400-token answer decodes in ~13 s, so answers
    # complete within a test's minute; at vLLM's default 256 a full batch decodes at ~4 tokens/s.
    serving = ["--tokens-per-second-per-replica", "1000", "--max-num-seqs", str(MAX_NUM_SEQS)]
    url = model_server(namespace, "llm", *demand, *gate, *serving)
    e = Env(api_client, namespace, pool, url, testbed)
    wait_for(lambda: e.running_pods() == spec.replicas, 60, f"{spec.replicas} running pods")
    yield e
    e.cleanup()


def _helm_binary() -> str:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    cached = subprocess.run(
        ["bash", "-c", f"source {REPO}/hack/versions.sh; helm_bin"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return f"{cached}/helm"


@pytest.fixture(scope="module")
def helm(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = _helm_binary()
    if not os.access(binary, os.X_OK):
        skip_or_fail(f"helm not found at {binary}: run hack/build-binaries.sh")
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
