"""The gate on the testbed: its ConfigMap watched through the real apiserver, with the RBAC `modelbudget inject` emits.

A gate process on 127.0.0.1 sits in front of the synthetic model server's OpenAI API and
watches ``model-token-limit`` in a fresh namespace with a ServiceAccount token (so the Role
that inject writes is what it runs on), through a TCP relay the test can cut to make the
apiserver unreachable. The `openai` client sends the requests.
"""

from __future__ import annotations

import base64
import concurrent.futures
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
import yaml
from gatekit import REPO, GateProcess, Process, TcpRelay, free_port, scrape, start_gate, start_model_server
from kubernetes import client, config

pytestmark = pytest.mark.e2e

TARGET = "model"  # start_gate's --target: the ConfigMap is model-token-limit
CONFIG_MAP = f"{TARGET}-token-limit"
APPLY_DEADLINE = 2.0  # seconds: issue 11, "a limit published by the operator is applied by the gate within 2 s"

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: model
spec:
  replicas: 1
  selector:
    matchLabels: {app: model}
  template:
    metadata:
      labels: {app: model}
    spec:
      containers:
        - name: vllm
          image: fake.invalid/vllm:latest
          args: ["--port", "8000"]
          ports:
            - {name: http, containerPort: 8000}
          readinessProbe:
            httpGet: {path: /health, port: http}
"""


@pytest.fixture(scope="module")
def kube(testbed: Any) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(config_file=testbed.kubeconfig))


@pytest.fixture(scope="module")
def gate_namespace(kube: client.CoreV1Api) -> Iterator[str]:
    name = f"e2e-gate-{secrets.token_hex(3)}"
    kube.create_namespace({"metadata": {"name": name}})
    yield name
    kube.delete_namespace(name)


def inject(gate_namespace: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(Path(sys.executable).with_name("modelbudget")), "inject", "-", "-n", gate_namespace],
        input=DEPLOYMENT,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def gate_account(testbed: Any, gate_namespace: str) -> str:
    """Applies inject's output: the RBAC for real, the Deployment server-side dry-run (kwok pods run nothing)."""
    docs = inject(gate_namespace)
    rbac = [d for d in docs if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    deployment = [d for d in docs if d["kind"] == "Deployment"]
    testbed.kubectl("apply", "-n", gate_namespace, "-f", "-", stdin=yaml.safe_dump_all(rbac))
    testbed.kubectl("apply", "-n", gate_namespace, "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(deployment))
    return str(deployment[0]["spec"]["template"]["spec"]["serviceAccountName"])


def test_injected_rbac_allows_that_one_configmap_only(testbed: Any, gate_namespace: str, gate_account: str) -> None:
    who = f"--as=system:serviceaccount:{gate_namespace}:{gate_account}"
    for verb in ("get", "list", "watch"):
        allowed = testbed.kubectl(
            "auth", "can-i", verb, f"configmaps/{CONFIG_MAP}", "-n", gate_namespace, who, check=False
        )
        assert allowed.stdout.strip() == "yes", allowed
    other = testbed.kubectl("auth", "can-i", "get", "configmaps/other", "-n", gate_namespace, who, check=False)
    assert other.stdout.strip() == "no"
    write = testbed.kubectl(
        "auth", "can-i", "patch", f"configmaps/{CONFIG_MAP}", "-n", gate_namespace, who, check=False
    )
    assert write.stdout.strip() == "no"


@pytest.fixture(scope="module")
def relay(testbed: Any) -> Iterator[TcpRelay]:
    server = yaml.safe_load(Path(testbed.kubeconfig).read_text())["clusters"][0]["cluster"]["server"]
    url = urlsplit(server)
    r = TcpRelay((url.hostname or "127.0.0.1", url.port or 443))
    r.start()
    yield r
    r.cut()


@pytest.fixture(scope="module")
def gate_kubeconfig(
    testbed: Any, gate_namespace: str, gate_account: str, relay: TcpRelay, tmp_path_factory: Any
) -> str:
    """The testbed's cluster via the relay, as the gate's ServiceAccount (a token, like in a pod)."""
    token = testbed.kubectl("create", "token", gate_account, "-n", gate_namespace, "--duration=1h").stdout.strip()
    kubeconfig = yaml.safe_load(Path(testbed.kubeconfig).read_text())
    cluster = kubeconfig["clusters"][0]
    cluster["cluster"]["server"] = f"https://127.0.0.1:{relay.port}"
    kubeconfig["users"] = [{"name": "gate", "user": {"token": token}}]
    kubeconfig["contexts"] = [{"name": "gate", "context": {"cluster": cluster["name"], "user": "gate"}}]
    kubeconfig["current-context"] = "gate"
    path = tmp_path_factory.mktemp("gate") / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    return str(path)


@pytest.fixture(scope="module")
def openai_server() -> Iterator[Process]:
    server = start_model_server("--tokens-per-second-per-replica", "4000", "--max-concurrency", "8")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gate(
    kube: client.CoreV1Api, gate_namespace: str, openai_server: Process, gate_kubeconfig: str, tmp_path_factory: Any
) -> Iterator[GateProcess]:
    kube.create_namespaced_config_map(gate_namespace, {"metadata": {"name": CONFIG_MAP}, "data": {"max_tokens": "100"}})
    log = tmp_path_factory.mktemp("gate-log") / "gate.log"
    g = start_gate(
        openai_server.url,
        "--kubeconfig",
        gate_kubeconfig,
        "--namespace",
        gate_namespace,
        "--admission-wait",
        "0.2",
        log=log,
    )
    yield g
    g.stop()


def publish(kube: client.CoreV1Api, gate_namespace: str, **data: str | None) -> None:
    kube.patch_namespaced_config_map(CONFIG_MAP, gate_namespace, {"data": data})


def wait_for_gate_metric(gate: GateProcess, name: str, value: float, timeout: float) -> float:
    """Seconds until the gate's metric ``name`` reads ``value``; fails after ``timeout``."""
    start = time.monotonic()
    while gate.metric(name) != value:
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"{name} is {gate.metric(name)}, not {value}, after {elapsed:.1f}s"
        time.sleep(0.02)
    return time.monotonic() - start


def api(gate: GateProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gate.url}/v1", api_key="unused", max_retries=0, timeout=30)


def stream_tokens(gate: GateProcess, max_tokens: int, wanted: int) -> tuple[int, str | None]:
    stream = api(gate).chat.completions.create(
        model="model",
        messages=[{"role": "user", "content": "think hard"}],
        max_tokens=max_tokens,
        stream=True,
        extra_body={"wanted_tokens": wanted},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text.count("tok"), chunks[-1].choices[0].finish_reason


def test_a_published_limit_is_applied_within_2s_and_cuts_streams(
    gate: GateProcess, kube: client.CoreV1Api, gate_namespace: str
) -> None:
    wait_for_gate_metric(gate, "modelbudget_gate_token_limit", 100, timeout=10)
    publish(kube, gate_namespace, max_tokens="25")
    took = wait_for_gate_metric(gate, "modelbudget_gate_token_limit", 25, timeout=APPLY_DEADLINE)
    print(f"limit applied {took:.3f}s after the patch")
    assert stream_tokens(gate, max_tokens=500, wanted=1000) == (25, "length")
    assert stream_tokens(gate, max_tokens=500, wanted=10) == (10, "stop")


def test_prometheus_sees_the_limit_the_gate_applies_per_pod(
    testbed: Any, gate: GateProcess, kube: client.CoreV1Api, gate_namespace: str
) -> None:
    """What the operator reads to tell whether its published limit is enforced, and true demand."""
    publish(kube, gate_namespace, max_tokens="35")
    wait_for_gate_metric(gate, "modelbudget_gate_token_limit", 35, timeout=APPLY_DEADLINE)
    stream_tokens(gate, max_tokens=500, wanted=1000)
    target = scrape(testbed.targets_dir, gate, gate_namespace, "model-0")
    try:
        deadline = time.monotonic() + 60
        query = f'modelbudget_gate_token_limit{{namespace="{gate_namespace}", target="{TARGET}"}}'
        while not (result := testbed.promql(query)):
            assert time.monotonic() < deadline, f"Prometheus never scraped the gate: {query}"
            time.sleep(1)
        assert [(r["metric"]["pod"], float(r["value"][1])) for r in result] == [("model-0", 35.0)]
        arrivals = testbed.promql(f'modelbudget_gate_arrivals_total{{namespace="{gate_namespace}"}}')
        assert float(arrivals[0]["value"][1]) >= 1
    finally:
        target.unlink()


def test_an_unparsable_limit_keeps_the_last_good_one(
    gate: GateProcess, kube: client.CoreV1Api, gate_namespace: str
) -> None:
    publish(kube, gate_namespace, max_tokens="30")
    wait_for_gate_metric(gate, "modelbudget_gate_token_limit", 30, timeout=APPLY_DEADLINE)
    errors = gate.metric("modelbudget_gate_config_errors_total") or 0
    publish(kube, gate_namespace, max_tokens="thirty")
    wait_for_gate_metric(gate, "modelbudget_gate_config_errors_total", errors + 1, timeout=APPLY_DEADLINE)
    assert gate.metric("modelbudget_gate_token_limit") == 30
    assert stream_tokens(gate, max_tokens=500, wanted=1000) == (30, "length")


def test_admission_cap_rejects_the_excess_with_429_and_serves_the_rest(
    gate: GateProcess, kube: client.CoreV1Api, gate_namespace: str
) -> None:
    publish(kube, gate_namespace, max_tokens="20", admitted_rps_per_pod="2")
    wait_for_gate_metric(gate, "modelbudget_gate_admitted_rps", 2, timeout=APPLY_DEADLINE)

    clients = [api(gate) for _ in range(12)]
    go = threading.Barrier(len(clients))

    def one(c: openai.OpenAI) -> tuple[str, Any]:
        go.wait()
        try:
            return "ok", c.completions.create(
                model="model", prompt="x", max_tokens=100, extra_body={"wanted_tokens": 50}
            )
        except openai.RateLimitError as exc:
            return "429", exc

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(one, clients))
    window = time.monotonic() - start
    accepted = [r for kind, r in results if kind == "ok"]
    rejected = [e for kind, e in results if kind == "429"]
    # The bucket: a burst of 2, then 2 per second over the window the requests arrived in, plus one waiter.
    assert 2 <= len(accepted) <= 2 + 2 * window + 1, (len(accepted), window)
    assert len(rejected) == 12 - len(accepted) > 0
    assert all(r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length" for r in accepted)
    for exc in rejected:
        assert int(exc.response.headers["retry-after"]) >= 1
        assert exc.response.json()["error"]["code"] == "rate_limit_exceeded"
    publish(kube, gate_namespace, admitted_rps_per_pod=None)  # the key removed: no cap
    wait_for_gate_metric(gate, "modelbudget_gate_admitted_rps", float("inf"), timeout=APPLY_DEADLINE)


def test_apiserver_unreachable_keeps_the_last_good_limit(
    gate: GateProcess, kube: client.CoreV1Api, gate_namespace: str, relay: TcpRelay
) -> None:
    publish(kube, gate_namespace, max_tokens="40")
    wait_for_gate_metric(gate, "modelbudget_gate_token_limit", 40, timeout=APPLY_DEADLINE)
    relay.cut()
    try:
        publish(kube, gate_namespace, max_tokens="60")  # the gate cannot see this one
        time.sleep(2)
        assert gate.metric("modelbudget_gate_token_limit") == 40
        assert stream_tokens(gate, max_tokens=500, wanted=1000) == (40, "length")
    finally:
        relay.start()
    # Back: it lists again and takes the value published meanwhile.
    wait_for_gate_metric(gate, "modelbudget_gate_token_limit", 60, timeout=15)
    assert stream_tokens(gate, max_tokens=500, wanted=1000) == (60, "length")


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 it signed (openssl): what the chart makes for its webhook Service."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.crt", "tls.key", "tls.csr", "tls.crt"))

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=e2e-webhook-ca",
        "-keyout", str(ca_key), "-out", str(ca),
    )  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "1", "-extfile", str(directory / "san.ext"), "-out", str(cert),
    )  # fmt: skip
    return ca, cert, key


@pytest.fixture(scope="module")
def webhook(testbed: Any, gate_namespace: str, tmp_path_factory: Any) -> Iterator[str]:
    """``modelbudget webhook`` on 127.0.0.1, registered for labelled pods of this test's namespace only."""
    directory = tmp_path_factory.mktemp("webhook")
    ca, cert, key = make_tls(directory)
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("modelbudget")), "webhook", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    name = f"{gate_namespace}-gate"
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "gate.modelbudget.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "timeoutSeconds": 5,
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/mutate",
                    "caBundle": base64.b64encode(ca.read_bytes()).decode(),
                },
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "objectSelector": {"matchLabels": {"modelbudget.dev/gate": "enabled"}},
                # Only this test's namespace: the testbed is shared.
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": gate_namespace}},
            }
        ],
    }
    testbed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(config))
    try:
        yield gate_namespace
    finally:
        testbed.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found", check=False)
        proc.terminate()
        proc.wait(timeout=10)


def test_the_webhook_adds_the_gate_to_pods_of_a_labelled_deployment(
    testbed: Any, kube: client.CoreV1Api, webhook: str
) -> None:
    deployment = yaml.safe_load(DEPLOYMENT)
    deployment["metadata"]["name"] = "webhooked"
    deployment["spec"]["selector"]["matchLabels"] = {"app": "webhooked"}
    deployment["spec"]["template"]["metadata"]["labels"] = {"app": "webhooked", "modelbudget.dev/gate": "enabled"}
    # The apiserver takes a moment to load a new webhook configuration: wait until a dry-run pod is mutated.
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "probe",
            "labels": {"modelbudget.dev/gate": "enabled"},
            "annotations": {"modelbudget.dev/gate-target": "probe"},
        },
        "spec": deployment["spec"]["template"]["spec"],
    }
    deadline = time.monotonic() + 30
    dry_run = ("create", "-n", webhook, "--dry-run=server", "-o", "yaml", "-f", "-")
    # check=False: a fresh namespace may not have its default ServiceAccount yet.
    while "modelbudget-gate" not in testbed.kubectl(*dry_run, stdin=yaml.safe_dump(probe), check=False).stdout:
        assert time.monotonic() < deadline, "the webhook never mutated a pod"
        time.sleep(1)
    testbed.kubectl("apply", "-n", webhook, "-f", "-", stdin=yaml.safe_dump(deployment))
    deadline = time.monotonic() + 60
    while not (pods := kube.list_namespaced_pod(webhook, label_selector="app=webhooked").items):
        assert time.monotonic() < deadline, "the Deployment made no pod"
        time.sleep(1)
    containers = {c.name: c for c in pods[0].spec.containers}
    assert set(containers) == {"vllm", "modelbudget-gate"}
    assert "--target=webhooked" in containers["modelbudget-gate"].args
    assert containers["vllm"].readiness_probe.http_get.port == 8000
    assert pods[0].spec.volumes and any(v.name == "modelbudget-limits" for v in pods[0].spec.volumes)
