"""``modelbudget replay`` measured: fidelity to ``simulate`` on an hour, and the time to replay a day and a week.

    .venv/bin/python bench/replay.py [--data-dir DIR] [--skip-week] [--skip-fidelity] [--runs planner:1,all:1,all:2]

Each history is the synthetic server's metrics for an Azure trace (W = generated x 20),
backfilled into TSDB blocks with promtool (``modelbudget.testbed.backfill``) and served by a
Prometheus this script starts on a free loopback port; it scrapes nothing.

1. Fidelity: one hour of each Azure trace, ``simulate`` on the trace and ``replay`` of its
   backfilled history, every policy side by side (dollars and total score).
2. Speed: a day and a week of 15 s history (the conversation trace tiled under a diurnal
   envelope, 2 pods; the latency, first-token and prompt histograms, which replay does not
   read, left out to keep the files small).  Each replay runs as its own process: wall time
   CPU time and peak resident memory (``wait4``; CPU summed over the process and its workers,
   memory the largest of them), for the
   planner alone and for every policy, one after another (``--jobs 1``) and as many at once
   as there are CPUs (the default); the reading part (range queries in chunks + rebuilding the
   requests) is also timed on its own.  ``--runs`` picks some of those replays (``planner`` or
   ``all``, then the jobs): a week of every policy takes many minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from modelbudget.adapters.history import Grid, PrometheusHistory
from modelbudget.adapters.metrics import PrometheusCredentials
from modelbudget.cli.common import load_manifest
from modelbudget.cli.replay import Reader, read_actual, read_history
from modelbudget.core.curve import resolve_curve
from modelbudget.core.planner import token_bounds
from modelbudget.sim.history import rebuild
from modelbudget.sim.trace import data_dir, read_trace, repeat_daily
from modelbudget.testbed.backfill import SIMULATE_START, Shape, backfill, create_blocks, serve_history

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "single-pool-hourly.yaml"
CLI = str(Path(sys.executable).with_name("modelbudget"))
FACTOR = 20.0
POLICIES = ("planner", "hpa", "keda", "static", "oracle")
UNREAD = frozenset(
    {"vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds", "vllm:request_prompt_tokens"}
)


def _results(out: Path) -> dict[str, dict[str, Any]]:
    (path,) = out.glob("*.json")
    return {r["policy"]: r for r in json.loads(path.read_text())["runs"][0]["results"]}


def run_cli(args: list[str]) -> tuple[float, float, float]:
    """Run ``modelbudget`` as a child process: (wall seconds, CPU seconds, peak resident MiB).

    CPU seconds (user + system, the child and its workers) say what the work costs whatever else
    the machine runs; wall seconds are what a user waits, and move with the machine's load."""
    began = time.monotonic()
    child = subprocess.Popen([CLI, *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"modelbudget {' '.join(args)} failed ({child.returncode})")
    return time.monotonic() - began, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: KiB


def _range(hours: float) -> list[str]:
    end = SIMULATE_START + timedelta(hours=hours)
    return ["--start", SIMULATE_START.isoformat(), "--end", end.isoformat()]


def fidelity(console: Console, traces: Path, work: Path) -> None:
    table = Table(title="replay of a backfilled hour vs simulate on the same trace (W = generated x 20)")
    for col in ("trace", "policy", "sim $", "replay $", "$ diff", "sim score", "replay score", "score diff"):
        table.add_column(col, justify="left" if col in ("trace", "policy") else "right")
    manifest = load_manifest(str(EXAMPLE))
    for name in ("azure_llm_2023_code", "azure_llm_2023_conv"):
        trace_path = traces / f"{name}.csv"
        sim_out, replay_out, tsdb = work / f"sim-{name}", work / f"replay-{name}", work / f"tsdb-{name}"
        trace_args = ["--trace", str(trace_path), "--reasoning-factor", str(FACTOR), "--skip-factor-one"]
        run_cli(["simulate", "-f", str(EXAMPLE), *trace_args, "--out", str(sim_out)])
        backfill(manifest, read_trace(trace_path), work / f"{name}.om", reasoning_factor=FACTOR)
        create_blocks(work / f"{name}.om", tsdb)
        with serve_history(tsdb) as url:
            run_cli(["replay", "-f", str(EXAMPLE), "--prometheus", url, *_range(1), "--out", str(replay_out)])
        sim, rep = _results(sim_out), _results(replay_out)
        for policy in POLICIES:
            s, r = sim[policy], rep[policy]
            table.add_row(
                name.removeprefix("azure_llm_2023_"),
                policy,
                f"{s['dollars']:.2f}",
                f"{r['dollars']:.2f}",
                f"{r['dollars'] / s['dollars'] - 1:+.1%}",
                f"{s['total_score']:.0f}",
                f"{r['total_score']:.0f}",
                f"{r['total_score'] / s['total_score'] - 1:+.1%}",
            )
    console.print(table)


def read_only(url: str, hours: float) -> float:
    """Seconds to read the range (every query, in chunks) and rebuild its requests, in this process."""
    manifest = load_manifest(str(EXAMPLE))
    start = int(SIMULATE_START.timestamp())
    grid = Grid(start, start + int(hours * 3600), 15)
    began = time.monotonic()
    reader = Reader(PrometheusHistory(url, PrometheusCredentials()), grid, lambda _: None)
    fetched = read_history(manifest, reader, "30s")
    read_actual(manifest, reader)
    rebuild(fetched.history, float(token_bounds(manifest.spec, resolve_curve(manifest.spec.curve))[1]))
    return time.monotonic() - began


def speed(
    console: Console, traces: Path, work: Path, spans: list[tuple[str, float]], runs: list[tuple[str, int]]
) -> None:
    table = Table(title="replay time and peak memory, 15 s history of the conversation trace (2 cores)")
    for col in ("history", "requests", "samples", "backfill s", "promtool s", "read+rebuild s", "policies", "jobs"):
        table.add_column(col, justify="right")
    table.add_column("replay s", justify="right")
    table.add_column("CPU s", justify="right")
    table.add_column("peak MiB", justify="right")
    manifest = load_manifest(str(EXAMPLE))
    base = read_trace(traces / "azure_llm_2023_conv.csv")
    day = (SIMULATE_START - SIMULATE_START.replace(hour=0, minute=0, second=0)).total_seconds()
    for label, hours in spans:
        trace = repeat_daily(base, hours, 0.3, 0, day)
        om, tsdb = work / f"{label}.om", work / f"tsdb-{label}"
        began = time.monotonic()
        samples = backfill(manifest, trace, om, reasoning_factor=FACTOR, pods=2, shape=Shape(without=UNREAD))
        backfilled = time.monotonic() - began
        began = time.monotonic()
        create_blocks(om, tsdb)
        loaded = time.monotonic() - began
        om.unlink()
        with serve_history(tsdb) as url:
            reading = read_only(url, hours)
            for policies, jobs in runs:
                out = work / f"replay-{label}-{policies.count(',')}-{jobs}"
                replay = ["replay", "-f", str(EXAMPLE), "--prometheus", url, *_range(hours), "--jobs", str(jobs)]
                wall, cpu, peak = run_cli([*replay, "--out", str(out), "--policies", policies])
                table.add_row(
                    label,
                    f"{len(trace):,}",
                    f"{samples:,}",
                    f"{backfilled:.1f}",
                    f"{loaded:.1f}",
                    f"{reading:.1f}",
                    "planner" if policies == "planner" else "all 5",
                    str(jobs),
                    f"{wall:.1f}",
                    f"{cpu:.1f}",
                    f"{peak:.0f}",
                )
                done = f"{wall:.1f}s, {cpu:.1f} CPU s, {peak:.0f} MiB"
                console.print(f"[dim]{label}, {policies}, {jobs} job(s): {done}[/dim]")
    console.print(table)


def parse_runs(text: str) -> list[tuple[str, int]]:
    """``planner:1,all:2`` -> [("planner", 1), ("planner,hpa,...", 2)]; ``cpus`` for the jobs: as many as CPUs."""
    runs = []
    for item in text.split(","):
        which, _, jobs = item.partition(":")
        if which not in ("planner", "all") or not (jobs == "cpus" or jobs.isdigit()):
            raise SystemExit(f"--runs: {item!r} is not planner:N or all:N (N a number or cpus)")
        runs.append(
            (
                "planner" if which == "planner" else ",".join(POLICIES),
                (os.cpu_count() or 1) if jobs == "cpus" else int(jobs),
            )
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $MODELBUDGET_DATA_DIR or ../shared/data")
    parser.add_argument("--skip-week", action="store_true", help="only the day (the week takes minutes)")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument(
        "--runs", type=parse_runs, default="planner:1,all:1,all:cpus", help="which replays to time (default: all three)"
    )
    args = parser.parse_args()
    traces = (args.data_dir or data_dir()) / "traces"
    console = Console(width=140)
    with tempfile.TemporaryDirectory(prefix="mb-bench-replay-") as tmp:
        work = Path(tmp)
        if not args.skip_fidelity:
            fidelity(console, traces, work)
        spans = [("1 day", 24.0)] + ([] if args.skip_week else [("1 week", 168.0)])
        speed(console, traces, work, spans, args.runs)


if __name__ == "__main__":
    main()
