"""The simulator and the testbed's model server serve alike: same trace, same pods, same percentiles.

Both run the one serving engine, but each drives it its own way: the simulator's world in 5 s steps
from arrays (its token bucket, its pods from node and pod bookkeeping), the testbed server in
0.25 s ticks from a replayed trace (its demand, its metrics). The latency percentiles of what
each served must agree within 10%.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.core.serving import serving_speed
from modelbudget.sim.world import NO_DELAYS, SERVED, Action, World
from modelbudget.testbed.demand import LognormalSizes, TraceDemand, TraceRow
from modelbudget.testbed.modelserver import ModelServer, VllmMetrics
from modelbudget.testbed.serving import ServingModel, TickResult

PODS = 2
LIMIT = 1024
SECONDS = 240.0
TIMEOUT = 120.0


def spec() -> ModelBudgetSpec:
    pool = {
        "name": "p",
        "gpuType": "g",
        "pricePerGpuHour": 2.0,
        "gpusPerNode": 1,
        "maxNodes": PODS,
        "tokensPerSecondPerReplica": 2000,
        "serving": {"maxNumSeqs": 32, "prefillTokensPerSecond": 8000},
    }
    return ModelBudgetSpec.model_validate(
        {
            "targetRef": {"name": "m"},
            "curve": {"intercept": 0.1, "slope": 0.08, "minTokens": 16, "maxTokens": 4096},
            "budget": {"ceiling": {"amount": 100, "period": "Hour"}, "valuePerPoint": 0.01},
            "replicas": {"min": 1, "max": PODS},
            "nodePools": [pool],
            "metrics": {"prometheusUrl": "http://prom:9090"},
        }
    )


def short_trace() -> list[TraceRow]:
    """Four minutes at ~8 req/s on two pods, near their full batches so requests also queue (seeded)."""
    rng = np.random.default_rng(13)
    count = rng.poisson(8 * SECONDS)
    offsets = np.sort(rng.uniform(0, SECONDS, count))
    prompts = np.round(rng.lognormal(np.log(1500), 0.8, count)).astype(int)
    answers = np.maximum(np.round(rng.lognormal(np.log(300), 0.9, count)), 1).astype(int)
    return [TraceRow(float(o), int(p), int(g)) for o, p, g in zip(offsets, prompts, answers, strict=True)]


def simulated(rows: list[TraceRow]) -> tuple[np.ndarray, np.ndarray]:
    arrival = np.array([r.offset for r in rows])
    world = World(
        spec(),
        arrival,
        np.array([float(r.generated_tokens) for r in rows]),
        np.array([float(r.prompt_tokens) for r in rows]),
        NO_DELAYS,
        TIMEOUT,
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    world.place({"p": PODS}, {"p": PODS}, 0.0)
    world.apply(Action({"p": PODS}, {"p": PODS}, LIMIT), 0.0)
    t = 0.0
    while t < SECONDS + TIMEOUT:
        world.step(t, 5.0)
        t += 5.0
    served = world.status == SERVED
    assert served.all()
    return (world.finish - world.arrival)[served], (world.first_token - world.arrival)[served]


class Recorder(VllmMetrics):
    """The server's metrics, keeping each finished request's latencies as well as the histograms."""

    def __init__(self) -> None:
        super().__init__(CollectorRegistry(), "m", "ns")
        self.e2e_seen: list[float] = []
        self.ttft_seen: list[float] = []

    def record(self, result: TickResult) -> None:
        super().record(result)
        self.e2e_seen += [f.e2e_latency for f in result.finished]
        self.ttft_seen += [f.time_to_first_token for f in result.finished]


def on_the_testbed_server(rows: list[TraceRow]) -> tuple[np.ndarray, np.ndarray]:
    model = ServingModel(serving_speed(spec().node_pools[0]), TIMEOUT)
    model.set_ready_pods([f"m-{i}" for i in range(PODS)])
    model.set_token_limit(LIMIT)
    metrics = Recorder()
    rng = np.random.default_rng(0)
    server = ModelServer(
        model,
        TraceDemand(rows, 0.0, 1.0, 1.0, loop=False),
        LognormalSizes(1500, 300, 0.8),
        None,
        metrics,
        tick_seconds=0.25,
        poll_seconds=1.0,
        reasoning_factor=1.0,
        poisson=False,
        rng=rng,
    )
    while server.now < SECONDS + TIMEOUT:
        server.step()
    assert server.state()["finished"] == len(rows)
    return np.array(metrics.e2e_seen), np.array(metrics.ttft_seen)


@pytest.mark.parametrize("q", [50, 90, 95, 99])
def test_simulator_and_testbed_server_give_the_same_latency_percentiles(q: float) -> None:
    rows = short_trace()
    sim_e2e, sim_ttft = simulated(rows)
    bed_e2e, bed_ttft = on_the_testbed_server(rows)
    assert sim_e2e.size == bed_e2e.size == len(rows)
    assert np.percentile(bed_e2e, q) == pytest.approx(np.percentile(sim_e2e, q), rel=0.10)
    assert np.percentile(bed_ttft, q) == pytest.approx(np.percentile(sim_ttft, q), rel=0.10)
