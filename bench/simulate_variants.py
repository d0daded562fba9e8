"""Two model variants under one binding ceiling, on both Azure traces: the planner over variants vs
each variant alone (the ordinary planner, all traffic to it) vs the oracle over variants.

    .venv/bin/python bench/simulate_variants.py [--ceiling 30] [--traces NAME,NAME] [--reasoning-factor 20]

The variants (figures and their sources in docs/variants.md):

- ``llama-70b``: a 70B model in FP8 on 4-GPU L40S nodes (one replica each): vLLM's published
  figure of about 430 generated tokens/s per GPU, so 1,720 per replica; a better curve.
- ``llama-8b``: an 8B model in FP8, one H100 per replica (2-GPU nodes): about 5,000 generated tokens/s.

Both curves are on one performance scale, ``a + b ln t`` with the same slope; the 70B's intercept
is higher by ``b ln 4.5`` (it matches the 8B with 4.5 times fewer tokens), so a 70B held to 512
tokens (0.719) scores below the 8B at 4,096 (0.765), as in issue #15.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from modelbudget.api import ModelBudgetSpec
from modelbudget.sim.run import SimConfig, Workload, run_policy
from modelbudget.sim.score import score
from modelbudget.sim.trace import TraceError, data_dir, read_trace
from modelbudget.sim.variants import run_variants, score_variants

TRACES = ("azure_llm_2023_code", "azure_llm_2023_conv")

BASE: dict[str, Any] = {
    "budget": {"ceiling": {"amount": 30, "period": "Hour"}, "valuePerPoint": 0.05},
    "metrics": {"prometheusUrl": "http://prometheus:9090"},
    # Reasoning answers are long: two minutes for the SLO's percentile request, as tokens allow.
    "slo": {"latencySeconds": 120},
    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "llama-70b": {
        "targetRef": {"name": "llama-70b"},
        "curve": {"intercept": 0.22, "slope": 0.08, "minTokens": 128, "maxTokens": 16384},
        "replicas": {"min": 0, "max": 32, "gpusPerReplica": 4},
        "nodePools": [
            {
                "name": "l40s",
                "gpuType": "nvidia-l40s",
                "pricePerGpuHour": 1.80,
                "gpusPerNode": 4,  # a 4-GPU L40S machine (g6e.12xlarge-like): one replica per node
                "minNodes": 0,
                "maxNodes": 12,
                "tokensPerSecondPerReplica": 1720,  # 4 x ~430 per GPU (vLLM, 70B FP8 on L40S)
                "serving": {"decodeAlphaSeconds": 0.035, "prefillTokensPerSecond": 4000},
            }
        ],
    },
    "llama-8b": {
        "targetRef": {"name": "llama-8b"},
        "curve": {"intercept": 0.10, "slope": 0.08, "minTokens": 128, "maxTokens": 16384},
        "replicas": {"min": 0, "max": 32, "gpusPerReplica": 1},
        "nodePools": [
            {
                "name": "h100",
                "gpuType": "nvidia-h100-80gb",
                "pricePerGpuHour": 3.00,
                "gpusPerNode": 2,  # a 2-GPU H100 machine: two replicas per node
                "minNodes": 0,
                "maxNodes": 8,
                "tokensPerSecondPerReplica": 5000,  # ~5,000 (vLLM, 8B FP8 on one H100)
                "serving": {"decodeAlphaSeconds": 0.008, "prefillTokensPerSecond": 20000},
            }
        ],
    },
}


def variant_specs(ceiling: float) -> list[tuple[str, ModelBudgetSpec]]:
    out = []
    for name, own in VARIANTS.items():
        merged = copy.deepcopy({**BASE, **own})
        merged["budget"]["ceiling"]["amount"] = ceiling
        out.append((name, ModelBudgetSpec.model_validate(merged)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ceiling", type=float, default=30.0, help="USD per hour, shared by the variants")
    parser.add_argument("--reasoning-factor", type=float, default=20.0)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $MODELBUDGET_DATA_DIR or ../shared/data")
    parser.add_argument("--traces", default=",".join(TRACES))
    args = parser.parse_args()
    if not args.ceiling > 0 or not args.reasoning_factor > 0:
        parser.error("--ceiling and --reasoning-factor must be positive")
    traces_dir = (args.data_dir or data_dir()) / "traces"
    try:  # every trace read before the first (long) replay: a wrong name fails at once
        traces = {name: read_trace(traces_dir / f"{name}.csv") for name in args.traces.split(",")}
    except TraceError as exc:
        parser.error(str(exc))
    console = Console(width=200)
    config = SimConfig()
    variants = variant_specs(args.ceiling)
    for trace_name, trace in traces.items():
        work = Workload.of(trace, args.reasoning_factor, config.warmup)
        rows = []
        for name, spec in variants:
            started = time.monotonic()
            result = score(run_policy(spec, work, "planner", config), work, spec)
            rows.append((f"{name} alone (planner)", result, time.monotonic() - started))
        for policy in ("planner", "oracle"):
            started = time.monotonic()
            run = run_variants(variants, work, policy, config)
            result = score_variants(run, work, variants)
            shares = ", ".join(f"{n} {run.shares[:, k].mean():.0f}%" for k, (n, _) in enumerate(variants))
            rows.append((f"variants {policy} (mean share: {shares})", result, time.monotonic() - started))
        best_single = max(r.total_score for _, r, _ in rows[: len(variants)])
        oracle = rows[-1][1]
        table = Table(
            title=f"{trace_name}: {len(trace)} requests over {trace.span / 60:.0f} min, W = generated x "
            f"{args.reasoning_factor:g}, ceiling {args.ceiling:g} USD/Hour shared"
        )
        for column in (
            "policy",
            "total score",
            "mean score",
            "SLO met",
            "dropped",
            "dollars",
            "breach min",
            "score/best single",
            "score/oracle",
            "run s",
        ):
            table.add_column(column)
        for label, r, seconds in rows:
            table.add_row(
                label,
                f"{r.total_score:.1f}",
                f"{r.mean_score:.4f}",
                f"{r.slo_attainment:.1%}",
                str(r.dropped),
                f"{r.dollars:.2f}",
                str(r.breach_minutes),
                f"{r.total_score / best_single:.3f}",
                f"{r.total_score / oracle.total_score:.3f}" if oracle.total_score > 0 else "n/a",
                f"{seconds:.0f}",
            )
        console.print(table)


if __name__ == "__main__":
    main()
