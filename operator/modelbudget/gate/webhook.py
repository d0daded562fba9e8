"""The mutating admission webhook: ``inject``'s pod changes for pods labelled ``modelbudget.dev/gate: enabled``.

The apiserver sends each such pod at creation (an ``AdmissionReview``); the answer adds the
gate as ``modelbudget inject`` would, as a JSONPatch. The target Deployment is the pod's owning
ReplicaSet name without its pod-template hash, or the annotation
``modelbudget.dev/gate-target``. The webhook never refuses a pod (the chart installs it with
``failurePolicy: Ignore`` too): what it cannot inject it admits unchanged, with a warning the
client sees. It cannot create RBAC, so the pod keeps its ServiceAccount; give that account the
Role ``modelbudget inject`` writes, else the gate reads the mounted ConfigMap only.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

from modelbudget.gate.inject import GATE_CONTAINER, InjectError, InjectOptions, inject_pod

SELECTOR_LABEL = "modelbudget.dev/gate"
SELECTOR_VALUE = "enabled"
TARGET_ANNOTATION = "modelbudget.dev/gate-target"


def review(admission_review: dict[str, Any], options: InjectOptions) -> dict[str, Any]:
    """The ``AdmissionReview`` answer to one request (always allowed)."""
    request = admission_review.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    pod = request.get("object") or {}
    try:
        patch, notes = pod_patch(pod, options)
    except (InjectError, AttributeError, KeyError, TypeError, ValueError) as exc:  # a malformed pod included
        response["warnings"] = [f"modelbudget: the gate was not injected: {exc!r}"]
    else:
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        if notes:
            response["warnings"] = [f"modelbudget: {note}" for note in notes]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def pod_patch(pod: dict[str, Any], options: InjectOptions) -> tuple[list[dict[str, Any]], list[str]]:
    """JSONPatch operations that add the gate to ``pod`` (none when it is there already), and notes."""
    spec = pod["spec"]
    if any(c.get("name") == GATE_CONTAINER for c in spec.get("containers") or []):
        return [], []
    target = target_of(pod)
    new_spec, notes = copy.deepcopy(spec), list[str]()
    config_map = options.config_map or f"{target}-token-limit"
    inject_pod(new_spec, target, config_map, options, notes, own_service_account=False)
    return [{"op": "replace", "path": "/spec", "value": new_spec}], notes


def target_of(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    named = (meta.get("annotations") or {}).get(TARGET_ANNOTATION)
    if named:
        return str(named)
    pod_hash = (meta.get("labels") or {}).get("pod-template-hash")
    for owner in meta.get("ownerReferences") or []:
        if owner.get("kind") == "ReplicaSet" and pod_hash and owner.get("name", "").endswith(f"-{pod_hash}"):
            return str(owner["name"]).removesuffix(f"-{pod_hash}")
    raise InjectError(f"no owning Deployment found; set the annotation {TARGET_ANNOTATION}")
