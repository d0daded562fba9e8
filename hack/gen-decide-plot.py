#!/usr/bin/env python3
"""Draw docs/img/how-it-decides.png: what the real ``decide`` plans as demand grows.

For examples/single-pool-hourly.yaml, demand is swept upwards; at each level ``decide`` runs
tick after tick (60 s apart) with the cluster set to what the previous tick planned, all
replicas ready, until the plan stops changing -- the steady state the operator settles in,
past the scale-up rate limit. Requests want an exponential number of tokens (mean 3,000).

    .venv/bin/python hack/gen-decide-plot.py [--out docs/img/how-it-decides.png]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import matplotlib

# Files only (no display on CI or a server); chosen before pyplot is imported.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from modelbudget.api import ControllerState, ModelBudgetSpec, Plan
from modelbudget.cli.common import load_manifest
from modelbudget.core import DemandSample, Observation, decide, resolve
from modelbudget.core.generation import GenerationProfile

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "single-pool-hourly.yaml"
MEAN_WANTED_TOKENS = 3000.0
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
MAX_TICKS = 60


@dataclass(frozen=True)
class Point:
    demand: float
    plan: Plan


def sweep(spec: ModelBudgetSpec, demands: np.ndarray) -> list[Point]:
    profile = GenerationProfile.exponential(MEAN_WANTED_TOKENS)
    resolved = resolve(spec)
    now, state = START, ControllerState()
    replicas = spec.replicas.min
    nodes = {p.name: p.min_nodes for p in spec.node_pools}
    limit: int | None = None
    points = []
    for demand in demands:
        plan = None
        for _ in range(MAX_TICKS):
            obs = Observation(
                current_replicas=replicas,
                ready_replicas=replicas,
                current_nodes=nodes,
                current_token_limit=limit,
                demand=DemandSample(at=now, request_rate=float(demand), generation=profile, requests_waiting=0.0),
            )
            decision = decide(obs, resolved, state, now)
            new = decision.plan
            settled = plan is not None and (new.replicas, new.nodes_by_pool(), new.token_limit) == (
                replicas,
                nodes,
                limit,
            )
            plan, state = new, decision.next_state
            replicas, nodes, limit = new.replicas, new.nodes_by_pool(), new.token_limit
            now += timedelta(seconds=60)
            if settled:
                break
        assert plan is not None
        points.append(Point(float(demand), plan))
    return points


def draw(spec: ModelBudgetSpec, points: list[Point], out: Path) -> None:
    x = np.array([p.demand for p in points])
    capped = np.array([p.plan.admitted_requests_per_second is not None for p in points])
    fig, (ax_limit, ax_size, ax_spend) = plt.subplots(3, 1, sharex=True, figsize=(8, 9), layout="constrained")
    fig.suptitle(
        f"{EXAMPLE.name}: the steady-state plan of decide() as demand grows\n"
        f"(requests want Exp(mean {MEAN_WANTED_TOKENS:,.0f}) tokens)"
    )

    ax_limit.plot(x, [p.plan.token_limit for p in points], color="tab:purple", label="token limit")
    ax_limit.axhline(spec.curve.max_tokens, color="grey", ls=":", label="curve.maxTokens")
    ax_limit.axhline(spec.curve.min_tokens, color="grey", ls="--", label="curve.minTokens")
    ax_limit.set_yscale("log", base=2)
    ax_limit.set_ylabel("tokens per request")

    pool = spec.node_pools[0]
    # GPUs paid first, wide and pale, so the replicas that fill them stay visible on top.
    ax_size.step(
        x,
        [p.plan.nodes_by_pool()[pool.name] * pool.gpus_per_node for p in points],
        where="mid",
        color="tab:orange",
        lw=4,
        alpha=0.5,
        label=f"GPUs on {pool.name} nodes (whole nodes)",
    )
    ax_size.step(x, [p.plan.replicas for p in points], where="mid", color="tab:blue", label="replicas")
    ax_size.axhline(spec.replicas.max, color="grey", ls=":", label="replicas.max")
    ax_size.set_ylim(bottom=0)
    ax_size.set_ylabel("replicas / GPUs")

    ax_spend.plot(x, [p.plan.expected_spend_per_hour for p in points], color="tab:green", label="planned spend")
    ax_spend.axhline(spec.budget.ceiling.amount, color="tab:red", ls="--", label="ceiling")
    served = [p.plan.admitted_requests_per_second or p.demand for p in points]
    twin = ax_spend.twinx()
    twin.plot(x, np.array(served) / x, color="black", lw=1, label="admitted / demand")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("fraction admitted")
    ax_spend.set_ylim(0, spec.budget.ceiling.amount * 1.1)
    ax_spend.set_ylabel("$ per hour")
    ax_spend.set_xlabel("demand (requests/s, log scale)")
    ax_spend.set_xscale("log")

    for ax in (ax_limit, ax_size, ax_spend):
        if capped.any():
            ax.axvspan(
                x[capped].min(),
                x.max(),
                color="tab:red",
                alpha=0.07,
                label="AdmissionCapped" if ax is ax_limit else None,
            )
        ax.grid(alpha=0.3)
    handles, labels = ax_spend.get_legend_handles_labels()
    more_handles, more_labels = twin.get_legend_handles_labels()
    ax_spend.legend(handles + more_handles, labels + more_labels, loc="center right", fontsize=8)
    ax_limit.legend(loc="lower left", fontsize=8)
    ax_size.legend(loc="upper left", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the file: re-running on the same code gives the same bytes.
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "how-it-decides.png")
    args = parser.parse_args()
    spec = load_manifest(str(EXAMPLE)).spec
    points = sweep(spec, np.geomspace(0.5, 1000, 160))
    draw(spec, points, args.out)
    for p in points[::16]:
        reasons = ",".join(sorted({r.reason for r in p.plan.reasons})) or "-"
        print(
            f"{p.demand:6.1f} req/s  limit {p.plan.token_limit:6d}  replicas {p.plan.replicas:3d}  "
            f"${p.plan.expected_spend_per_hour:6.2f}/h  {reasons}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
