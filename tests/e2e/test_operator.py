"""The operator (``modelbudget run`` as a subprocess) on the local testbed.

Each test gets its own namespace, KwokNodePool, model server and operator(s); the specs use
short windows (3 s reconciles, 10 s rate window, 20 s stabilisation) so the whole file runs in a
few minutes.  Prometheus outages are staged with a proxy in front of the shared Prometheus, so
other users of the testbed are not disturbed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MODELBUDGET = str(Path(os.environ.get("MB_PYTHON", REPO / ".venv/bin/python")).parent / "modelbudget")
LOGS = REPO / ".local" / "logs"
MB = ("modelbudget.dev", "v1alpha1")
POOLS = ("testbed.modelbudget.dev", "v1alpha1", "kwoknodepools")
GPUS_PER_NODE = 2
NODE_PRICE = GPUS_PER_NODE * 2.0  # $/h at $2 per GPU-hour


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post_json(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5):
        pass


class PrometheusProxy:
    """A stoppable stand-in for Prometheus: forwards GETs to the real one while running."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        upstream = self.upstream

        class Forward(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with urllib.request.urlopen(upstream + self.path, timeout=10) as r:
                    body = r.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Forward)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def budget(
    name: str, pool: str, prometheus: str, *, ceiling: float = 3 * NODE_PRICE, max_replicas: int = 8, **overrides: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "targetRef": {"name": name},
        "curve": {"intercept": 0.1, "slope": 0.08, "minTokens": 64, "maxTokens": 4096},
        "budget": {"ceiling": {"amount": ceiling, "period": "Hour"}, "valuePerPoint": 0.01},
        "replicas": {"min": 1, "max": max_replicas, "gpusPerReplica": 1},
        "nodePools": [
            {
                "name": pool,
                "gpuType": "nvidia-l4",
                "pricePerGpuHour": 2.0,
                "gpusPerNode": GPUS_PER_NODE,
                "minNodes": 1,
                "maxNodes": 6,
                "tokensPerSecondPerReplica": 1000,
                "providerRef": {"kind": "KwokNodePool", "name": pool},
            }
        ],
        "metrics": {"prometheusUrl": prometheus, "window": "10s", "maxStalenessSeconds": 30, "timeoutSeconds": 2},
        "behavior": {
            "scaleUp": {"maxReplicasPerPeriod": 4, "periodSeconds": 5},
            "scaleDown": {"stabilizationWindowSeconds": 20},
            "nodeScaleDown": {"stabilizationWindowSeconds": 20},
            "fallback": {"afterSeconds": 15, "action": "ScaleTo", "replicas": 1},
            "queueDrainSeconds": 30,
        },
    }
    spec.update(overrides)
    return {"apiVersion": "/".join(MB), "kind": "ModelBudget", "metadata": {"name": name}, "spec": spec}


class Env:
    """One test's world: namespace, pool, Deployment, model server, operators, and readers."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        pool: str,
        server_url: str,
        kubeconfig: str,
        prometheus: str,
        wait_for: Callable[..., Any],
    ) -> None:
        self.ns, self.pool, self.server, self.kubeconfig = namespace, pool, server_url, kubeconfig
        self.prometheus, self.wait_for = prometheus, wait_for
        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)
        self.custom, self.autoscaling = client.CustomObjectsApi(api), client.AutoscalingV2Api(api)
        self.operators: list[subprocess.Popen[bytes]] = []

    def apply_budget(self, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(*MB, self.ns, "modelbudgets", body)

    def status(self) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(*MB, self.ns, "modelbudgets", "llm")
        return dict(obj.get("status") or {})

    def condition(self, type_: str) -> dict[str, Any]:
        return next((c for c in self.status().get("conditions", []) if c["type"] == type_), {})

    def replicas(self) -> int:
        return int(self.apps.read_namespaced_deployment_scale("llm", self.ns).spec.replicas or 0)

    def pool_size(self) -> int:
        return int(self.custom.get_cluster_custom_object(*POOLS, self.pool)["spec"]["replicas"])

    def running_pods(self) -> int:
        pods = self.core.list_namespaced_pod(self.ns, label_selector="app=llm").items
        return sum(1 for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp)

    def token_limit(self) -> int | None:
        try:
            cm = self.core.read_namespaced_config_map("llm-token-limit", self.ns)
        except ApiException:
            return None
        return int((cm.data or {})["max_tokens"])

    def events(self, reason: str) -> list[Any]:
        items = self.core.list_namespaced_event(self.ns, field_selector="involvedObject.kind=ModelBudget").items
        return [e for e in items if e.reason == reason]

    def demand(self, rps: float) -> None:
        post_json(f"{self.server}/control", {"rps": rps})

    def start_operator(self, tag: str = "a") -> subprocess.Popen[bytes]:
        LOGS.mkdir(parents=True, exist_ok=True)
        log = (LOGS / f"e2e-operator-{self.ns}-{tag}.log").open("ab")
        cmd = [
            MODELBUDGET,
            "run",
            "--kubeconfig",
            self.kubeconfig,
            "-n",
            self.ns,
            "--interval",
            "3",
            "--status-heartbeat",
            "5",
            "--lease-namespace",
            self.ns,
            "--lease-duration",
            "6",
            "--identity",
            f"operator-{tag}",
            "--metrics-addr",
            f"127.0.0.1:{free_port()}",
            "--liveness",
            f"http://127.0.0.1:{free_port()}/healthz",
        ]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.operators.append(proc)
        return proc

    def leader(self) -> str | None:
        leases = client.CoordinationV1Api(self.apps.api_client)
        try:
            lease = leases.read_namespaced_lease("modelbudget-operator", self.ns)
        except ApiException:
            return None
        return lease.spec.holder_identity if lease.spec else None


@pytest.fixture
def env(
    testbed: Any,
    api_client: client.ApiClient,
    modelbudget_crd: None,
    namespace: str,
    node_pool: Callable[..., str],
    model_server: Callable[..., str],
    gpu_deployment: Callable[..., dict[str, Any]],
    wait_for: Callable[..., Any],
    request: pytest.FixtureRequest,
) -> Iterator[Env]:
    # Parametrised indirectly: the replicas the Deployment starts with, and the demand in req/s.
    replicas, rps = request.param["replicas"], request.param["rps"]
    nodes = max(1, -(-replicas // GPUS_PER_NODE))
    pool = node_pool(replicas=nodes, gpus_per_node=GPUS_PER_NODE, delay=3)
    client.AppsV1Api(api_client).create_namespaced_deployment(namespace, gpu_deployment("llm", pool, replicas))
    url = model_server(
        namespace,
        "llm",
        "--rate-curve",
        f"0:{rps}",
        "--arrivals",
        "even",
        "--generated-tokens-mean",
        "400",
        "--tokens-sigma",
        "0",
        "--prompt-tokens-mean",
        "100",
        "--tokens-per-second-per-replica",
        "1000",
    )
    e = Env(api_client, namespace, pool, url, testbed.kubeconfig, testbed.prometheus_url, wait_for)
    wait_for(lambda: e.running_pods() == replicas, 60, f"{replicas} running pods")
    yield e
    for proc in e.operators:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)
    # Nothing may be left holding the ModelBudget (the finalizer) once no operator runs.
    with contextlib.suppress(ApiException):
        e.custom.patch_namespaced_custom_object(
            *MB, namespace, "modelbudgets", "llm", {"metadata": {"finalizers": None}}
        )


def record(name: str, value: float) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / "e2e-measurements.txt").open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {name} {value:.1f}\n")
    print(f"{name}: {value:.1f}")


@pytest.mark.parametrize("env", [{"replicas": 1, "rps": 1.0}], indirect=True, ids=[""])
def test_demand_ramp_scales_replicas_then_nodes_within_the_ceiling_and_back_down(env: Env) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    env.start_operator()
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "Ready=True")
    time.sleep(6)
    base = env.replicas()
    assert base <= 2  # 1 req/s x 400 tokens is about one replica's worth

    # Step: 30 req/s x 400 tokens needs 12 replicas; $12/h buys 3 nodes = 6 replicas.
    step_at = time.monotonic()
    env.demand(30)
    env.wait_for(lambda: env.replicas() > base, 60, "a scale-up")
    record("reaction_seconds_demand_step_to_replicas", time.monotonic() - step_at)
    spends, limits = [], []

    def settled() -> bool:
        s = env.status()
        spends.append(s.get("spend", {}).get("currentPerHour", 0.0))
        limits.append((s.get("plan", {}).get("tokenLimit"), s.get("plan", {}).get("admittedRequestsPerSecond")))
        return env.replicas() == 6 and env.pool_size() == 3 and env.running_pods() == 6

    env.wait_for(settled, 120, "6 running replicas on 3 nodes", interval=1)
    record("reaction_seconds_demand_step_to_pods_running", time.monotonic() - step_at)
    assert max(spends) <= 3 * NODE_PRICE + 1e-9, spends
    assert env.condition("BudgetLimited")["status"] == "True"
    limit = env.token_limit()
    assert limit is not None and limit <= 200  # 6 replicas carry 30 req/s only at <= 200 tokens
    # Tokens are trimmed before requests: no admission cap while a smaller limit still fits.
    assert all(admitted is None for lim, admitted in limits if lim is not None and lim > 64), limits
    assert env.events("TokenLimitChanged") and env.events("NodePoolResized") and env.events("Rescaled")

    # Demand falls: replicas hold for the 20 s stabilisation window, then come down.
    env.demand(1)
    drop_at = time.monotonic()
    env.wait_for(lambda: env.status().get("demand", {}).get("requestsPerSecond", 99) < 5, 60, "demand seen low")
    while time.monotonic() - drop_at < 15:
        assert env.replicas() == 6, "scaled down inside the stabilisation window"
        time.sleep(1)
    env.wait_for(lambda: env.replicas() < 6, 60, "the scale-down after the window")
    record("scale_down_after_demand_drop_seconds", time.monotonic() - drop_at)
    assert time.monotonic() - drop_at >= 20


@pytest.mark.parametrize("env", [{"replicas": 3, "rps": 6.0}], indirect=True, ids=[""])
def test_prometheus_outage_holds_then_falls_back_then_recovers(env: Env) -> None:
    proxy = PrometheusProxy(env.prometheus)
    proxy.start()
    try:
        env.apply_budget(budget("llm", env.pool, proxy.url))
        env.start_operator()
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 60, "metrics")
        before = env.replicas()
        proxy.stop()
        env.demand(40)  # unseen: must not cause a scale-up
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "False", 30, "MetricsAvailable=False")
        assert env.condition("MetricsAvailable")["reason"] == "MetricsUnreachable"
        assert env.replicas() <= before
        assert env.events("MetricsUnavailable")
        env.wait_for(lambda: env.replicas() == 1, 60, "the ScaleTo fallback")
        assert env.condition("Degraded")["reason"] == "MetricsFallback"
        proxy.start()
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 30, "recovery")
        env.wait_for(lambda: env.replicas() > 1, 30, "scaling again after recovery")
        assert env.events("MetricsRecovered")
    finally:
        proxy.stop()


@pytest.mark.parametrize("env", [{"replicas": 2, "rps": 4.0}], indirect=True, ids=[""])
def test_two_operators_one_leader_and_a_restart_keeps_the_ledger(env: Env) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    operators = {"operator-a": env.start_operator("a")}
    time.sleep(1)
    operators["operator-b"] = env.start_operator("b")
    env.wait_for(lambda: env.status().get("spend", {}).get("periodToDate", 0) > 0, 60, "spend accrued")
    time.sleep(6)  # let the first decisions settle before taking the snapshot
    leader = env.leader()
    assert leader in ("operator-a", "operator-b")
    first = env.status()
    period_start = first["spend"]["periodStart"]
    rescaled = len(env.events("Rescaled"))
    replicas = env.replicas()

    operators[leader].kill()  # no clean shutdown: the lease must expire
    killed_at = time.monotonic()
    env.wait_for(lambda: env.leader() not in (None, leader), 30, "the standby taking over")
    record("leader_takeover_seconds", time.monotonic() - killed_at)
    spent = first["spend"]["periodToDate"]
    env.wait_for(lambda: env.status()["spend"]["periodToDate"] > spent + 1e-6, 30, "spend accruing again")
    after = env.status()
    assert after["spend"]["periodStart"] == period_start  # the same period's ledger, not a fresh one
    # Nothing re-applied: same demand, same size, no new Rescaled events.
    assert env.replicas() == replicas
    assert len(env.events("Rescaled")) == rescaled


@pytest.mark.parametrize("env", [{"replicas": 1, "rps": 20.0}], indirect=True, ids=[""])
def test_recommend_mode_changes_nothing(env: Env) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus, mode="Recommend"))
    env.start_operator()
    env.wait_for(lambda: env.status().get("plan", {}).get("replicas", 1) > 1, 60, "a recommendation")
    time.sleep(6)
    assert env.condition("Ready")["reason"] == "Recommending"
    assert env.replicas() == 1 and env.pool_size() == 1 and env.token_limit() is None


@pytest.mark.parametrize("env", [{"replicas": 1, "rps": 20.0}], indirect=True, ids=[""])
def test_invalid_and_conflicting_specs_are_refused(env: Env) -> None:
    bad = budget("llm", env.pool, env.prometheus)
    bad["spec"]["replicas"] = {"min": 5, "max": 2}
    with pytest.raises(ApiException) as rejected:
        env.apply_budget(bad)
    assert rejected.value.status == 422 and "replicas.min must not exceed replicas.max" in str(rejected.value.body)

    # Passes the schema, but its samples cannot give a curve: InvalidSpec, and nothing done.
    unfit = budget("llm", env.pool, env.prometheus)
    falling = [(64, 0.6), (256, 0.5), (1024, 0.4)]  # more tokens, less performance: no slope to fit
    unfit["spec"]["curve"] = {
        "samples": [{"tokens": t, "performance": p} for t, p in falling],
        "minTokens": 64,
        "maxTokens": 4096,
    }
    env.apply_budget(unfit)
    env.start_operator()
    env.wait_for(lambda: env.condition("Ready").get("reason") == "InvalidSpec", 60, "InvalidSpec")
    assert env.events("InvalidSpec") and env.replicas() == 1

    env.autoscaling.create_namespaced_horizontal_pod_autoscaler(
        env.ns,
        {
            "metadata": {"name": "llm"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
                "minReplicas": 1,
                "maxReplicas": 3,
            },
        },
    )
    env.custom.patch_namespaced_custom_object(
        *MB, env.ns, "modelbudgets", "llm", {"spec": {"curve": {"samples": None, "intercept": 0.1, "slope": 0.08}}}
    )
    env.wait_for(lambda: env.condition("Degraded").get("reason") == "ConflictingAutoscaler", 60, "the conflict")
    assert env.condition("Ready")["status"] == "False"
    assert env.events("ConflictingAutoscaler")
    assert env.replicas() == 1 and env.token_limit() is None
