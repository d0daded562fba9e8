"""Replay both Azure LLM traces against every example ModelBudget and print the comparison tables.

    .venv/bin/python bench/simulate.py [--reasoning-factor 20] [--data-dir DIR] [--out report/] [--daily]

The traces are read from ``../shared/data/traces`` next to the repository (or ``--data-dir`` /
``$MODELBUDGET_DATA_DIR``); they are never copied into the repository.  Each table is followed by the
same run at reasoning factor 1.  ``--daily`` also replays each trace over 24 h under a diurnal
envelope for the Day-ceiling example (slow: the oracle re-plans every step).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from rich.console import Console

from modelbudget.api import ModelBudget
from modelbudget.cli.simulate import render
from modelbudget.sim.benchmark import run_benchmark
from modelbudget.sim.plot import plot
from modelbudget.sim.run import SimConfig
from modelbudget.sim.trace import data_dir, read_trace, repeat_daily

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("single-pool-hourly", "local-demo", "spot-ondemand-daily")
TRACES = ("azure_llm_2023_code", "azure_llm_2023_conv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reasoning-factor", type=float, default=20.0)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $MODELBUDGET_DATA_DIR or ../shared/data")
    parser.add_argument("--out", type=Path, default=ROOT / "report")
    parser.add_argument("--examples", default=",".join(EXAMPLES))
    parser.add_argument("--daily", action="store_true", help="also a 24 h run of the Day-ceiling example")
    args = parser.parse_args()
    traces_dir = (args.data_dir or data_dir()) / "traces"
    console = Console(width=200)
    config = SimConfig()
    for example in args.examples.split(","):
        manifest = ModelBudget.model_validate(yaml.safe_load((ROOT / "examples" / f"{example}.yaml").read_text()))
        for name in TRACES:
            trace = read_trace(traces_dir / f"{name}.csv")
            runs = [(trace, args.reasoning_factor), (trace, 1.0)]
            if args.daily and manifest.spec.budget.ceiling.period.value != "Hour":
                runs.append((repeat_daily(trace, 24.0, 0.3, seed=0), args.reasoning_factor))
            for replay, factor in runs:
                bench = run_benchmark(manifest.spec, manifest.metadata.name, replay, factor, config)
                console.rule(f"{example} / {name} / F={factor:g}")
                render(bench, console, bench.describe(manifest.spec))
                suffix = "-24h" if replay is not trace else ""
                figure = plot(bench, args.out / f"{manifest.metadata.name}-{name}-F{factor:g}{suffix}.png")
                console.print(f"[dim]figure: {figure}[/dim]")


if __name__ == "__main__":
    main()
