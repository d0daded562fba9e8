"""``modelbudget replay -f budget.yaml --since 7d``: what the budget would have done to real traffic.

Reads the ModelBudget's own queries (``spec.metrics.queries``, rendered as the operator renders
them, with ``$window`` set to the replay's rate window) over the range from Prometheus, rebuilds
the requests they show (``modelbudget.sim.history``), replays them through the simulator against
every policy like ``simulate``, and sets beside that what actually ran: spend, replicas and nodes
read from the same Prometheus.  There is no cluster to read Secrets from, so credentials come
from files (``--bearer-token-file``, ``--basic-auth-password-file``, ``--ca-file``).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelbudget.adapters.history import Grid, Labels, PrometheusHistory, RangeSource, fetch, single
from modelbudget.adapters.metrics import PrometheusCredentials, QueryFailed, redact_url, render_query
from modelbudget.api import ModelBudget
from modelbudget.cli import CliError
from modelbudget.cli.common import load_manifest
from modelbudget.cli.simulate import (
    add_simulator_arguments,
    check_positive,
    config_from,
    parse_policies,
    replay_and_report,
    wide_console,
    write_results,
)
from modelbudget.core.capacity import node_price
from modelbudget.core.curve import resolve_curve
from modelbudget.core.planner import token_bounds
from modelbudget.sim.history import History, extent, fill_gaps, missing_runs, rebuild
from modelbudget.sim.metrics import window_seconds
from modelbudget.sim.trace import TraceError

FloatArray = npt.NDArray[np.float64]
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d|w)")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}

# What actually ran, first source with data wins: the operator's own metrics (a budget in
# Recommend mode exports them), then kube-state-metrics.  ``$namespace``, ``$name`` (the
# ModelBudget), ``$target`` (the Deployment), ``$pool`` and ``$nodeSelector`` are substituted.
ACTUAL_SPEND = ('sum(modelbudget_spend_dollars_per_hour{namespace="$namespace",name="$name"})',)
ACTUAL_REPLICAS = (
    'sum(modelbudget_replicas{namespace="$namespace",name="$name",state="current"})',
    'sum(kube_deployment_status_replicas{namespace="$namespace",deployment="$target"})',
)
ACTUAL_NODES = (
    'sum(modelbudget_nodes{namespace="$namespace",name="$name",pool="$pool",state="current"})',
    "count(kube_node_labels{$nodeSelector})",
)


def parse_duration(text: str) -> float:
    """``90m``, ``36h``, ``7d``, ``2w`` in seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise CliError(f"{text!r} is not a duration like 90m, 36h, 7d or 2w")
    return float(match.group(1)) * _UNIT[match.group(2)]


def _time(text: str, flag: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CliError(f"{flag} {text!r} is not an ISO 8601 time") from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replay", help="replay a ModelBudget on its own Prometheus history, against every policy")
    p.add_argument("-f", "--file", required=True, help="a ModelBudget manifest")
    p.add_argument("--prometheus", help="Prometheus base URL (default: spec.metrics.prometheusUrl)")
    p.add_argument("--since", help="the range ending now: 90m, 36h, 7d, 2w")
    p.add_argument("--start", help="start of the range, ISO 8601 (with --end)")
    p.add_argument("--end", help="end of the range, ISO 8601 (with --start)")
    p.add_argument(
        "--resolution", default="15s", help="step of the range queries (default 15s; at least the scrape interval)"
    )
    p.add_argument("--window", help="rate window substituted for $window (default: two steps)")
    p.add_argument("--reasoning-factor", type=float, default=1.0, help="wanted tokens W = generated x F (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times and request sizes drawn")
    auth = p.add_argument_group("Prometheus access (files, so that no secret shows in the process list)")
    auth.add_argument("--bearer-token-file", help="a file holding the bearer token")
    auth.add_argument("--basic-auth-user", help="basic-auth user name (with --basic-auth-password-file)")
    auth.add_argument("--basic-auth-password-file", help="a file holding the basic-auth password")
    auth.add_argument("--ca-file", help="CA bundle (PEM) for https")
    auth.add_argument("--insecure-skip-verify", action="store_true", help="do not verify the server's certificate")
    auth.add_argument("--query-timeout", type=float, default=60.0, help="seconds per range query (default 60)")
    add_simulator_arguments(p)
    p.set_defaults(func=run)


def _read_secret(path: str, flag: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise CliError(f"{flag}: cannot read {path}: {exc.strerror}") from exc
    if not value:
        raise CliError(f"{flag}: {path} is empty")
    return value


def credentials_from(args: argparse.Namespace) -> PrometheusCredentials:
    if (args.basic_auth_user is None) != (args.basic_auth_password_file is None):
        raise CliError("--basic-auth-user and --basic-auth-password-file go together")
    if args.bearer_token_file and args.basic_auth_user:
        raise CliError("give either a bearer token or basic auth, not both")
    if args.ca_file and not Path(args.ca_file).is_file():
        raise CliError(f"--ca-file: {args.ca_file} does not exist")
    token = _read_secret(args.bearer_token_file, "--bearer-token-file") if args.bearer_token_file else None
    basic = (
        (args.basic_auth_user, _read_secret(args.basic_auth_password_file, "--basic-auth-password-file"))
        if args.basic_auth_user
        else None
    )
    return PrometheusCredentials(bearer_token=token, basic_auth=basic, ca_bundle_path=args.ca_file)


def grid_from(args: argparse.Namespace, now: datetime) -> Grid:
    step = parse_duration(args.resolution)
    if step < 1 or step != int(step):
        raise CliError(f"--resolution must be whole seconds, at least 1s (got {args.resolution})")
    if args.since and (args.start or args.end):
        raise CliError("give --since, or --start and --end, not both")
    if args.since:
        end, start = now, now - timedelta(seconds=parse_duration(args.since))
    elif args.start and args.end:
        start, end = _time(args.start, "--start"), _time(args.end, "--end")
    else:
        raise CliError("which range? give --since (e.g. 7d), or --start and --end")
    first = math.floor(start.timestamp() / step) * step
    last = math.ceil(end.timestamp() / step) * step
    if last - first < 2 * step:
        raise CliError(f"the range is shorter than two steps of {step:g}s")
    return Grid(int(first), int(last), int(step))


@dataclass(frozen=True)
class Fetched:
    history: History
    notes: list[str]


class Reader:
    """Runs range queries over one grid with one progress bar for all of them."""

    def __init__(self, source: RangeSource, grid: Grid, progress: Callable[[int], None]) -> None:
        self.source, self.grid, self.progress = source, grid, progress

    def series(self, query: str) -> dict[Labels, FloatArray]:
        return fetch(self.source, query, self.grid, self.progress)

    def one(self, query: str) -> FloatArray | None:
        return single(self.series(query), self.grid)


def _optional(read: Callable[[], FloatArray | None], what: str, notes: list[str]) -> FloatArray | None:
    try:
        values = read()
    except QueryFailed as exc:
        notes.append(f"{what}: query failed ({exc}); treated as missing")
        return None
    if values is None or np.all(np.isnan(values)):
        notes.append(f"{what}: no data in this range")
        return None
    return values


def _histogram(series: dict[Labels, FloatArray]) -> tuple[FloatArray, FloatArray] | None:
    """``(finite bounds, cumulative rates with +Inf last)`` from a ``sum by (le)`` answer."""
    by_le: dict[float, FloatArray] = {}
    for labels, values in series.items():
        try:
            by_le[float(dict(labels).get("le", "none"))] = values
        except ValueError:
            continue
    if math.inf not in by_le or len(by_le) < 2:
        return None
    bounds = sorted(b for b in by_le if math.isfinite(b))
    matrix = np.stack([by_le[b] for b in [*bounds, math.inf]], axis=1)
    return np.asarray(bounds, dtype=float), matrix


# Not among the spec's queries (the operator has no per-tick use for it): replay rebuilds arrivals
# from how many requests are in the server, waiting or running.
RUNNING_REQUESTS = "sum(vllm:num_requests_running{$selector})"


def read_history(manifest: ModelBudget, reader: Reader, window: str) -> Fetched:
    spec, namespace = manifest.spec, manifest.metadata.namespace or "default"
    metrics = spec.metrics.model_copy(update={"window": window})
    q = spec.metrics.queries
    notes: list[str] = []

    def query(template: str) -> str:
        return render_query(template, metrics, namespace, spec.target_ref.name)

    try:
        rate = reader.one(query(q.request_rate))
    except QueryFailed as exc:
        raise CliError(f"request rate: {exc}") from exc
    if rate is None:
        raise CliError(
            f"the request-rate query returned no series in this range: {query(q.request_rate)} "
            "(check spec.metrics.selector, the range, and that --resolution is at least the scrape interval)"
        )

    def one(template: str) -> Callable[[], FloatArray | None]:
        return lambda: reader.one(query(template))

    optional = {
        name: _optional(one(template), name, notes)
        for name, template in (
            ("truncated requests", q.truncated_request_rate),
            ("prompt tokens", q.prompt_tokens_rate),
            ("generated tokens", q.generation_tokens_rate),
            ("waiting requests", q.requests_waiting),
            ("running requests", RUNNING_REQUESTS),
        )
    }
    histogram = None
    try:
        histogram = _histogram(reader.series(query(q.generation_tokens_histogram)))
    except QueryFailed as exc:
        notes.append(f"generation-length histogram: query failed ({exc})")
    else:
        if histogram is None:
            notes.append(
                f"generation-length histogram: no buckets with le=+Inf from {query(q.generation_tokens_histogram)}"
            )
    history = History(
        start=datetime.fromtimestamp(reader.grid.start, UTC),
        step=float(reader.grid.step),
        request_rate=rate,
        window=window_seconds(window),
        truncated_rate=optional["truncated requests"],
        prompt_tokens_rate=optional["prompt tokens"],
        generation_tokens_rate=optional["generated tokens"],
        histogram_bounds=histogram[0] if histogram else None,
        histogram=histogram[1] if histogram else None,
        requests_waiting=optional["waiting requests"],
        requests_running=optional["running requests"],
    )
    return Fetched(history, notes)


def covered(fetched: Fetched, actual: Actual) -> tuple[History, Actual]:
    """The steps from the first to the last request rate Prometheus has: outside them is no data,
    not a rate to extrapolate (a history shorter than --since)."""
    history = fetched.history
    span = extent(history.request_rate)
    if span is None:
        return history, actual
    first, last = max(span[0] - 1, 0), span[1]  # one step before the first rate: the reference point
    if (first, last) == (0, history.request_rate.size - 1):
        return history, actual
    trimmed = history.between(first, last + 1)
    end = trimmed.start + timedelta(seconds=trimmed.step * (trimmed.request_rate.size - 1))
    fetched.notes.append(
        f"Prometheus has the request rate from {trimmed.start.isoformat()} to {end.isoformat()} only: "
        "the replay covers that"
    )

    def cut(values: FloatArray | None) -> FloatArray | None:
        return None if values is None else values[first : last + 1]

    return trimmed, Actual(cut(actual.spend), cut(actual.replicas), cut(actual.nodes), actual.sources)


@dataclass(frozen=True)
class Actual:
    """What ran, per step: spend rate, replicas, nodes (``None`` where Prometheus does not say)."""

    spend: FloatArray | None
    replicas: FloatArray | None
    nodes: FloatArray | None
    sources: dict[str, str]


def _first_with_data(reader: Reader, queries: list[str]) -> tuple[FloatArray, str] | None:
    for text in queries:
        try:
            values = reader.one(text)
        except QueryFailed:
            continue
        if values is not None and not np.all(np.isnan(values)):
            return fill_gaps(values), text
    return None


def read_actual(manifest: ModelBudget, reader: Reader) -> Actual:
    spec = manifest.spec
    names = {
        "namespace": manifest.metadata.namespace or "default",
        "name": manifest.metadata.name,
        "target": spec.target_ref.name,
    }

    def fill(template: str, **extra: str) -> str:
        return Template(template).safe_substitute(names | extra)

    sources: dict[str, str] = {}
    replicas = _first_with_data(reader, [fill(t) for t in ACTUAL_REPLICAS])
    if replicas:
        sources["replicas"] = replicas[1]
    total_nodes: FloatArray | None = None
    priced: FloatArray | None = np.zeros(reader.grid.size)
    for pool in spec.node_pools:
        selector = ",".join(
            f'label_{re.sub("[^A-Za-z0-9]", "_", k)}="{v}"'
            for k, v in (pool.node_selector or {"modelbudget.dev/pool": pool.name}).items()
        )
        found = _first_with_data(reader, [fill(t, pool=pool.name, nodeSelector=selector) for t in ACTUAL_NODES])
        if found is None:
            priced = None
            continue
        sources[f"nodes {pool.name}"] = found[1]
        total_nodes = found[0] if total_nodes is None else total_nodes + found[0]
        if priced is not None:
            priced = priced + found[0] * node_price(pool)
    spend = _first_with_data(reader, [fill(t) for t in ACTUAL_SPEND])
    if spend:
        sources["spend"] = spend[1]
        spend_rate: FloatArray | None = spend[0]
    elif priced is not None and total_nodes is not None:
        sources["spend"] = "nodes x spec.nodePools[].pricePerGpuHour x gpusPerNode"
        spend_rate = priced
    else:
        spend_rate = None
    return Actual(spend_rate, replicas[0] if replicas else None, total_nodes, sources)


def actual_table(actual: Actual, step: float, console: Console) -> dict[str, Any]:
    """Print what ran over the range (from step 1 on: step 0 is the reference point); the JSON of it."""
    step_hours = step / 3600.0
    row: dict[str, Any] = {}
    if actual.spend is not None:
        row["dollars"] = float(np.sum(actual.spend[1:]) * step_hours)
        row["spendPerHourMean"] = float(np.mean(actual.spend[1:]))
        row["spendPerHourMax"] = float(np.max(actual.spend[1:]))
    for name, values in (("replicas", actual.replicas), ("nodes", actual.nodes)):
        if values is not None:
            row[f"{name}Mean"] = float(np.mean(values[1:]))
            row[f"{name}Max"] = float(np.max(values[1:]))
    table = Table(title="what actually ran (read from Prometheus)", show_header=True, header_style="bold")
    columns = (
        ("dollars", "dollars", "{:.2f}"),
        ("spend $/h mean", "spendPerHourMean", "{:.2f}"),
        ("spend $/h max", "spendPerHourMax", "{:.2f}"),
        ("replicas mean", "replicasMean", "{:.1f}"),
        ("replicas max", "replicasMax", "{:.0f}"),
        ("nodes mean", "nodesMean", "{:.1f}"),
        ("nodes max", "nodesMax", "{:.0f}"),
    )
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    table.add_row(*(fmt.format(row[key]) if key in row else "not in Prometheus" for _, key, fmt in columns))
    console.print(table)
    for what, query in actual.sources.items():
        console.print(f"[dim]{what}: {query}[/dim]")
    if not actual.sources:
        console.print(
            "[dim]no spend, replica or node series found (the operator's modelbudget_* metrics or "
            "kube-state-metrics)[/dim]"
        )
    return row | {"sources": actual.sources}


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.file)
    spec = manifest.spec
    policies = parse_policies(args.policies)
    check_positive(args, "reasoning_factor")
    grid = grid_from(args, datetime.now(UTC))
    window = args.window or f"{2 * grid.step}s"
    if not re.fullmatch(r"[0-9]+(s|m|h)", window):
        raise CliError(f"--window {window!r} is not a Prometheus range like 30s or 2m")
    url = args.prometheus or spec.metrics.prometheus_url
    credentials = credentials_from(args)
    console = wide_console()
    if spec.metrics.auth is not None and credentials.bearer_token is None and credentials.basic_auth is None:
        console.print(
            "[yellow]spec.metrics.auth names a Secret, which replay cannot read: pass "
            "--bearer-token-file or --basic-auth-user/--basic-auth-password-file[/yellow]"
        )
    source = PrometheusHistory(
        url,
        credentials,
        insecure_skip_verify=args.insecure_skip_verify or spec.metrics.insecure_skip_verify,
        timeout=args.query_timeout,
    )
    start = datetime.fromtimestamp(grid.start, UTC)
    queries = 7 + 3 + 2 * len(spec.node_pools)  # the demand queries, then at most this many for what ran
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"reading {redact_url(url)}", total=queries * grid.size)
        reader = Reader(source, grid, lambda points: bar.advance(task, points))
        fetched = read_history(manifest, reader, window)
        actual = read_actual(manifest, reader)
    history, actual = covered(fetched, actual)
    upper = float(token_bounds(spec, resolve_curve(spec.curve))[1])
    start = history.start
    try:
        trace = rebuild(history, upper, args.seed, name=f"prometheus-{start:%Y%m%dT%H%M}")
    except TraceError as exc:
        raise CliError(str(exc)) from exc
    for note in fetched.notes:
        console.print(f"[yellow]{note}[/yellow]")
    gaps = missing_runs(history.request_rate[1:])
    config = config_from(args, start)
    out = Path(args.out)
    from modelbudget.sim.plot import Observed  # matplotlib is slow to import: only when drawing

    times = np.arange(history.request_rate.size, dtype=np.float64) * history.step
    observed = Observed(times, actual.spend, actual.replicas)
    summary = replay_and_report(
        console, manifest, trace, [args.reasoning_factor], config, policies, out, observed, args.jobs
    )
    ran = actual_table(actual, history.step, console)
    document = {
        "spec": manifest.metadata.name,
        "prometheus": redact_url(url),
        "range": {
            "start": start.isoformat(),
            "end": (start + timedelta(seconds=history.step * (history.request_rate.size - 1))).isoformat(),
            "stepSeconds": grid.step,
            "rateWindow": window,
            "gapSteps": sum(b - a for a, b in gaps),
        },
        "notes": list(trace.notes) + fetched.notes,
        "config": asdict(config),
        "runs": summary,
        "actual": ran,
    }
    write_results(console, out, f"{manifest.metadata.name}-{trace.name}", document)
    return 0
