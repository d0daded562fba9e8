"""Micro-benchmarks: ``decide`` (decisions per second, median time) and the simulator (simulated
hours per second, per policy), on each example.  Prints a table; asserts nothing.

    .venv/bin/python bench/decide.py [--decisions 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from modelbudget.api import ControllerState, ModelBudget
from modelbudget.core import DemandSample, Observation, decide, resolve
from modelbudget.core.generation import GenerationProfile
from modelbudget.sim.run import POLICIES, SimConfig, Workload, run_policy
from modelbudget.sim.trace import synthetic

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("single-pool-hourly", "local-demo", "spot-ondemand-daily")


def time_decide(spec_file: Path, decisions: int) -> tuple[float, float]:
    """(decisions per second, median milliseconds) over a walk of changing demand."""
    spec = ModelBudget.model_validate(yaml.safe_load(spec_file.read_text())).spec
    rng = np.random.default_rng(0)
    profile = GenerationProfile.from_samples(rng.lognormal(6.5, 1.0, 2000))
    state, now, replicas = ControllerState(), datetime(2023, 11, 16, tzinfo=UTC), spec.replicas.min
    nodes = {p.name: p.min_nodes for p in spec.node_pools}
    times = []
    for k in range(decisions):
        obs = Observation(
            current_replicas=replicas,
            ready_replicas=replicas,
            current_nodes=nodes,
            demand=DemandSample(
                at=now,
                request_rate=float(2 + 8 * abs(np.sin(k / 50))),
                generation=profile,
                requests_waiting=float(rng.poisson(3)),
            ),
        )
        start = time.perf_counter()
        decision = decide(obs, resolve(spec), state, now)  # the operator resolves the spec every reconcile
        times.append(time.perf_counter() - start)
        state, replicas, nodes = decision.next_state, decision.plan.replicas, decision.plan.nodes_by_pool()
        now += timedelta(seconds=15)
    return len(times) / sum(times), statistics.median(times) * 1e3


def time_simulator(spec_file: Path, hours: float) -> dict[str, float]:
    """Simulated hours per wall-clock second, per policy, on a Poisson trace at 6 req/s."""
    spec = ModelBudget.model_validate(yaml.safe_load(spec_file.read_text())).spec
    work = Workload.of(synthetic(6.0, hours * 3600, np.geomspace(100, 8000, 32), seed=1), 1.0, 0.0)
    out = {}
    for policy in POLICIES:
        start = time.perf_counter()
        run_policy(spec, work, policy, SimConfig(warmup=0.0))
        out[policy] = hours / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--hours", type=float, default=1.0, help="simulated hours per policy")
    args = parser.parse_args()
    table = Table(title="decide and the simulator", header_style="bold")
    for col in ("example", "decisions/s", "median ms", *(f"sim h/s {p}" for p in POLICIES)):
        table.add_column(col, justify="right")
    for example in EXAMPLES:
        path = ROOT / "examples" / f"{example}.yaml"
        rate, median = time_decide(path, args.decisions)
        sim = time_simulator(path, args.hours)
        table.add_row(example, f"{rate:.0f}", f"{median:.2f}", *(f"{sim[p]:.1f}" for p in POLICIES))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
