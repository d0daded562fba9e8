"""What the e2e modules share: the testbed handle, one test's operator world (``Env``), the
ModelBudget builder, fault injectors, an invariant sampler and the waits.

Fixtures live in conftest.py (``env`` builds the world, parametrised indirectly with ``world``);
test modules import helpers from here and never from each other.

Fault injection, next to the test's own world:

* ``FaultyPrometheus``: an HTTP stand-in in front of the shared Prometheus that forwards, or
  refuses connections (stopped), or accepts and never answers (hung), or answers 500, 400
  ``bad_data`` or garbage -- what a real Prometheus cannot be made to do on demand. It can also
  insist on credentials, to check the operator sends them.
* ``PrometheusProcess``: a private, real Prometheus that scrapes one model server, to be
  SIGKILLed and restarted without disturbing other users of the testbed.
* ``restart_apiserver``: kills the testbed's kube-apiserver and starts it again with the same
  command line (kwokctl's binary runtime does not supervise its components).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from gatekit import free_port
from kubernetes import client
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelbudget-operator"
TESTBED = REPO / "hack" / "testbed.sh"
LOGS = REPO / ".local" / "logs"
KWOK_PIDS = REPO / ".local" / "run" / "kwok"
MODELBUDGET = str(Path(sys.executable).parent / "modelbudget")
MB = ("modelbudget.dev", "v1alpha1")
POOLS = ("testbed.modelbudget.dev", "v1alpha1", "kwoknodepools")
GPUS_PER_NODE = 2
NODE_PRICE = GPUS_PER_NODE * 2.0  # $/h at $2 per GPU-hour
MAX_NUM_SEQS = 32  # the model server's batch, and the pools' serving.maxNumSeqs: answers complete in seconds
T = TypeVar("T")


def unique(prefix: str) -> str:
    """``prefix`` and a random suffix: names that never collide across tests and sessions."""
    return f"{prefix}-{secrets.token_hex(3)}"


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout``
    seconds naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def post_json(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5):
        pass


def record(name: str, value: float) -> None:
    """A measurement, appended to .local/logs/e2e-measurements.txt (docs/robustness.md)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / "e2e-measurements.txt").open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {name} {value:.1f}\n")
    print(f"{name}: {value:.1f}")


def run_testbed(command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``hack/testbed.sh <command>``; ``env`` adds to the environment."""
    return subprocess.run(
        [str(TESTBED), command], capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}
    )


def missing_binaries() -> list[str]:
    """The testbed's binaries (hack/build-binaries.sh) that are not there."""
    dirs = subprocess.run(
        ["bash", "-c", f"source {REPO}/hack/versions.sh; k8s_bin; etcd_bin; kwok_bin"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    wanted = [f"{dirs[0]}/{b}" for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")]
    wanted += [f"{dirs[1]}/etcd", f"{dirs[2]}/kwok", f"{dirs[2]}/kwokctl"]
    return [b for b in wanted if not os.access(b, os.X_OK)]


def skip_or_fail(reason: str) -> None:
    """Skip the test for a missing precondition; under CI (env ``CI`` set) that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


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


def gpu_deployment(name: str, pool: str, replicas: int, gpus: int = 1, startup_delay: str = "") -> dict[str, Any]:
    """A Deployment of fake GPU pods pinned to one pool's nodes, tolerating the GPU taint.

    Pinned, so tests sharing a testbed do not take each other's GPUs. ``startup_delay`` (a Go
    duration, "45s") keeps each pod Pending that long after it is bound, like a model loading
    (hack/manifests/kwok-stages.yaml).
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


def budget(
    name: str, pool: str, prometheus: str, *, ceiling: float = 3 * NODE_PRICE, max_replicas: int = 8, **overrides: Any
) -> dict[str, Any]:
    """A ModelBudget with short windows (3 s reconciles, 10 s rate window, 20 s stabilisation), so
    a test sees the whole cycle in a minute or two."""
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
                "serving": {"maxNumSeqs": MAX_NUM_SEQS},
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


def start_modelbudget(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``modelbudget <args>`` as a subprocess, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen([MODELBUDGET, *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if it is still there after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@dataclass(frozen=True)
class Operator:
    proc: subprocess.Popen[bytes]
    metrics_addr: str  # host:port of its /metrics
    liveness_url: str
    log: Path


@dataclass(frozen=True)
class World:
    """The ``env`` fixture's parameter: the replicas the Deployment starts with and the demand in
    req/s; ``delay`` is the node pool's provisioning delay in seconds; ``builtin_gate`` False when
    the test runs real gates in front of the model server (it then reports no gate metrics)."""

    replicas: int
    rps: float
    delay: int = 3
    builtin_gate: bool = True


def world(replicas: int, rps: float, delay: int = 3, builtin_gate: bool = True) -> pytest.MarkDecorator:
    """``@world(replicas=1, rps=2.0)`` on a test that takes ``env``: the fixture builds that world."""
    return pytest.mark.parametrize("env", [World(replicas, rps, delay, builtin_gate)], indirect=True, ids=[""])


class Env:
    """One test's world: namespace, pool, Deployment ``llm``, model server, the operators the test
    starts, and readers of what they did. Built and cleaned up by the ``env`` fixture."""

    wait_for = staticmethod(wait_for)

    def __init__(self, api: client.ApiClient, namespace: str, pool: str, server_url: str, testbed: Testbed) -> None:
        self.ns, self.pool, self.server = namespace, pool, server_url
        self.kubeconfig, self.prometheus = testbed.kubeconfig, testbed.prometheus_url
        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)
        self.custom, self.autoscaling = client.CustomObjectsApi(api), client.AutoscalingV2Api(api)
        self.operators: list[Operator] = []

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

    def start_operator(self, tag: str = "a", *extra: str) -> Operator:
        """``modelbudget run`` on this namespace (3 s reconciles, a 6 s lease, identity
        ``operator-<tag>``), plus ``extra`` flags; stopped by the fixture."""
        metrics, liveness = f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/healthz"
        args = ["run", "--kubeconfig", self.kubeconfig, "-n", self.ns, "--interval", "3"]
        args += ["--status-heartbeat", "5", "--lease-namespace", self.ns, "--lease-duration", "6"]
        args += ["--identity", f"operator-{tag}", "--metrics-addr", metrics, "--liveness", liveness]
        args += ["--inline-cluster-pools=allow", *extra]  # the testbed has one tenant: its KwokNodePool inline
        log = LOGS / f"e2e-operator-{self.ns}-{tag}.log"
        operator = Operator(start_modelbudget(args, log), metrics, liveness, log)
        self.operators.append(operator)
        return operator

    def leader(self) -> str | None:
        leases = client.CoordinationV1Api(self.apps.api_client)
        try:
            lease = leases.read_namespaced_lease("modelbudget-operator", self.ns)
        except ApiException:
            return None
        return lease.spec.holder_identity if lease.spec else None

    def cleanup(self) -> None:
        """Stop the operators, then free every ModelBudget of the finalizer: nothing may hold one
        once no operator runs, or the namespace would never finish deleting."""
        for operator in self.operators:
            stop_process(operator.proc)
        for mb in self.custom.list_namespaced_custom_object(*MB, self.ns, "modelbudgets").get("items", []):
            with contextlib.suppress(ApiException):
                self.custom.patch_namespaced_custom_object(
                    *MB, self.ns, "modelbudgets", mb["metadata"]["name"], {"metadata": {"finalizers": None}}
                )


def scale_history(env: Env) -> list[tuple[str, str]]:
    """``(reason, message)`` of every Event the operator posted on ModelBudgets in the namespace,
    oldest first; an Event seen again (count > 1) is listed that many times."""
    items = env.core.list_namespaced_event(env.ns, field_selector="involvedObject.kind=ModelBudget").items
    items.sort(key=lambda e: e.first_timestamp or e.event_time or e.metadata.creation_timestamp)
    return [(e.reason, e.message) for e in items for _ in range(e.count or 1)]


def transitions(env: Env, reason: str = "Rescaled") -> list[tuple[int, int]]:
    """``(before, after)`` of the operator's Events of one reason, oldest first."""
    out = []
    for r, message in scale_history(env):
        if r == reason:
            before, _, after = message.rpartition(": ")[2].partition(" -> ")
            out.append((int(before) if before != "None" else -1, int(after)))
    return out


def assert_no_double_actuation(env: Env) -> None:
    """Every Rescaled/NodePoolResized Event is a real change, and none repeats the one before it:
    a decision applied twice would show up as ``a -> b`` twice in a row."""
    for reason in ("Rescaled", "NodePoolResized"):
        seen = transitions(env, reason)
        assert all(b != a for b, a in seen), (reason, seen)
        assert all(x != y for x, y in itertools.pairwise(seen)), (reason, seen)


def status_written_after(env: Env, t_wall: float) -> bool:
    """Whether the operator wrote a plan decided after ``t_wall`` (a ``time.time()``)."""
    decided = (env.status().get("plan") or {}).get("decidedAt")
    return decided is not None and datetime.fromisoformat(decided).timestamp() > t_wall


class Sampler:
    """Samples the knobs every ``interval`` seconds in a thread, so invariants are checked over the
    whole run rather than at the moments the test happens to look."""

    def __init__(self, env: Env, interval: float = 0.5) -> None:
        self.env, self.interval = env, interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # an apiserver restart makes reads fail for a while
                pool = self.env.custom.get_cluster_custom_object(*POOLS, self.env.pool)
                nodes = self.env.core.list_node(label_selector=f"modelbudget.dev/pool={self.env.pool}").items
                spend = self.env.status().get("spend") or {}
                self.samples.append(
                    {
                        "t": time.monotonic(),
                        "replicas": self.env.replicas(),
                        "pool": int(pool["spec"]["replicas"]),
                        "nodes": len(nodes),
                        "spent": spend.get("periodToDate"),
                        "period": spend.get("periodStart"),
                    }
                )
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def since(self, t: float) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["t"] >= t]

    def max(self, key: str, since: float = 0.0, until: float = float("inf")) -> int:
        return max((s[key] for s in self.samples if since <= s["t"] <= until), default=0)


MODES = ("forward", "hang", "error500", "bad_data", "garbage", "absurd", "stale")
STALE_SECONDS = 600  # how old "stale" makes every sample: far beyond any test's maxStalenessSeconds


def _aged(answer: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A Prometheus query answer with every sample's timestamp ``seconds`` older."""
    for series in (answer.get("data") or {}).get("result") or []:
        if isinstance(series, dict) and "value" in series:
            series["value"] = [series["value"][0] - seconds, series["value"][1]]
    return answer


class FaultyPrometheus:
    """A Prometheus stand-in whose behaviour the test switches with ``set`` (one of ``MODES``);
    ``stop`` closes its port (connection refused) and ``start`` opens the same port again."""

    def __init__(self, upstream: str, require: set[str] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.require = require  # Authorization headers accepted; anything else is a 401
        self.port = free_port()
        self.mode = "forward"
        self.requests = 0
        self.auth_seen: set[str] = set()
        self._release = threading.Event()  # set when a hung request may give up
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if mode == "hang":
            self._release.clear()
        else:
            self._release.set()  # hung requests end (the client has long given up)

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.requests += 1
                auth = self.headers.get("Authorization")
                if auth:
                    proxy.auth_seen.add(auth)
                if proxy.require is not None and auth not in proxy.require:
                    return self._reply(401, b"Unauthorized\n", "text/plain")
                mode = proxy.mode
                if mode == "hang":
                    proxy._release.wait(300)
                    self.close_connection = True
                    return None
                if mode == "error500":
                    return self._reply(500, b"internal error\n", "text/plain")
                if mode == "bad_data":
                    body = {"status": "error", "errorType": "bad_data", "error": "1:1: parse error: unexpected"}
                    return self._reply(400, json.dumps(body).encode(), "application/json")
                if mode == "garbage":
                    # Well-formed JSON of the wrong shape: a series without a value, and a NaN.
                    result = [{"metric": {"le": []}}, {"metric": {}, "value": ["soon", "NaN"]}]
                    body = {"status": "success", "data": {"resultType": "vector", "result": result}}
                    return self._reply(200, json.dumps(body).encode(), "application/json")
                if mode == "absurd":
                    # The right shape, fresh, and implausible: a broken exporter or query.
                    result = [{"metric": {}, "value": [time.time(), "1e15"]}]
                    body = {"status": "success", "data": {"resultType": "vector", "result": result}}
                    return self._reply(200, json.dumps(body).encode(), "application/json")
                try:
                    with urllib.request.urlopen(proxy.upstream + self.path, timeout=10) as r:
                        answer = r.read()
                    if mode == "stale":  # Prometheus' answers, as if its scrapes had stopped long ago
                        answer = json.dumps(_aged(json.loads(answer), STALE_SECONDS)).encode()
                    return self._reply(200, answer, "application/json")
                except urllib.error.HTTPError as e:
                    return self._reply(e.code, e.read(), "application/json")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client may have timed out
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Connection refused from now on (the port is closed)."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class PrometheusProcess:
    """A private Prometheus (Debian's binary) scraping one model server every second."""

    def __init__(self, scrape: str, workdir: Path) -> None:
        self.scrape = scrape  # host:port of the model server
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "model", "honor_labels": True, "static_configs": [{"targets": [self.scrape]}]}
            ],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        with (self.dir / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    os.environ.get("MB_PROMETHEUS_BIN", "prometheus"),
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self.ready, timeout, "the private Prometheus", interval=0.3)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, the WAL is replayed on the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def restart_apiserver(api: client.ApiClient, down_for: float = 3.0) -> float:
    """Kill kube-apiserver, keep it down ``down_for`` seconds, start it again; returns the seconds
    until it serves again (measured from the kill).

    The new process is recorded in kwokctl's pid file, in kwokctl's format (the bare number: it
    does not parse a trailing newline), so ``hack/testbed.sh down`` stops it like the original.
    """
    pid_file = KWOK_PIDS / "kube-apiserver.pid"
    pid = int(pid_file.read_text())
    cmdline = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    cwd = os.readlink(f"/proc/{pid}/cwd")
    log = Path(os.readlink(f"/proc/{pid}/fd/1"))  # kwokctl logs the component's stdout to a file
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 10, "the apiserver to exit", interval=0.3)
    time.sleep(down_for)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmdline, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    core = client.CoreV1Api(api)

    def ready() -> bool:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise AssertionError(f"the restarted kube-apiserver exited ({proc.returncode}); {log}:\n{tail}")
        try:
            core.list_namespace(limit=1, _request_timeout=2)
        except Exception:
            return False
        return True

    wait_for(ready, 90, "kube-apiserver to come back", interval=0.3)
    return time.monotonic() - killed


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def token_kubeconfig(admin_kubeconfig: str, namespace: str, service_account: str, testbed: Testbed, path: Path) -> str:
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
