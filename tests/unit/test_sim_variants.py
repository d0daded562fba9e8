"""The simulator over variants (``sim/variants.py``): routing, one set of books, per-variant scoring."""

from __future__ import annotations

import numpy as np
import pytest

from modelbudget.api import ModelBudgetSpec
from modelbudget.sim.run import SimConfig, Workload
from modelbudget.sim.trace import synthetic
from modelbudget.sim.variants import Router, run_variants, score_variants
from tests.builders import make_spec


def variant_specs(ceiling: float) -> list[tuple[str, ModelBudgetSpec]]:
    def one(name: str, intercept: float, tps: float, gpus: int) -> tuple[str, ModelBudgetSpec]:
        return name, make_spec(
            targetRef={"name": name},
            curve={"intercept": intercept, "slope": 0.08, "minTokens": 64, "maxTokens": 8192},
            budget={"ceiling": {"amount": ceiling, "period": "Hour"}, "valuePerPoint": 0.05},
            replicas={"min": 0, "max": 16, "gpusPerReplica": gpus},
            slo={"latencySeconds": 120},
            nodePools=[
                {
                    "name": f"{name}-pool",
                    "gpuType": "gpu",
                    "pricePerGpuHour": 2.0,
                    "gpusPerNode": 4,
                    "minNodes": 0,
                    "maxNodes": 4,
                    "tokensPerSecondPerReplica": tps,
                }
            ],
        )

    return [one("big", 0.22, 1720.0, 2), one("small", 0.10, 5000.0, 1)]


@pytest.mark.parametrize("weights", [{"a": 30, "b": 70}, {"a": 0, "b": 100}, {"a": 34, "b": 33, "c": 33}])
def test_the_router_keeps_every_prefix_within_one_request_of_the_shares(weights):
    router = Router(list(weights))
    picks = router.route(weights, 500)
    for n in (1, 7, 100, 500):
        counts = np.bincount(picks[:n], minlength=len(weights))
        for k, w in enumerate(weights.values()):
            assert abs(counts[k] - n * w / 100) <= 1.0 + 1e-9


def test_the_router_is_deterministic():
    assert (
        Router(["a", "b"]).route({"a": 40, "b": 60}, 50).tolist()
        == Router(["a", "b"]).route({"a": 40, "b": 60}, 50).tolist()
    )


@pytest.mark.parametrize("policy", ["planner", "oracle"])
def test_a_replay_over_two_variants_routes_every_request_once_and_keeps_the_shared_ceiling(policy):
    variants = variant_specs(ceiling=40.0)
    config = SimConfig(warmup=120.0)
    work = Workload.of(synthetic(3.0, 600.0, np.array([200.0, 2000.0]), seed=1), 1.0, config.warmup)
    run = run_variants(variants, work, policy, config)
    arrived = run.owner >= 0
    assert arrived.all()  # every request arrived, each at one variant
    for k, (name, _) in enumerate(variants):
        world = run.worlds[name]
        mine = run.owner == k
        assert not world.routed[~mine].any()  # type: ignore[index]
    assert (run.spend_rate <= run.allowance + 1e-6).all()
    result = score_variants(run, work, variants)
    assert result.breach_minutes == 0
    assert result.requests == int(work.scored.sum())
    assert 0 < result.total_score <= result.requests
    assert result.dollars == pytest.approx(float(np.sum(run.spend_rate)) * config.step / 3600.0)
