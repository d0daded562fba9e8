"""Fault injection for the e2e tier: things that break for real, next to the test's own world.

* ``FaultyPrometheus``: an HTTP stand-in in front of the shared Prometheus that forwards, or
  refuses connections (stopped), or accepts and never answers (hung), or answers 500, 400
  ``bad_data`` or garbage -- what a real Prometheus cannot be made to do on demand. It can also
  insist on credentials, to check the operator sends them.
* ``PrometheusProcess``: a private, real Prometheus that scrapes one model server, to be
  SIGKILLed and restarted without disturbing other users of the testbed.
* ``restart_apiserver``: kills the testbed's kube-apiserver and starts it again with the same
  command line (kwokctl's binary runtime does not supervise its components).
* ``operator_env``: the world of one test (namespace, pool, Deployment, model server), as the
  ``env`` fixture of test_operator.py builds it, for the fault, HA and bad-input suites.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_operator import GPUS_PER_NODE, MB, MODELBUDGET, POOLS, Env

REPO = Path(__file__).resolve().parents[2]
KWOK_PIDS = REPO / ".local" / "run" / "kwok"
LOGS = REPO / ".local" / "logs"

MODES = ("forward", "hang", "error500", "bad_data", "garbage", "absurd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultyPrometheus:
    """A Prometheus stand-in whose behaviour the test switches with ``mode`` (one of ``MODES``)."""

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
                        return self._reply(200, r.read(), "application/json")
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
        log = (self.dir / "prometheus.log").open("ab")
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
        wait_until(self.ready, timeout, "the private Prometheus")

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


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def restart_apiserver(api: client.ApiClient, down_for: float = 3.0) -> float:
    """Kill kube-apiserver, keep it down ``down_for`` seconds, start it again; returns the seconds
    until it serves again (measured from the kill)."""
    pid = int((KWOK_PIDS / "kube-apiserver.pid").read_text())
    cmdline = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    cwd = os.readlink(f"/proc/{pid}/cwd")
    log = Path(os.readlink(f"/proc/{pid}/fd/1"))  # kwokctl logs the component's stdout to a file
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 10, "the apiserver to exit")
    time.sleep(down_for)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmdline, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    (KWOK_PIDS / "kube-apiserver.pid").write_text(f"{proc.pid}\n")  # for testbed.sh status/down
    core = client.CoreV1Api(api)

    def ready() -> bool:
        try:
            core.list_namespace(limit=1, _request_timeout=2)
        except Exception:
            return False
        return True

    wait_until(ready, 90, "kube-apiserver to come back")
    return time.monotonic() - killed


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def operator_env(
    testbed: Any,
    api_client: client.ApiClient,
    namespace: str,
    node_pool: Callable[..., str],
    model_server: Callable[..., str],
    gpu_deployment: Callable[..., dict[str, Any]],
    wait_for: Callable[..., Any],
    replicas: int,
    rps: float,
    delay: int = 3,
) -> Iterator[Env]:
    """Generator behind each suite's ``env`` fixture: the same world as test_operator.py's."""
    nodes = max(1, -(-replicas // GPUS_PER_NODE))
    pool = node_pool(replicas=nodes, gpus_per_node=GPUS_PER_NODE, delay=delay)
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
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            if proc.poll() is None:
                proc.kill()
    # Nothing may be left holding a ModelBudget (the finalizer) once no operator runs.
    for mb in e.custom.list_namespaced_custom_object(*MB, namespace, "modelbudgets").get("items", []):
        with contextlib.suppress(ApiException):
            e.custom.patch_namespaced_custom_object(
                *MB, namespace, "modelbudgets", mb["metadata"]["name"], {"metadata": {"finalizers": None}}
            )


def scale_history(env: Env) -> list[tuple[str, str]]:
    """``(reason, message)`` of every Event the operator posted on ModelBudgets in the namespace,
    oldest first; an Event seen again (count > 1) is listed that many times."""
    items = env.core.list_namespaced_event(env.ns, field_selector="involvedObject.kind=ModelBudget").items
    items.sort(key=lambda e: e.first_timestamp or e.event_time or e.metadata.creation_timestamp)
    return [(e.reason, e.message) for e in items for _ in range(e.count or 1)]


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


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


def start_operator(env: Env, tag: str, *extra: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    """Like ``Env.start_operator`` (same flags), plus ``extra``; returns the process, its metrics
    address, its liveness URL and its log file."""
    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / f"e2e-operator-{env.ns}-{tag}.log"
    metrics, liveness = f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/healthz"
    cmd = [MODELBUDGET, "run", "--kubeconfig", env.kubeconfig, "-n", env.ns, "--interval", "3"]
    cmd += ["--status-heartbeat", "5", "--lease-namespace", env.ns, "--lease-duration", "6"]
    cmd += ["--identity", f"operator-{tag}", "--metrics-addr", metrics, "--liveness", liveness, *extra]
    with path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    env.operators.append(proc)
    return proc, metrics, liveness, path


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


def install_crd(testbed: Any) -> None:
    """The ModelBudget CRD, applied and Established (idempotent; test_operator.py's fixture)."""
    testbed.kubectl("apply", "-f", str(REPO / "crds" / "modelbudget.dev_modelbudgets.yaml"))
    testbed.kubectl("wait", "--for", "condition=Established", "--timeout", "60s", "crd/modelbudgets.modelbudget.dev")
