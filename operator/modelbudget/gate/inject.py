"""``modelbudget inject``: put the gate into a Deployment's pods, as ``linkerd inject`` does. Pure: dicts in and out.

For each Deployment (alone or in a ``List``) the pod template gets:

- the gate container (the operator's image, ``modelbudget gate``), listening on a new port
  that takes over the *name* of the model server's served port, so a Service whose
  ``targetPort`` is that name now lands on the gate; the model server keeps its port number,
  unnamed, and the gate forwards to it on localhost. Probes of the model server that used
  the port's name now use its number, so they still reach the model server directly;
- a Service in the same input that selects those pods and targets the served port by its
  number is pointed at the port's name instead (the gate);
- the published ConfigMap as an optional volume (the gate's fallback when the API is out);
- a ServiceAccount if the pod has none, and a Role (get/watch/list on that one ConfigMap, by
  resourceNames) with its RoleBinding, so the gate can watch the limit.

Injecting twice changes nothing: an injected template is left as it is, and RBAC objects
already in the input are not emitted again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from modelbudget import __version__
from modelbudget.gate import GATE_PORT, METRICS_PORT

GATE_CONTAINER = "modelbudget-gate"
LIMITS_VOLUME = "modelbudget-limits"
LIMITS_MOUNT = "/etc/modelbudget/limits"
METRICS_PORT_NAME = "gate-metrics"
DEFAULT_IMAGE = f"modelbudget/operator:{__version__}"
DEFAULT_PORT_NAME = "http"
MANAGED_BY = {"app.kubernetes.io/managed-by": "modelbudget-inject"}
SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

Manifest = dict[str, Any]


class InjectError(ValueError):
    """A manifest the gate cannot be injected into; the message says what to change."""


@dataclass(frozen=True)
class InjectOptions:
    image: str = DEFAULT_IMAGE
    container: str | None = None  # the model server's container (default: the first)
    port: str | None = None  # the served port, by name or number (default: the container's first)
    gate_port: int = GATE_PORT
    metrics_port: int = METRICS_PORT
    config_map: str | None = None  # default: <deployment>-token-limit
    limit_key: str | None = None
    default_max_tokens: int | None = None
    namespace: str | None = None  # for the RBAC objects when the Deployment names none


def inject(docs: list[Manifest], options: InjectOptions) -> tuple[list[Manifest], list[str]]:
    """Inject every Deployment in ``docs``; returns the new documents and notes for the user."""
    notes: list[str] = []
    present = {_key(d) for d in _objects(docs)}
    served: list[_Served] = []
    out: list[Manifest] = []
    for doc in docs:
        if doc.get("kind") == "List":
            items = list(doc.get("items") or [])
            new_items = [i for item in items for i in _one(item, options, present, served, notes)]
            out.append({**doc, "items": new_items})
        else:
            out.extend(_one(doc, options, present, served, notes))
    for service in _objects(out):
        if service.get("kind") == "Service" and service.get("apiVersion") == "v1":
            _retarget(service, served, options, notes)
    return out, notes


@dataclass(frozen=True)
class _Served:
    """A gated Deployment's pods: where a Service that reaches them must now point."""

    namespace: str
    labels: dict[str, str]
    model_port: int
    port_name: str


def _retarget(service: Manifest, served: list[_Served], options: InjectOptions, notes: list[str]) -> None:
    namespace = (service.get("metadata") or {}).get("namespace") or options.namespace
    selector = (service.get("spec") or {}).get("selector") or {}
    for pods in served:
        if namespace != pods.namespace or not selector or not selector.items() <= pods.labels.items():
            continue
        for port in (service.get("spec") or {}).get("ports") or []:
            if port.get("targetPort", port.get("port")) == pods.model_port:
                port["targetPort"] = pods.port_name
                notes.append(
                    f"Service {service['metadata'].get('name')}: targetPort {pods.model_port} -> {pods.port_name!r} "
                    "(the gate)"
                )


def _objects(docs: list[Manifest]) -> list[Manifest]:
    return [i for d in docs for i in (d.get("items") or [] if d.get("kind") == "List" else [d])]


def _key(obj: Manifest) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (str(obj.get("apiVersion")), str(obj.get("kind")), str(meta.get("namespace", "")), str(meta.get("name")))


def _one(
    doc: Manifest,
    options: InjectOptions,
    present: set[tuple[str, str, str, str]],
    served: list[_Served],
    notes: list[str],
) -> list[Manifest]:
    if doc.get("kind") != "Deployment" or not str(doc.get("apiVersion", "")).startswith("apps/"):
        return [doc]
    deployment = copy.deepcopy(doc)
    name = deployment["metadata"]["name"]
    namespace = deployment["metadata"].get("namespace") or options.namespace
    if not namespace:
        # A RoleBinding's ServiceAccount subject must name its namespace.
        raise InjectError(f"Deployment {name} names no namespace: give --namespace")
    config_map = options.config_map or f"{name}-token-limit"
    pod = deployment["spec"]["template"]["spec"]
    gate = next((c for c in pod.get("containers") or [] if c.get("name") == GATE_CONTAINER), None)
    if gate is None:
        model_port, port_name = inject_pod(pod, name, config_map, options, notes)
    else:  # already injected: the upstream and the gate's served port say where things are
        upstream = next(a for a in gate.get("args", []) if a.startswith("--upstream="))
        model_port, port_name = int(upstream.rpartition(":")[2]), gate["ports"][0]["name"]
    labels = (deployment["spec"]["template"].get("metadata") or {}).get("labels") or {}
    served.append(_Served(namespace, labels, model_port, port_name))
    extra = _rbac(name, namespace, config_map, pod)
    fresh = [obj for obj in extra if _key(obj) not in present]
    present.update(_key(obj) for obj in fresh)
    return [deployment, *fresh]


def inject_pod(
    pod: Manifest,
    target: str,
    config_map: str,
    options: InjectOptions,
    notes: list[str],
    *,
    own_service_account: bool = True,
) -> tuple[int, str]:
    """Add the gate to the pod spec ``pod``; returns the model server's port and the served port's name.

    ``own_service_account``: give a pod without one the gate's ServiceAccount (which ``inject``
    emits); the admission webhook cannot create it and leaves the pod's as it is.
    """
    containers = pod.get("containers") or []
    if not containers:
        raise InjectError(f"Deployment {target} has no containers")
    model = (
        next((c for c in containers if c.get("name") == options.container), None)
        if options.container
        else containers[0]
    )
    if model is None:
        raise InjectError(f"Deployment {target} has no container named {options.container!r}")
    served = _served_port(model, options.port, target)
    had_name = "name" in served
    port_name = served.pop("name", None) or DEFAULT_PORT_NAME
    model_port = int(served["containerPort"])
    if any(options.gate_port == int(p.get("containerPort", -1)) for c in containers for p in c.get("ports") or []):
        raise InjectError(f"Deployment {target}: port {options.gate_port} is taken; choose another with --gate-port")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        action = (model.get(probe) or {}).get("httpGet") or (model.get(probe) or {}).get("tcpSocket")
        if action is not None and action.get("port") == port_name:
            action["port"] = model_port  # the name now belongs to the gate; the probe still checks the model server
    if not had_name:
        notes.append(
            f"Deployment {target}: its served port {model_port} had no name; the gate's port is named "
            f"{port_name!r}: a Service must target {port_name!r} for traffic to go through the gate"
        )
    args = [
        f"--target={target}",
        f"--listen=0.0.0.0:{options.gate_port}",
        f"--upstream=http://127.0.0.1:{model_port}",
        f"--metrics-listen=0.0.0.0:{options.metrics_port}",
        f"--config-map={config_map}",
        f"--limits-dir={LIMITS_MOUNT}",
    ]
    if options.limit_key:
        args.append(f"--limit-key={options.limit_key}")
    if options.default_max_tokens:
        args.append(f"--default-max-tokens={options.default_max_tokens}")
    if pod.get("automountServiceAccountToken") is False:
        notes.append(
            f"Deployment {target}: automountServiceAccountToken is false; the gate reads the mounted file only"
        )
        args.append("--no-watch")
    containers.append(
        {
            "name": GATE_CONTAINER,
            "image": options.image,
            "command": ["modelbudget", "gate"],
            "args": args,
            "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
            "ports": [
                {"name": port_name, "containerPort": options.gate_port, "protocol": "TCP"},
                {"name": METRICS_PORT_NAME, "containerPort": options.metrics_port, "protocol": "TCP"},
            ],
            # Ready once it knows a limit (it answers 503 before); alive while it listens.
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": METRICS_PORT_NAME}, "periodSeconds": 5},
            "livenessProbe": {"tcpSocket": {"port": METRICS_PORT_NAME}, "periodSeconds": 10},
            "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}},
            "securityContext": SECURITY_CONTEXT,
            "volumeMounts": [{"name": LIMITS_VOLUME, "mountPath": LIMITS_MOUNT, "readOnly": True}],
        }
    )
    # Optional: pods start before the operator first publishes; the watch picks the limit up then.
    volume = {"name": LIMITS_VOLUME, "configMap": {"name": config_map, "optional": True}}
    pod["volumes"] = [*(v for v in pod.get("volumes") or [] if v.get("name") != LIMITS_VOLUME), volume]
    if own_service_account and pod.get("serviceAccountName") in (None, "", "default"):
        pod["serviceAccountName"] = _gate_name(target)
        pod.pop("serviceAccount", None)  # the deprecated alias would contradict it
    return model_port, port_name


def _served_port(container: Manifest, wanted: str | None, target: str) -> Manifest:
    ports = container.get("ports") or []
    if wanted is None:
        if not ports:
            raise InjectError(f"Deployment {target}: container {container.get('name')} declares no port; give --port")
        port: Manifest = ports[0]
        return port
    for p in ports:
        if p.get("name") == wanted or str(p.get("containerPort")) == wanted:
            found: Manifest = p
            return found
    if wanted.isdigit():
        new = {"containerPort": int(wanted)}
        container["ports"] = [*ports, new]
        return new
    raise InjectError(f"Deployment {target}: container {container.get('name')} has no port {wanted!r}")


def _gate_name(target: str) -> str:
    return f"{target}-modelbudget-gate"


def _rbac(target: str, namespace: str, config_map: str, pod: Manifest) -> list[Manifest]:
    name = _gate_name(target)
    account = pod.get("serviceAccountName") or name
    meta: Manifest = {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)}
    objects: list[Manifest] = []
    if account == name:
        objects.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)})
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": [config_map],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        }
    )
    subject: Manifest = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [subject],
        }
    )
    return objects
