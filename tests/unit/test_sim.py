"""The trace-replay simulator: conservation, the analytic optimum, the oracle bound, the ceiling."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelbudget.api import ModelBudgetSpec
from modelbudget.cli import main
from modelbudget.core.capacity import cost_per_token
from modelbudget.core.planner import GRID_STEPS_PER_DOUBLING, resolve
from modelbudget.sim.benchmark import run_benchmark
from modelbudget.sim.hindsight import fixed_limits
from modelbudget.sim.run import PolicyRun, SimConfig, Workload, run_policy
from modelbudget.sim.score import score
from modelbudget.sim.trace import Columns, Trace, TraceError, read_trace, repeat_daily, synthetic
from modelbudget.sim.world import QUEUED, REJECTED, SERVED, TIMED_OUT, Interruptions

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
    for policy in ("planner", "hpa", "keda", "static", "oracle", "oracle-delays"):
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
    # L* small enough that an answer at it (400 x ~0.1 s) finishes well within the 2 m metrics
    # window: demand is read from completions, which lag arrivals by the answer's duration.
    target = 400.0
    v = target * c / 0.08  # so that L* = v*b/c = 400, inside [128, 16384]
    # An SLO that an answer at L* meets even on a full batch, so latency does not bind, and
    # replicas whose full batch (2500 tok/s) is above the 2000 tok/s the planner plans at, so a
    # replica at its planned load is not saturated and the queue stays short.
    budget = {"ceiling": {"amount": 1000, "period": "Hour"}, "valuePerPoint": v}
    pool = {**sim_spec().model_dump(by_alias=True)["nodePools"][0], "serving": {"decodeBetaSeconds": 0.00032}}
    # The economics alone: the forecast would add headroom for the observed rate's window noise
    # (completions, not arrivals), which tests/unit/test_forecast.py covers.
    behavior = {**sim_spec().behavior.model_dump(by_alias=True), "forecast": {"enabled": False}}
    spec = sim_spec(budget=budget, slo={"latencySeconds": 1800}, nodePools=[pool], behavior=behavior)
    work = Workload.of(synthetic(rate, 1200.0, 100_000.0), 1.0, 600.0)
    run = run_policy(spec, work, "planner", SimConfig(warmup=600.0, drain=40.0))

    late = (run.series.t > 600.0) & (run.series.t < 1200.0)  # the last ten minutes of arrivals: steady state
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


def test_delay_aware_oracle_asks_for_capacity_one_lead_ahead_of_a_step() -> None:
    # 10 minutes at 2 req/s, then 10 at 20 req/s: the step needs many more 1-GPU nodes.
    quiet, busy = synthetic(2.0, 600.0, 2000.0), synthetic(20.0, 600.0, 2000.0)
    trace = Trace(
        np.concatenate([quiet.arrival, busy.arrival + 600.0]),
        np.concatenate([quiet.prompt, busy.prompt]),
        np.concatenate([quiet.generated, busy.generated]),
        "step",
    )
    spec, work = sim_spec(), Workload.of(trace, 1.0, FAST.warmup)
    lead = FAST.delays.node_provision + FAST.delays.replica_start
    delayed = run_policy(spec, work, "oracle-delays", FAST)
    free = run_policy(spec, work, "oracle", FAST)

    def first_rise(replicas: np.ndarray, t: np.ndarray) -> float:
        return float(t[np.flatnonzero(replicas > replicas[0])[0]])

    # The delay-free oracle scales at the step; the delay-aware one exactly one lead before it,
    # so that its new replicas serve when the step comes.
    assert first_rise(free.series.replicas, free.series.t) == pytest.approx(600.0, abs=FAST.step)
    assert first_rise(delayed.series.replicas, delayed.series.t) == pytest.approx(600.0 - lead, abs=FAST.step)
    # Every moment, as many replicas serve as the delay-free oracle uses then (its shadow run is that run).
    assert np.all(delayed.series.ready >= free.series.replicas)
    result = score(delayed, work, spec)
    assert result.slo_attainment == 1.0
    assert result.dropped == 0


def test_hpa_at_the_best_fixed_limit_is_the_best_of_every_fixed_limit() -> None:
    # A ceiling of three 1-GPU nodes under bursts: at the top limit the HPA cannot keep up.
    spec = sim_spec(budget={"ceiling": {"amount": 6, "period": "Hour"}, "valuePerPoint": 0.01})
    bench = run_benchmark(spec, "t", bursty(900, seed=2), 20.0, FAST, policies=("hpa", "hpa-best"))
    assert bench.hpa_best_limit in fixed_limits(spec)
    assert max(fixed_limits(spec)) == resolve(spec).token_max  # the plain HPA's limit is one of those tried
    work = Workload.of(bursty(900, seed=2), 20.0, FAST.warmup)
    for limit in fixed_limits(spec):
        run = run_policy(spec, work, "hpa", replace(FAST, hpa_limit=limit))
        assert score(run, work, spec).net_value <= bench.results["hpa-best"].net_value + 1e-9, limit
    assert bench.results["hpa-best"].net_value > bench.results["hpa"].net_value
    assert bench.hpa_best_limit < resolve(spec).token_max


def spot_run(interruptions: Interruptions) -> tuple[PolicyRun, Workload, ModelBudgetSpec, SimConfig]:
    """The planner on a cheap spot pool and an on-demand one, 6 req/s for 25 minutes."""
    pool = {"gpuType": "g", "gpusPerNode": 2, "maxNodes": 6, "tokensPerSecondPerReplica": 2000}
    spec = sim_spec(
        budget={"ceiling": {"amount": 12, "period": "Hour"}, "valuePerPoint": 0.05},
        nodePools=[
            {**pool, "name": "spot", "pricePerGpuHour": 1.0, "capacityType": "Spot"},
            {**pool, "name": "ondemand", "pricePerGpuHour": 2.5, "minNodes": 1},
        ],
    )
    config = SimConfig(warmup=300.0, interruptions=interruptions)
    work = Workload.of(synthetic(6.0, 1500.0, np.geomspace(50, 2000, 16), seed=1), 1.0, config.warmup)
    return run_policy(spec, work, "planner", config), work, spec, config


@pytest.mark.parametrize(
    "interruptions",
    [Interruptions(at=(400.0, 405.0, 900.0)), Interruptions(per_node_hour=2.0, seed=2)],
    ids=["schedule", "rate"],
)
def test_spot_interruptions_keep_the_ceiling_and_lose_no_request(interruptions: Interruptions) -> None:
    run, work, spec, _ = spot_run(interruptions)
    assert run.world.interrupted >= 3
    assert score(run, work, spec).breach_minutes == 0
    assert np.all(run.series.spend_rate <= run.series.allowance + 1e-9)
    # Requests on a lost pod are retried, never lost: everything is served or gave up in the queue.
    assert np.count_nonzero(run.world.status == QUEUED) == 0


def test_capacity_lost_to_a_spot_interruption_comes_back() -> None:
    run, _, _, config = spot_run(Interruptions(at=(400.0, 405.0)))  # two spot nodes, 5 s apart
    s = run.series
    before = s.ready[(s.t >= 300) & (s.t < 400)].min()
    assert s.ready[(s.t >= 405) & (s.t < 415)].max() < before  # the interruption took pods away
    # The pool replaces its nodes (120 s), the pods start again (60 s), within a decision and a step.
    delay = config.delays.node_provision + config.delays.replica_start + config.decision_interval + config.step
    back = (s.t >= 405 + delay) & (s.t < 405 + delay + 120)  # later moves between pools are the planner's own
    assert np.all(s.ready[back] >= np.minimum(before, s.replicas[back]))


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
