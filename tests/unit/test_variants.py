"""The planner over model variants (``core/variants.py``): one budget, a traffic share per variant."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelbudget.api import ControllerState, ModelBudgetSpec
from modelbudget.core import Observation, decide, resolve
from modelbudget.core.capacity import spend_of
from modelbudget.core.planner import Share
from modelbudget.core.variants import Variant, VariantsState, decide_variants
from tests.builders import NOW, make_spec, observe
from tests.unit.test_planner_properties import observations, specs


def _variants(*specs_: ModelBudgetSpec) -> list[Variant]:
    return [Variant(f"v{i}", resolve(s)) for i, s in enumerate(specs_)]


def _fresh(obs: Observation, now) -> Observation:
    """A trusted sample stays trusted as time moves on."""
    if obs.demand.at == NOW:
        return replace(obs, demand=replace(obs.demand, at=now))
    return obs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_one_variant_is_exactly_decide(data):
    """Plan and next state, step after step: with one variant nothing changes."""
    spec = data.draw(specs())
    (variant,) = _variants(spec)
    state, vstate, now = ControllerState(), VariantsState(), NOW
    for _ in range(data.draw(st.integers(1, 4))):
        now += timedelta(seconds=data.draw(st.sampled_from([1, 15, 60, 900])))
        obs = _fresh(data.draw(observations(spec)), now)
        alone = decide(obs, variant.resolved, state, now)
        together = decide_variants([variant], {"v0": obs}, vstate, now)
        assert together.shares == {"v0": 100}
        assert together.decisions["v0"].plan.model_dump() == alone.plan.model_dump()
        assert together.decisions["v0"].next_state == alone.next_state
        assert together.ledger == alone.next_state.ledger
        state, vstate = alone.next_state, together.next_state


def _pair(
    big_tps: float, small_tps: float, big_curve: tuple[float, float], small_curve: tuple[float, float], ceiling: float
) -> tuple[ModelBudgetSpec, ModelBudgetSpec]:
    def one(name: str, tps: float, curve: tuple[float, float]) -> ModelBudgetSpec:
        return make_spec(
            targetRef={"name": name},
            curve={"intercept": curve[0], "slope": curve[1], "minTokens": 64, "maxTokens": 8192},
            budget={"ceiling": {"amount": ceiling, "period": "Hour"}, "valuePerPoint": 0.05},
            replicas={"min": 0, "max": 40, "gpusPerReplica": 1},
            slo={"latencySeconds": 300},  # the token economics decide here, not the latency bound
            nodePools=[
                {
                    "name": "pool-a",
                    "gpuType": "gpu",
                    "pricePerGpuHour": 2.0,
                    "gpusPerNode": 4,
                    "minNodes": 0,
                    "maxNodes": 10,
                    "tokensPerSecondPerReplica": tps,
                }
            ],
        )

    return one("big", big_tps, big_curve), one("small", small_tps, small_curve)


@pytest.mark.parametrize("rps", [0.5, 3.0, 10.0, 30.0])
@pytest.mark.parametrize("ceiling", [16.0, 40.0, 80.0])
def test_a_variant_cheaper_and_better_everywhere_gets_all_traffic(rps, ceiling):
    big, small = _pair(800.0, 2500.0, (0.05, 0.07), (0.15, 0.07), ceiling)
    variants = [Variant("big", resolve(big)), Variant("small", resolve(small))]
    seen = {
        "big": observe(rps=rps / 2, replicas=2, nodes={"pool-a": 1}),
        "small": observe(rps=rps / 2, replicas=2, nodes={"pool-a": 1}),
    }
    out = decide_variants(variants, seen, VariantsState(), NOW)
    assert out.targets == {"big": 0, "small": 100}
    assert out.expected_spend_per_hour <= out.allowance.per_hour + 1e-6
    assert any("split of" in r.message for r in out.split_reasons)


def test_a_cheaper_smaller_variant_takes_traffic_when_the_ceiling_binds():
    """A 70B-like variant (better curve, a tenth of the throughput) and an 8B-like one: with money
    to spare the better curve takes traffic; under a tight ceiling the small model takes more."""
    big, small = _pair(300.0, 3000.0, (0.25, 0.07), (0.15, 0.07), 400.0)
    variants = [Variant("big", resolve(big)), Variant("small", resolve(small))]
    seen = {
        "big": observe(rps=4.0, replicas=4, nodes={"pool-a": 1}),
        "small": observe(rps=4.0, replicas=4, nodes={"pool-a": 1}),
    }
    rich = decide_variants(variants, seen, VariantsState(), NOW)
    tight_big, tight_small = _pair(300.0, 3000.0, (0.25, 0.07), (0.15, 0.07), 16.0)
    poor = decide_variants(
        [Variant("big", resolve(tight_big)), Variant("small", resolve(tight_small))], seen, VariantsState(), NOW
    )
    assert rich.targets["big"] > 50, rich.explain()
    assert poor.targets["small"] > 50, poor.explain()
    assert poor.expected_spend_per_hour <= 16.0 + 1e-6


@st.composite
def variant_specs(draw):
    first = draw(specs())
    rest = [draw(specs()) for _ in range(draw(st.integers(1, 2)))]
    return [first, *(s.model_copy(update={"budget": first.budget}) for s in rest)]


def _check_sum(out, specs_):
    for (name, decision), spec in zip(out.decisions.items(), specs_, strict=True):
        assert spend_of(decision.plan.nodes_by_pool(), spec) == pytest.approx(decision.plan.expected_spend_per_hour)
        assert decision.plan.replicas <= spec.replicas.max, name
    assert out.expected_spend_per_hour <= out.allowance.per_hour + 1e-6
    assert sum(out.shares.values()) == 100
    assert all(0 <= s <= 100 for s in out.shares.values())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_ceiling_holds_over_the_sum_of_the_variants(data):
    specs_ = data.draw(variant_specs())
    variants = _variants(*specs_)
    state, now = VariantsState(), NOW
    for _ in range(data.draw(st.integers(1, 3))):
        now += timedelta(seconds=data.draw(st.sampled_from([1, 15, 60, 900])))
        seen = {v.name: _fresh(data.draw(observations(s)), now) for v, s in zip(variants, specs_, strict=True)}
        out = decide_variants(variants, seen, state, now)
        _check_sum(out, specs_)
        assert out.ledger.spent >= 0
        state = out.next_state


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_variant_with_bad_metrics_never_scales_up_nor_gains_share(data):
    specs_ = data.draw(variant_specs())
    variants = _variants(*specs_)
    published = data.draw(st.lists(st.integers(0, 100), min_size=len(variants), max_size=len(variants)))
    shares = {v.name: p for v, p in zip(variants, published, strict=True)}
    total = sum(shares.values())
    if total != 100:  # make them a split: the remainder to the first
        shares["v0"] = max(0, shares["v0"] + 100 - total)
        total = sum(shares.values())
    if total != 100:
        shares = {v.name: (100 if i == 0 else 0) for i, v in enumerate(variants)}
    seen = {v.name: data.draw(observations(s)) for v, s in zip(variants, specs_, strict=True)}
    out = decide_variants(variants, seen, VariantsState(shares=shares), NOW)
    _check_sum(out, specs_)
    for v in variants:
        if not out.decisions[v.name].verdict.ok:
            assert out.decisions[v.name].plan.replicas <= seen[v.name].current_replicas
            assert out.shares[v.name] <= shares[v.name]
            assert any(r.variant == v.name for r in out.split_reasons)


def test_bad_metrics_hold_the_variant_and_the_rest_splits_what_is_left():
    big, small = _pair(800.0, 2500.0, (0.3, 0.07), (0.15, 0.07), 80.0)
    variants = [Variant("big", resolve(big)), Variant("small", resolve(small))]
    seen = {
        "big": observe(rps=None, replicas=6, nodes={"pool-a": 2}, error="connection refused"),
        "small": observe(rps=3.0, replicas=1, nodes={"pool-a": 1}),
    }
    out = decide_variants(variants, seen, VariantsState(shares={"big": 40, "small": 60}), NOW)
    assert out.shares == {"big": 40, "small": 60}
    assert out.decisions["big"].plan.replicas == 6
    assert out.split_reasons[0].variant == "big"
    assert "never more" in out.split_reasons[0].message
    assert any(m.startswith("MetricsUnreachable: variant big:") for m in out.explain())


def test_a_variant_that_served_nothing_borrows_the_generation_lengths():
    """Routing is by weight, not content: a variant planned for traffic it has not had yet is sized
    with the lengths another variant saw, not with none (which would be untrusted at a rate > 0)."""
    big, small = _pair(800.0, 2500.0, (0.05, 0.07), (0.15, 0.07), 80.0)
    variants = [Variant("big", resolve(big)), Variant("small", resolve(small))]
    idle = observe(rps=0.0, replicas=0, nodes={"pool-a": 0})
    idle = replace(idle, demand=replace(idle.demand, generation=None))
    seen = {"big": observe(rps=6.0, replicas=4, nodes={"pool-a": 1}), "small": idle}
    out = decide_variants(variants, seen, VariantsState(shares={"big": 100, "small": 0}), NOW)
    assert out.decisions["small"].verdict.ok
    assert out.targets["small"] == 100
    assert out.decisions["small"].plan.replicas > 0
    # None of its replicas is ready: the traffic stays where replicas serve until they are.
    assert out.shares == {"big": 100, "small": 0}
    assert any(r.reason == "CapacityCatchingUp" and r.variant == "small" for r in out.split_reasons)


def test_traffic_moves_as_fast_as_ready_replicas_carry_it_and_the_aim_is_held_for_the_window():
    big, small = _pair(800.0, 2500.0, (0.05, 0.07), (0.15, 0.07), 80.0)
    variants = [Variant("big", resolve(big)), Variant("small", resolve(small))]
    seen = {
        "big": observe(rps=4.0, replicas=4, nodes={"pool-a": 1}),
        "small": observe(rps=0.0, replicas=2, ready=1, nodes={"pool-a": 1}),
    }
    first = decide_variants(variants, seen, VariantsState(shares={"big": 100, "small": 0}), NOW)
    assert first.targets == {"big": 0, "small": 100}
    assert 0 < first.shares["small"] < 100  # what one ready replica carries
    # Once its replicas are ready, all of it.
    ready = {**seen, "small": observe(rps=first.shares["small"] * 0.04, replicas=8, nodes={"pool-a": 2})}
    later = decide_variants(variants, ready, first.next_state, NOW + timedelta(seconds=15))
    assert later.shares == {"big": 0, "small": 100}


def test_variants_share_one_budget():
    big, small = _pair(800.0, 2500.0, (0.05, 0.07), (0.15, 0.07), 80.0)
    other = small.model_copy(update={"budget": small.budget.model_copy(update={"value_per_point": 0.5})})
    with pytest.raises(ValueError, match="budget of its own"):
        decide_variants(_variants(big, other), {"v0": observe(), "v1": observe()}, VariantsState(), NOW)


def test_a_variants_forecast_reads_the_whole_demands_history():
    """A variant's own rate jumps with every change of the split: its forecast is made from the
    whole demand's history, and scaled by its share."""
    resolved = resolve(make_spec())
    part = decide(observe(rps=3.0), resolved, ControllerState(), NOW, share=Share(10.0, 0.3))
    whole = decide(observe(rps=10.0), resolved, ControllerState(), NOW)
    assert part.next_state.demand_history is not None
    assert part.next_state.demand_history == whole.next_state.demand_history
