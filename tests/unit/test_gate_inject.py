"""``modelbudget inject`` on real manifests: a vLLM Deployment and its Service, and `kubectl get -o yaml` output."""

from __future__ import annotations

import io
from typing import Any

import pytest
import yaml

from modelbudget.cli import main
from modelbudget.gate.inject import GATE_CONTAINER, InjectOptions, inject

VLLM = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: llama
  namespace: serving
spec:
  replicas: 2
  selector:
    matchLabels: {app: llama}
  template:
    metadata:
      labels: {app: llama, tier: gpu}
    spec:
      containers:
        - name: vllm
          image: vllm/vllm-openai:v0.6.3
          args: ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--port", "8000"]
          ports:
            - {name: http, containerPort: 8000}
          readinessProbe:
            httpGet: {path: /health, port: http}
          resources:
            limits: {nvidia.com/gpu: "1"}
---
apiVersion: v1
kind: Service
metadata: {name: llama, namespace: serving}
spec:
  selector: {app: llama}
  ports: [{port: 80, targetPort: 8000}]
"""

# What `kubectl get deploy -o yaml` prints for two Deployments: a List with server-set fields.
KUBECTL_LIST = """
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata:
    name: small
    namespace: team-a
    uid: 5d1c2a7e-0000-4000-8000-000000000001
    resourceVersion: "4711"
    generation: 3
  spec:
    selector: {matchLabels: {app: small}}
    template:
      metadata: {labels: {app: small}}
      spec:
        serviceAccountName: small-runner
        containers:
        - name: server
          image: ghcr.io/example/tgi:2
          ports: [{containerPort: 80, protocol: TCP}]
  status: {replicas: 1, readyReplicas: 1}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: unrelated, namespace: team-a}
  data: {a: b}
"""


def load(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    flat = [i for d in docs for i in (d["items"] if d["kind"] == "List" else [d])]
    return [d for d in flat if d["kind"] == kind]


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def test_vllm_deployment_gets_the_gate_the_port_swap_and_rbac() -> None:
    out, notes = inject(load(VLLM), InjectOptions())
    deployment = by_kind(out, "Deployment")[0]
    c = containers(deployment)
    gate, vllm = c[GATE_CONTAINER], c["vllm"]
    assert gate["command"] == ["modelbudget", "gate"]
    assert "--upstream=http://127.0.0.1:8000" in gate["args"] and "--target=llama" in gate["args"]
    assert "--config-map=llama-token-limit" in gate["args"]
    assert gate["env"] == [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    # The port name the Service may target moved to the gate; the model server keeps its number.
    assert gate["ports"][0] == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    assert vllm["ports"] == [{"containerPort": 8000}]
    assert vllm["readinessProbe"]["httpGet"]["port"] == 8000  # still probes the model server itself
    assert vllm["args"] == ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--port", "8000"]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["volumes"] == [
        {"name": "modelbudget-limits", "configMap": {"name": "llama-token-limit", "optional": True}}
    ]
    assert spec["serviceAccountName"] == "llama-modelbudget-gate"
    # The Service targeted the port by number: it now targets the gate by name.
    assert by_kind(out, "Service")[0]["spec"]["ports"] == [{"port": 80, "targetPort": "http"}]
    (account,) = by_kind(out, "ServiceAccount")
    (role,) = by_kind(out, "Role")
    (binding,) = by_kind(out, "RoleBinding")
    assert account["metadata"]["namespace"] == role["metadata"]["namespace"] == "serving"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["llama-token-limit"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llama-modelbudget-gate", "namespace": "serving"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert any("targetPort 8000 -> 'http'" in n for n in notes)


def test_injecting_twice_changes_nothing() -> None:
    once, _ = inject(load(VLLM), InjectOptions())
    twice, _ = inject(once, InjectOptions())
    assert twice == once
    list_once, _ = inject(load(KUBECTL_LIST), InjectOptions())
    assert inject(list_once, InjectOptions())[0] == list_once


def test_kubectl_list_keeps_its_shape_and_the_deployments_own_service_account() -> None:
    out, notes = inject(load(KUBECTL_LIST), InjectOptions(config_map="small-limits", limit_key="limit"))
    (lst,) = out
    assert lst["kind"] == "List"
    assert [i["kind"] for i in lst["items"]] == ["Deployment", "Role", "RoleBinding", "ConfigMap"]
    deployment = lst["items"][0]
    assert deployment["metadata"]["uid"] and deployment["status"]  # untouched server fields
    gate = containers(deployment)[GATE_CONTAINER]
    assert "--limit-key=limit" in gate["args"] and "--config-map=small-limits" in gate["args"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "small-runner"
    assert lst["items"][2]["subjects"][0]["name"] == "small-runner"
    # The unnamed port got a name, and the user is told a Service must use it.
    assert gate["ports"][0]["name"] == "http" and any("had no name" in n for n in notes)


@pytest.mark.parametrize(
    ("manifest", "options", "error"),
    [
        (VLLM.replace("namespace: serving\nspec:\n  replicas", "spec:\n  replicas"), InjectOptions(), "--namespace"),
        (VLLM, InjectOptions(container="nope"), "no container named 'nope'"),
        (VLLM, InjectOptions(port="grpc"), "has no port 'grpc'"),
        (VLLM, InjectOptions(gate_port=8000), "port 8000 is taken"),
    ],
)
def test_refuses_what_it_cannot_inject(manifest: str, options: InjectOptions, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        inject(load(manifest), options)


def test_cli_reads_stdin_and_reports_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(VLLM))
    assert main(["inject", "-", "--image", "registry.example/mb:1", "--default-max-tokens", "512"]) == 0
    captured = capsys.readouterr()
    gate = containers(by_kind(load(captured.out), "Deployment")[0])[GATE_CONTAINER]
    assert gate["image"] == "registry.example/mb:1" and "--default-max-tokens=512" in gate["args"]
    assert "targetPort 8000" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO("kind: [unclosed"))
    assert main(["inject", "-"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
