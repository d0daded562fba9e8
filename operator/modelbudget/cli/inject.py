"""``modelbudget inject``: add the gate sidecar and its RBAC to Deployment manifests (docs/gate.md)."""

from __future__ import annotations

import argparse
import sys

import yaml

from modelbudget.cli import CliError
from modelbudget.gate import GATE_PORT, METRICS_PORT
from modelbudget.gate.inject import DEFAULT_IMAGE, InjectError, InjectOptions, inject


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inject",
        help="add the gate sidecar to Deployment manifests",
        description="Reads manifests (a file, or - for stdin: `kubectl get deploy X -o yaml | modelbudget inject -`), "
        "writes them with the gate injected, plus the ServiceAccount/Role/RoleBinding it needs. "
        "Injecting twice changes nothing.",
    )
    p.add_argument("file", help="YAML manifests (several documents or a List); - reads stdin")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"the gate image (the operator's; default {DEFAULT_IMAGE})")
    p.add_argument("--container", help="the model server's container (default: the first)")
    p.add_argument("--port", help="its served port, name or number (default: its first port)")
    p.add_argument("--gate-port", type=int, default=GATE_PORT, help=f"the gate's serving port (default {GATE_PORT})")
    p.add_argument(
        "--metrics-port", type=int, default=METRICS_PORT, help=f"the gate's /metrics port (default {METRICS_PORT})"
    )
    p.add_argument("--config-map", help="the published ConfigMap (default: <deployment>-token-limit)")
    p.add_argument("--limit-key", help="its token-limit key (default max_tokens)")
    p.add_argument("--default-max-tokens", type=int, help="the gate's limit until one is published (default: 503)")
    p.add_argument("-n", "--namespace", help="namespace of the RBAC objects when a Deployment names none")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file).read()  # noqa: SIM115
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise CliError(f"{args.file} is not valid YAML: {exc}") from exc
    if not all(isinstance(d, dict) for d in docs):
        raise CliError(f"{args.file}: every YAML document must be a Kubernetes object")
    options = InjectOptions(
        image=args.image,
        container=args.container,
        port=args.port,
        gate_port=args.gate_port,
        metrics_port=args.metrics_port,
        config_map=args.config_map,
        limit_key=args.limit_key,
        default_max_tokens=args.default_max_tokens,
        namespace=args.namespace,
    )
    try:
        out, notes = inject(docs, options)
    except InjectError as exc:
        raise CliError(str(exc)) from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise CliError(f"{args.file}: a Deployment is malformed ({exc!r})") from exc
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    for note in notes:
        print(f"modelbudget inject: {note}", file=sys.stderr)
    return 0
