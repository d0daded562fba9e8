"""The benchmark's figure: demand, replicas, token limit and spend over time, one line per policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt

from modelbudget.sim.benchmark import Benchmark


@dataclass(frozen=True)
class Observed:
    """What actually ran over the replayed range (``modelbudget replay``), drawn beside the policies."""

    t: npt.NDArray[np.float64]  # seconds from the range's start
    spend: npt.NDArray[np.float64] | None
    replicas: npt.NDArray[np.float64] | None


# Each policy its own colour and line: the planner on top and thickest, the oracles dashed.
_STYLE = {
    "planner": {"color": "tab:blue", "lw": 2.0, "zorder": 5},
    "hpa": {"color": "tab:orange", "lw": 1.0},
    "hpa-best": {"color": "tab:brown", "lw": 1.2},
    "keda": {"color": "tab:purple", "lw": 1.0, "ls": ":"},
    "static": {"color": "0.55", "lw": 1.0, "ls": ":"},
    "oracle": {"color": "tab:green", "lw": 1.0, "ls": "--"},
    "oracle-delays": {"color": "tab:olive", "lw": 1.2, "ls": "-."},
}
_HEADROOM = 1.15  # axes reach this far above the highest per-minute value drawn


def per_minute(t: npt.NDArray[np.float64], values: npt.NDArray[np.float64]) -> tuple[np.ndarray, np.ndarray]:
    """Minute starts and each minute's mean: 5 s flapping would hide every other line."""
    minute = np.floor(t / 60.0).astype(np.int64)
    minute -= minute.min(initial=0)
    counts = np.bincount(minute)
    sums = np.bincount(minute, weights=values)
    seen = counts > 0
    return np.flatnonzero(seen).astype(float) + float(np.floor(t.min(initial=0.0) / 60.0)), sums[seen] / counts[seen]


def plot(bench: Benchmark, path: Path, observed: Observed | None = None) -> Path:
    """Four panels over the trace, per minute: demand, replicas, token limit, spend with the ceiling."""
    fig, axes = plt.subplots(4, 1, figsize=(12, 12), sharex=True)
    demand, replicas, limit, spend = axes
    any_run = next(iter(bench.runs.values()))
    s = any_run.series
    x, arrivals = per_minute(s.t, s.arrivals / any_run.step)
    demand.step(x, arrivals, where="post", color="0.3", lw=1)
    demand.set_ylabel("arrivals (req/s, per-minute mean)")
    demand.set_ylim(0, max(arrivals.max(initial=0.0), 1e-9) * _HEADROOM)
    demand.set_title(f"{bench.spec_name} on {bench.trace.name}, W = generated x {bench.reasoning_factor:g}")
    top = {"replicas": 0.0, "spend": 0.0}
    for name, run in bench.runs.items():
        style = _STYLE.get(name, {"lw": 1.0})
        s = run.series
        for ax, values, key in (
            (replicas, s.replicas, "replicas"),
            (limit, s.token_limit, None),
            (spend, s.spend_rate, "spend"),
        ):
            x, mean = per_minute(s.t, values)
            ax.step(x, mean, where="post", label=name, **style)
            if key is not None:
                top[key] = max(top[key], float(mean.max(initial=0.0)))
    if observed is not None:
        for ax, actual, key in ((replicas, observed.replicas, "replicas"), (spend, observed.spend, "spend")):
            if actual is not None:
                x, mean = per_minute(observed.t, actual)
                ax.step(x, mean, where="post", lw=1.2, color="black", ls=":", label="actual")
                top[key] = max(top[key], float(mean.max(initial=0.0)))
    judged = bench.runs.get("planner", any_run)
    x, allowance = per_minute(judged.series.t, judged.series.allowance)
    spend.step(
        x, allowance, where="post", color="red", ls="--", lw=1.2, label=f"ceiling (allowance of {judged.policy})"
    )
    # The allowance may run far above any spend (a paced budget in a quiet period): the axis shows
    # the ceiling up to twice the most any policy spent, and the line leaves the panel above that.
    shown = max(top["spend"], min(float(allowance.max(initial=0.0)), 2.0 * top["spend"]))
    spend.set_ylim(0, max(shown, 1e-9) * _HEADROOM)
    replicas.set_ylim(0, max(top["replicas"], 1.0) * _HEADROOM)
    replicas.set_ylabel("replicas (per-minute mean)")
    limit.set_ylabel("token limit (per-minute mean)")
    limit.set_yscale("log", base=2)
    spend.set_ylabel("spend ($/h, per-minute mean)")
    spend.set_xlabel("minutes")
    for ax in axes[1:]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
