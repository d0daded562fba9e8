"""The trace-replay simulator: conservation, the analytic optimum, the oracle bound, the ceiling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelbudget.api import ModelBudgetSpec
from modelbudget.cli import main
from modelbudget.core.capacity import cost_per_token
from modelbudget.core.planner import GRID_STEPS_PER_DOUBLING
from modelbudget.sim.benchmark import run_benchmark
from modelbudget.sim.run import SimConfig, Workload, run_policy
from modelbudget.sim.score import score
from modelbudget.sim.trace import Columns, Trace, TraceError, read_trace, repeat_daily, synthetic
from modelbudget.sim.world import QUEUED, REJECTED, SERVED, TIMED_OUT

FAST = SimConfig(warmup=300.0)


def sim_spec(**over: Any) -> ModelBudgetSpec:
    """One pool of 1-GPU nodes ($2/h, 2000 tok/s per replica) unless overridden."""
    doc: dict[str, Any] = {
        "targetRef": {"name": "m"},
        "curve": {"intercept": 0.1, "slope": 0.08, "minTokens": 128, "maxTokens": 16384},
        "budget": {"ceiling": {"amount": 1000, "period": "Hour"}, "valuePerPoint": 0.01},
        "replicas": {"min": 1, "max": 100},
        "nodePools": [
            {
                "name": "p",
                "gpuType": "g",
                "pricePerGpuHour": 2.0,
                "gpusPerNode": 1,
                "minNodes": 0,
                "maxNodes": 100,
                "tokensPerSecondPerReplica": 2000,
            }
        ],
        "metrics": {"prometheusUrl": "http://prom:9090", "window": "2m"},
        "slo": {"latencySeconds": 20},
        "behavior": {
            "scaleUp": {"maxReplicasPerPeriod": 100, "periodSeconds": 15},
            "scaleDown": {"stabilizationWindowSeconds": 120},
            "nodeScaleDown": {"stabilizationWindowSeconds": 120},
        },
    }
    for key, value in over.items():
        doc[key] = value
    return ModelBudgetSpec.model_validate(doc)


def bursty(seconds: float, seed: int) -> Trace:
    """Quiet and busy minutes alternating, wanted tokens spread over two orders of magnitude."""
    sizes = np.geomspace(50, 20000, 32)
    parts = [
        synthetic(rate, 60.0, sizes, seed=seed + k)
        for k, rate in enumerate([2, 12, 1, 8, 15, 3, 0.5, 10, 6, 2] * math.ceil(seconds / 600))
    ][: int(seconds // 60)]
    arrival = np.concatenate([p.arrival + 60.0 * k for k, p in enumerate(parts)])
    return Trace(
        arrival, np.concatenate([p.prompt for p in parts]), np.concatenate([p.generated for p in parts]), "bursty"
    )


def test_requests_and_dollars_are_conserved() -> None:
    # A ceiling of three nodes under bursts: queues, timeouts and admission caps all happen.
    spec = sim_spec(budget={"ceiling": {"amount": 6, "period": "Hour"}, "valuePerPoint": 0.01})
    work = Workload.of(bursty(900, seed=1), 1.0, FAST.warmup)
    price = spec.node_pools[0].price_per_gpu_hour * spec.node_pools[0].gpus_per_node
    for policy in ("planner", "hpa", "keda", "static", "oracle"):
        run = run_policy(spec, work, policy, FAST)
        status = run.world.status
        counts = {s: int(np.count_nonzero(status == s)) for s in (SERVED, TIMED_OUT, REJECTED, QUEUED)}
        assert sum(counts.values()) == work.arrival.size, policy
        assert counts[SERVED] == len(run.world.done_index), policy
        result = score(run, work, spec)
        assert result.served + result.dropped + result.still_queued == result.requests, policy
        billed = float(np.sum(run.series.nodes * price) * FAST.step / 3600.0)
        assert result.dollars == pytest.approx(billed, rel=1e-12), policy


def test_planner_reaches_the_analytic_optimum_on_constant_demand() -> None:
    # Every request wants more than the top limit, so G(L) = L and the optimum is L* = v*b/c.
    rate, mu, price = 20.0, 2000.0, 2.0
    spec0 = sim_spec()
    c = cost_per_token(spec0.node_pools[0], 1)
    target = 4000.0
    v = target * c / 0.08  # so that L* = v*b/c = 4000, inside [128, 16384]
    spec = sim_spec(budget={"ceiling": {"amount": 1000, "period": "Hour"}, "valuePerPoint": v})
    work = Workload.of(synthetic(rate, 1200.0, 100_000.0), 1.0, 600.0)
    run = run_policy(spec, work, "planner", SimConfig(warmup=600.0))

    late = run.series.t > 600.0  # the last ten minutes: steady state
    limits = np.unique(run.series.token_limit[late])
    replicas = np.unique(run.series.replicas[late])
    nodes = np.unique(run.series.nodes[late])
    # Tolerance: the planner chooses on its grid (2**(1/GRID_STEPS_PER_DOUBLING) apart, plus L* itself);
    # net value is flat at the optimum, so a neighbour of L* may win by one replica's rounding: one step.
    grid_step = math.log(2) / GRID_STEPS_PER_DOUBLING
    assert np.all(np.abs(np.log(limits / target)) <= grid_step + 1e-9), limits
    # Replicas: ceil(lambda * G(L) / mu) at a limit it chose, on whole 1-GPU nodes.  The observed rate is
    # a 2-minute window count (exact here to 1/2400), so no further tolerance.
    assert set(replicas.tolist()) <= {math.ceil(rate * limit / mu - 1e-9) for limit in limits}, (replicas, limits)
    assert nodes.tolist() == replicas.tolist()
    expected = float(np.mean(replicas)) * price * (work.span + 40) / 3600
    assert score(run, work, spec).dollars == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("seed", [3, 4])
def test_no_policy_beats_the_oracle_on_score_at_no_more_spend(seed: int) -> None:
    spec = sim_spec(
        budget={"ceiling": {"amount": 30, "period": "Hour"}, "valuePerPoint": 0.004},
        nodePools=[
            {
                "name": "p",
                "gpuType": "g",
                "pricePerGpuHour": 2.0,
                "gpusPerNode": 4,
                "minNodes": 1,
                "maxNodes": 6,
                "tokensPerSecondPerReplica": 2000,
            }
        ],
    )
    bench = run_benchmark(spec, "t", bursty(1200, seed), 1.0, FAST)
    oracle = bench.results["oracle"]
    for name, r in bench.results.items():
        # Tolerance 0.5% of score: the oracle chooses on the token grid and interval by interval.
        beaten = r.total_score > oracle.total_score * 1.005 and r.dollars <= oracle.dollars + 1e-9
        assert not beaten, (name, r, oracle)
        assert r.net_value <= oracle.net_value + 0.005 * abs(oracle.net_value), name


@pytest.mark.parametrize("period", ["Hour", "Day"])
def test_planner_never_shows_a_minute_over_the_ceiling(period: str) -> None:
    amount = 10.0 if period == "Hour" else 150.0
    spec = sim_spec(budget={"ceiling": {"amount": amount, "period": period}, "valuePerPoint": 0.05})
    trace = bursty(1800, seed=5)
    if period == "Day":  # late in the day the paced allowance is tight
        trace = repeat_daily(trace, 1.0, 0.3, seed=0, start_of_day=22 * 3600)
    config = SimConfig(warmup=300.0, start=FAST.start.replace(hour=22 if period == "Day" else 0))
    run = run_policy(spec, Workload.of(trace, 1.0, config.warmup), "planner", config)
    assert score(run, Workload.of(trace, 1.0, config.warmup), spec).breach_minutes == 0
    assert np.all(run.series.spend_rate <= run.series.allowance + 1e-9)


def test_trace_files_and_their_errors(tmp_path: Path) -> None:
    csv_file = tmp_path / "t.csv"
    csv_file.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:04.0319600,3180,8\n2023-11-16 18:17:03.9799600,4808,10\n"
    )
    trace = read_trace(csv_file)
    assert trace.arrival.tolist() == pytest.approx([0.0, 0.052])
    assert trace.generated.tolist() == [10, 8]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"t": t, "p": 1, "g": g}) for t, g in [(0, 5), (1.5, 7)]))
    assert read_trace(jsonl, Columns("t", "p", "g")).wanted(3.0).tolist() == [15, 21]
    with pytest.raises(TraceError, match="no column"):
        read_trace(csv_file, Columns(time="when"))
    with pytest.raises(TraceError, match="does not exist"):
        read_trace(tmp_path / "missing.csv")


def test_cli_reports_a_missing_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "local-demo.yaml"
    code = main(["simulate", "-f", str(example), "--trace", str(tmp_path / "nope.csv"), "--out", str(tmp_path)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_writes_the_table_and_the_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "local-demo.yaml"
    trace = tmp_path / "t.csv"
    t = synthetic(3.0, 240.0, np.array([20.0, 200.0]), seed=0)
    trace.write_text(
        "s,p,g\n" + "".join(f"{a},{p},{g}\n" for a, p, g in zip(t.arrival, t.prompt, t.generated, strict=True))
    )
    code = main(
        [
            "simulate",
            "-f",
            str(example),
            "--trace",
            str(trace),
            "--time-column",
            "s",
            "--prompt-column",
            "p",
            "--generated-column",
            "g",
            "--warmup",
            "60",
            "--out",
            str(tmp_path / "r"),
            "--skip-factor-one",
            "--policies",
            "planner,hpa,oracle",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "planner" in out and "oracle" in out
    assert (tmp_path / "r" / "demo-llm-t-F20.png").stat().st_size > 0


def test_policies_in_processes_of_their_own_give_the_same_results_as_one_after_another() -> None:
    spec, trace = sim_spec(), bursty(600, seed=3)
    seen: list[tuple[str, float]] = []
    policies = ("planner", "hpa", "oracle")
    apart = run_benchmark(spec, "t", trace, 1.0, FAST, policies, lambda p, f: seen.append((p, f)), workers=2)
    together = run_benchmark(spec, "t", trace, 1.0, FAST, policies)
    assert apart.results == together.results
    assert list(apart.runs) == list(policies)
    assert np.array_equal(apart.runs["oracle"].series.spend_rate, together.runs["oracle"].series.spend_rate)
    assert {(p, 1.0) for p in policies} <= set(seen)  # each reported done
