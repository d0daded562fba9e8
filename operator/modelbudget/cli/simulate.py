"""``modelbudget simulate -f budget.yaml --trace trace.csv``: replay a trace against every policy."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelbudget.api import ModelBudget
from modelbudget.cli import CliError
from modelbudget.cli.common import load_manifest
from modelbudget.sim.benchmark import COLUMNS, COMPARED, Benchmark, run_benchmark, table_rows
from modelbudget.sim.run import SimConfig
from modelbudget.sim.trace import Columns, Trace, TraceError, read_trace, repeat_daily, stretch
from modelbudget.sim.world import Delays

if TYPE_CHECKING:
    from modelbudget.sim.plot import Observed  # matplotlib is slow to import: only when drawing

DEFAULT_FACTOR = 20.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate", help="replay a request trace against this planner and baseline policies")
    p.add_argument("-f", "--file", required=True, help="a ModelBudget manifest")
    p.add_argument("--trace", required=True, help="CSV (header row) or JSONL with one request per row")
    p.add_argument("--time-column", default="TIMESTAMP", help="arrival: ISO date-time or seconds")
    p.add_argument("--prompt-column", default="ContextTokens")
    p.add_argument("--generated-column", default="GeneratedTokens")
    p.add_argument(
        "--reasoning-factor",
        type=float,
        default=DEFAULT_FACTOR,
        help=f"wanted tokens W = generated x F (default {DEFAULT_FACTOR:g}); factor 1 is also reported",
    )
    add_simulator_arguments(p)
    p.add_argument("--stretch", type=float, default=1.0, help="multiply arrival times (slower demand)")
    p.add_argument(
        "--repeat-daily",
        type=float,
        default=None,
        metavar="HOURS",
        help="tile the trace to HOURS under a diurnal envelope (for Day/Month ceilings)",
    )
    p.add_argument("--trough", type=float, default=0.3, help="envelope's quietest hour, relative to the peak")
    p.add_argument("--seed", type=int, default=0, help="seed of the envelope's thinning")
    p.add_argument(
        "--start",
        default="2023-11-16T00:00:00+00:00",
        help="wall-clock time of the trace's start, ISO 8601 (sets pacing and budget periods)",
    )
    p.add_argument("--skip-factor-one", action="store_true", help="do not also run at reasoning factor 1")
    p.set_defaults(func=run)


def add_simulator_arguments(p: argparse.ArgumentParser) -> None:
    """The simulated cluster and the report: shared by ``simulate`` and ``replay``."""
    p.add_argument("--policies", default=",".join(COMPARED), help=f"comma-separated subset of {','.join(COMPARED)}")
    p.add_argument("--out", default="report", help="directory for the figures and the results (JSON)")
    p.add_argument("--step", type=float, default=5.0, help="simulation step, seconds")
    p.add_argument("--replica-start", type=float, default=60.0, help="seconds from scheduled to serving")
    p.add_argument("--node-provision", type=float, default=120.0, help="seconds from requested to ready")
    p.add_argument("--timeout", type=float, default=None, help="queue timeout, seconds (default: 2 x SLO)")
    p.add_argument("--warmup", type=float, default=600.0, help="unscored replay of the trace's start, seconds")
    p.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="policies simulated at once, each in a process of its own (default: the CPUs, %(default)s)",
    )


def parse_policies(text: str) -> list[str]:
    policies = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(policies) - set(COMPARED)
    if unknown or not policies:
        raise CliError(
            f"--policies: unknown {', '.join(sorted(unknown)) or '(none given)'}; choose from {', '.join(COMPARED)}"
        )
    return policies


def load_trace(args: argparse.Namespace, start: datetime) -> Trace:
    columns = Columns(args.time_column, args.prompt_column, args.generated_column)
    try:
        trace = stretch(read_trace(args.trace, columns), args.stretch)
        if args.repeat_daily is not None:
            day_seconds = (start - start.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
            trace = repeat_daily(trace, args.repeat_daily, args.trough, args.seed, day_seconds)
    except TraceError as exc:
        raise CliError(str(exc)) from exc
    return trace


def check_positive(args: argparse.Namespace, *names: str, zero_ok: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 0 or (value == 0 and name not in zero_ok):
            raise CliError(f"--{name.replace('_', '-')} must be positive, got {value:g}")


def config_from(args: argparse.Namespace, start: datetime) -> SimConfig:
    """The simulated cluster from ``add_simulator_arguments``' flags."""
    check_positive(
        args,
        "step",
        "replica_start",
        "node_provision",
        "warmup",
        "jobs",
        zero_ok=("replica_start", "node_provision", "warmup"),
    )
    return SimConfig(
        step=args.step,
        delays=Delays(args.replica_start, args.node_provision),
        timeout=args.timeout,
        warmup=args.warmup,
        start=start,
    )


def render(bench: Benchmark, console: Console, spec_lines: list[str]) -> None:
    for line in spec_lines:
        console.print(f"[dim]{line}[/dim]")
    table = Table(show_header=True, header_style="bold")
    for col in COLUMNS:
        if col == "policy":  # never squeezed out of a narrow terminal: the rows mean nothing without it
            table.add_column(col, justify="left", no_wrap=True, min_width=max(len(p) for p in COMPARED))
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for row in table_rows(bench):
        table.add_row(*row)
    console.print(table)


def _with_progress(console: Console, label: str, job: Callable[[Callable[[str, float], None]], Benchmark]) -> Benchmark:
    """Run ``job`` with one progress bar per policy (it reports each policy's fraction done)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def tick(policy: str, fraction: float) -> None:
            if policy not in tasks:
                tasks[policy] = bar.add_task(f"{label}: {policy}", total=1.0)
            bar.update(tasks[policy], completed=fraction)

        return job(tick)


def replay_and_report(
    console: Console,
    manifest: ModelBudget,
    trace: Trace,
    factors: list[float],
    config: SimConfig,
    policies: list[str],
    out: Path,
    observed: Observed | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Run the benchmark at each reasoning factor: print its table, draw its figure; the JSON runs."""
    spec = manifest.spec
    summary = []
    for factor in factors:

        def job(tick: Callable[[str, float], None], factor: float = factor) -> Benchmark:
            return run_benchmark(spec, manifest.metadata.name, trace, factor, config, policies, tick, jobs)

        bench = _with_progress(console, f"F={factor:g}", job)
        render(bench, console, bench.describe(spec))
        from modelbudget.sim.plot import plot  # matplotlib is slow to import: only when drawing

        figure = plot(bench, out / f"{manifest.metadata.name}-{trace.name}-F{factor:g}.png", observed)
        console.print(f"wrote {figure}")
        summary.append(
            {
                "reasoningFactor": factor,
                "description": bench.describe(spec),
                "results": [
                    asdict(r) | {"meanScore": r.mean_score, "netValue": r.net_value} for r in bench.results.values()
                ],
            }
        )
    return summary


def write_results(console: Console, out: Path, name: str, document: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"{name}.json"
    results.write_text(json.dumps(document, indent=2, default=str))
    console.print(f"wrote {results}")


def wide_console() -> Console:
    return Console(width=max(Console().width, 150))  # the table is wide; do not squeeze it into 80


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.file)
    try:
        start = datetime.fromisoformat(args.start)
    except ValueError as exc:
        raise CliError(f"--start {args.start!r} is not an ISO 8601 time") from exc
    start = start if start.tzinfo is not None else start.replace(tzinfo=UTC)
    policies = parse_policies(args.policies)
    check_positive(args, "stretch", "reasoning_factor")
    trace = load_trace(args, start)
    config = config_from(args, start)
    console = wide_console()
    factors = [args.reasoning_factor] + ([] if args.skip_factor_one or args.reasoning_factor == 1 else [1.0])
    out = Path(args.out)
    summary = replay_and_report(console, manifest, trace, factors, config, policies, out, jobs=args.jobs)
    document = {"spec": manifest.metadata.name, "trace": args.trace, "config": asdict(config), "runs": summary}
    write_results(console, out, f"{manifest.metadata.name}-{trace.name}", document)
    return 0
