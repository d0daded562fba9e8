"""``modelbudget gate``: the serving-path sidecar (docs/gate.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from modelbudget.cli import CliError
from modelbudget.gate import GATE_PORT, METRICS_PORT

DEFAULT_LISTEN = f"0.0.0.0:{GATE_PORT}"
DEFAULT_UPSTREAM = "http://127.0.0.1:8000"  # vLLM's default port
DEFAULT_METRICS_LISTEN = f"0.0.0.0:{METRICS_PORT}"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from modelbudget.gate.limits import DEFAULT_LIMIT_KEY

    p = sub.add_parser("gate", help="run the gate: clamp token limits and admit requests in front of a model server")
    p.add_argument("--target", required=True, help="the serving Deployment's name (metric label; ConfigMap default)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"host:port the Service targets (default {DEFAULT_LISTEN})")
    p.add_argument("--upstream", default=DEFAULT_UPSTREAM, help=f"the model server (default {DEFAULT_UPSTREAM})")
    p.add_argument(
        "--metrics-listen",
        default=DEFAULT_METRICS_LISTEN,
        help=f"host:port of the gate's own /metrics and /healthz, never forwarded (default {DEFAULT_METRICS_LISTEN})",
    )
    limits = p.add_argument_group("where the limits come from")
    limits.add_argument("--namespace", help="the ConfigMap's namespace (default: $POD_NAMESPACE, else the pod's)")
    limits.add_argument("--config-map", help="the published ConfigMap (default: <target>-token-limit)")
    limits.add_argument(
        "--limit-key", default=DEFAULT_LIMIT_KEY, help="its token-limit key (spec.tokenLimits.publish.configMap.key)"
    )
    limits.add_argument("--no-watch", action="store_true", help="do not watch the ConfigMap through the API")
    limits.add_argument("--kubeconfig", help="default: in-cluster credentials, else $KUBECONFIG")
    limits.add_argument("--limits-dir", type=Path, help="the ConfigMap mounted as a volume (fallback to the watch)")
    limits.add_argument("--limits-poll-interval", type=float, default=1.0, help="seconds between reads of --limits-dir")
    limits.add_argument(
        "--default-max-tokens",
        type=int,
        help="the limit until a published one is read (default: none, answer 503 until then)",
    )
    admission = p.add_argument_group("admission")
    admission.add_argument(
        "--admission-wait", type=float, default=0.5, help="longest wait for an admission token, seconds (then 429)"
    )
    admission.add_argument(
        "--admission-burst-seconds", type=float, default=1.0, help="the bucket holds this many seconds of the rate"
    )
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger completion requests get 413")
    p.add_argument("--upstream-read-timeout", type=float, default=600.0, help="seconds of upstream silence before 504")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise CliError(f"{flag} must be host:port, got {value!r}")
    return host or "0.0.0.0", int(port)


def run(args: argparse.Namespace) -> int:
    from modelbudget.gate.server import GateOptions, serve
    from modelbudget.gate.sources import pod_namespace

    if args.default_max_tokens is not None and args.default_max_tokens < 1:
        raise CliError("--default-max-tokens must be >= 1")
    if args.no_watch and args.limits_dir is None and args.default_max_tokens is None:
        raise CliError("--no-watch needs --limits-dir or --default-max-tokens: the gate would never know a limit")
    if args.admission_wait < 0 or args.admission_burst_seconds <= 0 or args.max_body_bytes < 1:
        raise CliError("--admission-wait must be >= 0, --admission-burst-seconds and --max-body-bytes > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = GateOptions(
        listen=host_port(args.listen, "--listen"),
        metrics_listen=host_port(args.metrics_listen, "--metrics-listen"),
        upstream=args.upstream,
        target=args.target,
        namespace=pod_namespace(args.namespace),
        config_map=args.config_map or f"{args.target}-token-limit",
        limit_key=args.limit_key,
        watch=not args.no_watch,
        kubeconfig=args.kubeconfig,
        limits_dir=args.limits_dir,
        limits_poll_seconds=args.limits_poll_interval,
        default_max_tokens=args.default_max_tokens,
        admission_wait=args.admission_wait,
        admission_burst_seconds=args.admission_burst_seconds,
        max_body_bytes=args.max_body_bytes,
        upstream_read_timeout=args.upstream_read_timeout,
    )
    asyncio.run(serve(options))
    return 0
