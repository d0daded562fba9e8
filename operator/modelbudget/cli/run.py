"""``modelbudget run``: the operator (kopf), with its clients, metrics, probes and leader election."""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

from modelbudget.cli import CliError

DEV_METRICS_ADDR = "127.0.0.1:19300"
DEV_LIVENESS = "http://127.0.0.1:19301/healthz"
GATHER_SECONDS = 0.25  # what a newcomer's first metrics wait for company; a fraction of a tick


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the operator against the current cluster")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; globs like 'team-*' work)",
    )
    where.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster credentials, else $KUBECONFIG")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between reconciles of one ModelBudget")
    p.add_argument(
        "--status-heartbeat",
        type=float,
        default=60.0,
        help="rewrite an unchanged status this often (seconds), to refresh period-to-date spend",
    )
    p.add_argument(
        "--metrics-addr",
        default=DEV_METRICS_ADDR,
        help=f"host:port of the Prometheus endpoint (default {DEV_METRICS_ADDR}; in a Pod: 0.0.0.0:8080)",
    )
    p.add_argument(
        "--liveness",
        default=DEV_LIVENESS,
        help=f"kopf's health endpoint URL (default {DEV_LIVENESS}; in a Pod: http://0.0.0.0:8081/healthz)",
    )
    p.add_argument(
        "--no-leader-election",
        dest="leader_election",
        action="store_false",
        help="act without holding the Lease (only ever with a single operator process)",
    )
    p.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the leader Lease (default $POD_NAMESPACE, else 'default')",
    )
    p.add_argument("--lease-name", default="modelbudget-operator")
    p.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        help="seconds a standby waits on an unrenewed lease before taking over",
    )
    p.add_argument("--identity", default=None, help="this process's name in the Lease (default host-pid-random)")
    p.add_argument(
        "--shards",
        type=int,
        default=os.environ.get("MODELBUDGET_SHARDS", "1"),  # argparse applies type= to it
        help="operator Deployments splitting the ModelBudgets by a hash of namespace/name "
        "(default $MODELBUDGET_SHARDS, else 1)",
    )
    p.add_argument(
        "--shard",
        type=int,
        default=os.environ.get("MODELBUDGET_SHARD", "0"),
        help="which of --shards this process is, from 0; it holds the Lease <lease-name>-shard-<I> "
        "(default $MODELBUDGET_SHARD, else 0)",
    )
    p.add_argument(
        "--inline-cluster-pools",
        choices=("refuse", "allow"),
        default="refuse",
        help="whether a ModelBudget may name a cluster-scoped pool (Karpenter NodePool, KwokNodePool) inline; "
        "'allow' only on a single-tenant cluster, else declare GpuPools (default refuse)",
    )
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true")
    verbosity.add_argument("--debug", action="store_true")
    verbosity.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        # Before the kubernetes client is imported: it reads $KUBECONFIG once, at import, and
        # kopf's login (login_via_client) relies on that default.
        os.environ["KUBECONFIG"] = args.kubeconfig
    # Imported here: `modelbudget fit/plan/crd` must not pay for (or need) kopf and the clients.
    import kopf

    from modelbudget.adapters.capacitybuffer import KubeCapacityBuffers
    from modelbudget.adapters.claims import WatchedPoolClaims
    from modelbudget.adapters.conflicts import KubeConflictFinder
    from modelbudget.adapters.gpupools import KubeGpuPools
    from modelbudget.adapters.kube import KubeClients
    from modelbudget.adapters.lease import KubeLeaseStore
    from modelbudget.adapters.metrics import PrometheusMetrics
    from modelbudget.adapters.nodepools import KubeNodePools
    from modelbudget.adapters.prices import OpenCostPrices
    from modelbudget.adapters.scaler import DeploymentScaler
    from modelbudget.adapters.secrets import KubeSecrets
    from modelbudget.adapters.tokenlimit import KubeTokenLimitSink
    from modelbudget.controller import handlers, memory, telemetry
    from modelbudget.controller.leader import LeaderElector, default_identity
    from modelbudget.controller.pools import PoolReconciler
    from modelbudget.controller.reconciler import Adapters, Reconciler
    from modelbudget.controller.spread import Shard

    memory.tune_allocator()  # before the watch, query and executor threads start
    if args.interval <= 0 or args.status_heartbeat <= 0:
        raise CliError("--interval and --status-heartbeat must be positive")
    try:
        shard = Shard(args.shard, args.shards)
    except ValueError as exc:
        raise CliError(
            f"--shard {args.shard} --shards {args.shards}: needs --shards >= 1 and 0 <= --shard < --shards"
        ) from exc
    if shard.count > 1 and not args.leader_election:
        raise CliError("--shards > 1 needs leader election: each shard's Lease decides who acts on its part")
    kopf.configure(verbose=args.verbose, debug=args.debug, quiet=args.quiet)

    kube = KubeClients.connect(args.kubeconfig)
    # A group query answers every ModelBudget for half an interval, and is refreshed ahead of
    # that: about two queries per template per tick, whatever the number of ModelBudgets, no
    # answer older than half a tick, and no reconcile waiting for one; newcomers (after a start)
    # gather for a moment into one query.
    prometheus = PrometheusMetrics(reuse_seconds=args.interval / 2, gather_seconds=GATHER_SECONDS)
    adapters = Adapters(
        metrics=prometheus,
        secrets=KubeSecrets(kube),
        scaler=DeploymentScaler(kube),
        node_pools=KubeNodePools(kube),
        gpu_pools=KubeGpuPools(kube),
        token_limits=KubeTokenLimitSink(kube),
        conflicts=KubeConflictFinder(kube),
        prices=OpenCostPrices(prometheus),
        capacity_buffers=KubeCapacityBuffers(kube),
    )
    identity = args.identity or default_identity()
    # kopf names itself after $POD_ID, else after getpass.getuser(), which raises for a uid with no
    # passwd entry: the image's user 65532 under a Pod's runAsUser with a read-only root.
    os.environ.setdefault("POD_ID", identity)
    elector = None
    if args.leader_election:
        duration = args.lease_duration
        elector = LeaderElector(
            KubeLeaseStore(kube, args.lease_namespace, shard.lease_name(args.lease_name)),
            identity,
            lease_duration=duration,
            renew_deadline=duration * 2 / 3,
            retry_period=duration / 7.5,
        )
    runtime = handlers.Runtime(
        Reconciler(adapters, timedelta(seconds=args.status_heartbeat), args.inline_cluster_pools == "allow"),
        elector,
        identity,
        PoolReconciler(adapters.node_pools, adapters.gpu_pools),
        WatchedPoolClaims(kube, args.namespace),
        shard,
    )
    registry = kopf.OperatorRegistry()
    # ModelBudgets are watched in each namespace (or once, cluster-wide), GpuPools once.
    handlers.register(registry, runtime, args.interval, watch_streams=max(len(args.namespace), 1) + 1)
    try:
        telemetry.serve(args.metrics_addr)
    except (OSError, ValueError) as exc:
        raise CliError(f"--metrics-addr {args.metrics_addr}: {exc}") from exc

    kopf.run(
        registry=registry,
        standalone=True,  # leadership is the Lease's job, not kopf peering's (controller/leader.py)
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(),
    )
    return 0
