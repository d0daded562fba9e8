"""The admission webhook's answer to real-shaped AdmissionReviews of pods a ReplicaSet creates."""

from __future__ import annotations

import base64
import json
from typing import Any

from modelbudget.gate.inject import GATE_CONTAINER, InjectOptions
from modelbudget.gate.webhook import review


def admission(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "operation": "CREATE",
            "namespace": "serving",
            "object": pod,
        },
    }


def pod(**meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "llama-6d4cf56db6-",
            "labels": {"app": "llama", "modelbudget.dev/gate": "enabled", "pod-template-hash": "6d4cf56db6"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "llama-6d4cf56db6", "uid": "x"}
            ],
            **meta,
        },
        "spec": {
            "serviceAccountName": "default",
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.6.3",
                    "ports": [{"name": "http", "containerPort": 8000}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
                }
            ],
        },
    }


def patched_spec(answer: dict[str, Any]) -> dict[str, Any]:
    response = answer["response"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    (op,) = json.loads(base64.b64decode(response["patch"]))
    assert (op["op"], op["path"]) == ("replace", "/spec")
    return dict(op["value"])


def test_a_replicaset_pod_gets_the_gate_for_its_deployment() -> None:
    answer = review(admission(pod()), InjectOptions(image="registry.example/mb:1"))
    assert answer["kind"] == "AdmissionReview" and answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    spec = patched_spec(answer)
    gate = next(c for c in spec["containers"] if c["name"] == GATE_CONTAINER)
    assert "--target=llama" in gate["args"] and "--config-map=llama-token-limit" in gate["args"]
    assert gate["image"] == "registry.example/mb:1"
    assert spec["containers"][0]["readinessProbe"]["httpGet"]["port"] == 8000
    assert spec["serviceAccountName"] == "default"  # the webhook creates no ServiceAccount, so it keeps the pod's


def test_the_annotation_names_the_target_and_an_injected_pod_is_left_alone() -> None:
    spec = patched_spec(review(admission(pod(annotations={"modelbudget.dev/gate-target": "big"})), InjectOptions()))
    gate = next(c for c in spec["containers"] if c["name"] == GATE_CONTAINER)
    assert "--target=big" in gate["args"]
    injected = pod()
    injected["spec"] = spec
    assert review(admission(injected), InjectOptions())["response"] == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }


def test_what_it_cannot_inject_is_admitted_unchanged_with_a_warning() -> None:
    orphan = pod(ownerReferences=[])
    response = review(admission(orphan), InjectOptions())["response"]
    assert response["allowed"] is True and "patch" not in response
    assert "modelbudget.dev/gate-target" in response["warnings"][0]
    garbage = review({"request": {"uid": "u", "object": {"spec": "nonsense"}}}, InjectOptions())["response"]
    assert garbage["allowed"] is True and garbage["warnings"]
