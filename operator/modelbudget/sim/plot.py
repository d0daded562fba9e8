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


def _minutes(t: np.ndarray) -> np.ndarray:
    return t / 60.0


def plot(bench: Benchmark, path: Path, observed: Observed | None = None) -> Path:
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    demand, replicas, limit, spend = axes
    any_run = next(iter(bench.runs.values()))
    s = any_run.series
    demand.plot(_minutes(s.t), s.arrivals / any_run.step, color="0.4", lw=0.8)
    demand.set_ylabel("arrivals (req/s)")
    demand.set_title(f"{bench.spec_name} on {bench.trace.name}, W = generated x {bench.reasoning_factor:g}")
    for name, run in bench.runs.items():
        s = run.series
        x = _minutes(s.t)
        replicas.step(x, s.replicas, where="post", lw=1, label=name)
        limit.step(x, s.token_limit, where="post", lw=1, label=name)
        spend.step(x, s.spend_rate, where="post", lw=1, label=name)
    if observed is not None:
        for ax, values in ((replicas, observed.replicas), (spend, observed.spend)):
            if values is not None:
                ax.step(_minutes(observed.t), values, where="post", lw=1.2, color="black", ls=":", label="actual")
    judged = bench.runs.get("planner", any_run)
    spend.plot(
        _minutes(judged.series.t),
        judged.series.allowance,
        color="red",
        ls="--",
        lw=1.2,
        label=f"ceiling (allowance of {judged.policy})",
    )
    replicas.set_ylabel("replicas")
    limit.set_ylabel("token limit")
    limit.set_yscale("log", base=2)
    spend.set_ylabel("spend ($/h)")
    spend.set_xlabel("minutes")
    for ax in axes[1:]:
        ax.legend(loc="upper right", fontsize=8, ncol=3)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
