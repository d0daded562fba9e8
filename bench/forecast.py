"""How well each demand forecast bounds the peak of the next horizon, on both Azure traces.

    .venv/bin/python bench/forecast.py [--data-dir DIR] [--horizon 180]

The request rate is what the operator sees: arrivals over a trailing 60 s window, sampled every
15 s, the peak of each 30 s bucket kept (as ``core/forecast.record`` keeps it).  Walking along
the trace, each forecaster predicts, from the history so far (at most an hour), the peak rate of
the next horizon; the table gives how often the actual peak stayed under the prediction
(coverage), how much the prediction was over it when it did (headroom paid for), and how much
under when it did not (shortfall the fast knob and the queue absorb).  Prints a table; asserts
nothing.
"""

from __future__ import annotations

import argparse
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from modelbudget.api.status import DemandHistory
from modelbudget.core.forecast import HISTORY_BUCKETS, forecast
from modelbudget.core.planner import FORECAST_BUCKET_SECONDS
from modelbudget.sim.trace import data_dir, read_trace

TRACES = ("azure_llm_2023_code", "azure_llm_2023_conv")
START = datetime(2023, 11, 16, tzinfo=UTC)


def observed_peaks(arrival: np.ndarray, window: float = 60.0, sample: float = 15.0) -> np.ndarray:
    """Peak per bucket of the trailing-window arrival rate, sampled like the operator's timer."""
    times = np.arange(window, arrival.max(), sample)
    rate = (np.searchsorted(arrival, times) - np.searchsorted(arrival, times - window)) / window
    per_bucket = round(FORECAST_BUCKET_SECONDS / sample)
    usable = rate.size - rate.size % per_bucket
    return np.asarray(rate[:usable].reshape(-1, per_bucket).max(axis=1))


def evaluate(peaks: np.ndarray, horizon: float, quantiles: tuple[float, ...]) -> list[tuple[str, float, float, float]]:
    h = math.ceil(horizon / FORECAST_BUCKET_SECONDS)
    names = ["last value", "holt (expected)", *(f"holt+growth-quantile q={q:g}" for q in quantiles)]
    hits: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for t in range(1, peaks.size - h):
        lo = max(0, t + 1 - HISTORY_BUCKETS)
        history = DemandHistory(
            start=START + timedelta(seconds=lo * FORECAST_BUCKET_SECONDS),
            bucket_seconds=FORECAST_BUCKET_SECONDS,
            peaks=[float(p) for p in peaks[lo : t + 1]],
        )
        now = START + timedelta(seconds=t * FORECAST_BUCKET_SECONDS)
        actual = float(peaks[t + 1 : t + 1 + h].max())
        made = {q: forecast(history, now, horizon, q) for q in quantiles}
        if any(m is None for m in made.values()) or actual <= 0:
            continue
        first = next(iter(made.values()))
        assert first is not None
        hits["last value"].append((float(peaks[t]), actual))
        hits["holt (expected)"].append((first.expected, actual))
        for q, m in made.items():
            assert m is not None
            hits[f"holt+growth-quantile q={q:g}"].append((m.upper, actual))
    rows = []
    for name, pairs in hits.items():
        pred, act = np.array(pairs).T
        covered = pred >= act - 1e-9
        over = np.mean((pred[covered] - act[covered]) / act[covered]) if covered.any() else 0.0
        under = np.mean((act[~covered] - pred[~covered]) / act[~covered]) if (~covered).any() else 0.0
        rows.append((name, float(covered.mean()), float(over), float(under)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $MODELBUDGET_DATA_DIR or ../shared/data")
    parser.add_argument("--horizon", type=float, default=180.0, help="seconds ahead (node provisioning + pod start)")
    args = parser.parse_args()
    traces_dir = (args.data_dir or data_dir()) / "traces"
    table = Table(title=f"peak demand within {args.horizon:g}s: predicted vs actual", header_style="bold")
    for col in ("trace", "forecaster", "coverage", "mean headroom when covered", "mean shortfall when not"):
        table.add_column(col, justify="left" if col in ("trace", "forecaster") else "right")
    for name in TRACES:
        peaks = observed_peaks(read_trace(traces_dir / f"{name}.csv").arrival)
        for forecaster, coverage, over, under in evaluate(peaks, args.horizon, (0.5, 0.75, 0.9)):
            table.add_row(name, forecaster, f"{coverage:.1%}", f"{over:.1%}", f"{under:.1%}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
