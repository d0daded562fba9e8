"""Shared GPU pools, the pure half: the split rule, one size per pool, billing by share, the
ceiling on each share, the scale-down hold, and the view each ModelBudget plans on."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelbudget.api.pool import GpuPoolSpec, GpuPoolStatus, PoolGrant, SizeWanted
from modelbudget.api.spec import SharedPool
from modelbudget.api.status import ControllerState, PoolClaim
from modelbudget.core.pools import SPLIT_RULE, Claimant, bounded_claim, claims_of, pool_view, settle, split
from tests.builders import NOW, decide_for, make_spec, observe


def gpu_pool(**patch: Any) -> GpuPoolSpec:
    return GpuPoolSpec.model_validate(
        {
            "providerRef": {"kind": "KwokNodePool", "name": "shared-l4"},
            "gpuType": "nvidia-l4",
            "pricePerGpuHour": 2.0,
            "gpusPerNode": 4,
            "minNodes": 0,
            "maxNodes": 4,
            "allowedNamespaces": {"namespaces": ["team-a", "team-b"]},
            **patch,
        }
    )


def claimant(namespace: str, gpus: int, payable: float = 1e6, per_replica: int = 1) -> Claimant:
    return Claimant(
        namespace, "llm", PoolClaim(pool="p", gpus=gpus, gpus_per_replica=per_replica, payable_per_hour=payable)
    )


def test_claims_that_fit_are_granted_and_the_pool_is_sized_to_their_sum() -> None:
    done = settle(gpu_pool(), [claimant("team-a", 3), claimant("team-b", 2)], sized_now=0, history=[], now=NOW)
    assert [g.granted_gpus for g in done.status.grants] == [3, 2]
    assert done.nodes == 2  # 5 GPUs on 4-GPU nodes
    assert done.status.split is None


def test_shares_add_up_to_the_bill_rounding_included() -> None:
    done = settle(gpu_pool(), [claimant("team-a", 3), claimant("team-b", 2)], sized_now=0, history=[], now=NOW)
    bill = 2 * 4 * 2.0
    assert done.status.bill_per_hour == bill
    shares = [g.share_per_hour for g in done.status.grants]
    assert sum(shares) == pytest.approx(bill)
    assert shares == pytest.approx([bill * 3 / 5, bill * 2 / 5])
    assert done.status.unbilled_per_hour == 0


def test_claims_beyond_max_are_split_in_proportion_in_whole_replicas() -> None:
    pool = gpu_pool(maxNodes=2)  # 8 GPUs
    done = settle(
        pool,
        [claimant("team-a", 12, per_replica=2), claimant("team-b", 4, per_replica=1)],
        sized_now=0,
        history=[],
        now=NOW,
    )
    grants = {g.namespace: g.granted_gpus for g in done.status.grants}
    # fair shares 6 and 2 GPUs: a gets 3 replicas of 2, b 2 replicas of 1.
    assert grants == {"team-a": 6, "team-b": 2}
    assert done.nodes == 2
    assert done.status.split == SPLIT_RULE


def test_split_hands_rounding_leftovers_to_the_largest_remainders() -> None:
    grants = split(7, [claimant("team-a", 5), claimant("team-b", 5)])
    # fair 3.5 each: the spare GPU goes to the first by name on a tie; never beyond a claim.
    assert grants == {("team-a", "llm"): 4, ("team-b", "llm"): 3}


def test_a_share_beyond_what_the_allowance_pays_cuts_that_grant() -> None:
    # b claims 1 GPU but pays only $3/h: alone on the pool it would pay a whole node ($8/h).
    done = settle(gpu_pool(), [claimant("team-b", 1, payable=3.0)], sized_now=0, history=[], now=NOW)
    assert done.status.grants[0].granted_gpus == 0
    assert done.nodes == 0
    assert "grant cut" in (done.status.message or "")


def test_idle_min_nodes_with_nothing_granted_are_shown_unbilled() -> None:
    done = settle(gpu_pool(minNodes=1), [], sized_now=1, history=[], now=NOW)
    assert done.nodes == 1
    assert done.status.unbilled_per_hour == 8.0


def test_scale_down_waits_out_the_window_and_then_shrinks() -> None:
    pool = gpu_pool(scaleDownStabilizationSeconds=600)
    first = settle(pool, [claimant("team-a", 8)], sized_now=0, history=[], now=NOW)
    assert first.nodes == 2
    later = NOW + timedelta(seconds=60)
    held = settle(pool, [claimant("team-a", 1)], sized_now=2, history=first.status.wanted, now=later)
    assert held.nodes == 2 and "holding 2 nodes" in (held.status.message or "")
    # While held, the one claimant pays the whole held pool: the bill still adds up.
    assert held.status.grants[0].share_per_hour == pytest.approx(held.status.bill_per_hour)
    after = NOW + timedelta(seconds=700)
    shrunk = settle(pool, [claimant("team-a", 1)], sized_now=2, history=held.status.wanted, now=after)
    assert shrunk.nodes == 1


def test_the_size_does_not_flap_under_alternating_claims() -> None:
    pool, history, sized, sizes = gpu_pool(), list[SizeWanted](), 0, []
    for tick in range(10):
        gpus = 8 if tick % 2 == 0 else 2
        done = settle(pool, [claimant("team-a", gpus)], sized, history, NOW + timedelta(seconds=30 * tick))
        history, sized = list(done.status.wanted), done.nodes
        sizes.append(done.nodes)
    assert sizes == [2] * 10


claims_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=40),
        st.floats(min_value=0, max_value=200, allow_nan=False),
        st.sampled_from([1, 2, 4]),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    claims=claims_strategy,
    max_nodes=st.integers(min_value=0, max_value=8),
    min_nodes=st.integers(min_value=0, max_value=3),
)
def test_every_share_is_payable_and_the_shares_add_up_to_the_bill(
    claims: list[tuple[int, float, int]], max_nodes: int, min_nodes: int
) -> None:
    pool = gpu_pool(maxNodes=max_nodes, minNodes=min(min_nodes, max_nodes))
    claimants = [
        claimant(f"ns-{i}", gpus - gpus % per_replica, payable, per_replica)
        for i, (gpus, payable, per_replica) in enumerate(claims)
    ]
    done = settle(pool, claimants, sized_now=None, history=[], now=NOW)
    by_ns = {c.namespace: c.claim for c in claimants}
    granted = 0
    for g in done.status.grants:
        claim = by_ns[g.namespace]
        assert 0 <= g.granted_gpus <= claim.gpus
        assert g.granted_gpus % claim.gpus_per_replica == 0
        assert g.share_per_hour <= claim.payable_per_hour + 1e-6  # the ceiling, per ModelBudget, on its share
        granted += g.granted_gpus
    assert granted <= pool.max_gpus
    assert pool.min_nodes <= done.nodes <= pool.max_nodes
    assert done.nodes * pool.gpus_per_node >= granted
    billed = sum(g.share_per_hour for g in done.status.grants) + (done.status.unbilled_per_hour or 0)
    assert billed == pytest.approx(done.status.bill_per_hour)


def test_the_view_prices_a_share_and_bounds_replicas_by_grant_plus_unclaimed_room() -> None:
    pool = gpu_pool()  # 16 GPUs at most
    status = GpuPoolStatus(
        nodes=2,
        bill_per_hour=16.0,
        grants=[
            PoolGrant(namespace="team-a", name="llm", claimed_gpus=3, granted_gpus=3, share_per_hour=9.6),
            PoolGrant(namespace="team-b", name="llm", claimed_gpus=2, granted_gpus=2, share_per_hour=6.4),
        ],
    )
    view = pool_view(SharedPool(pool="p", tokensPerSecondPerReplica=500), pool, status, "team-a", "llm", 1)
    assert view.granted_replicas == 3
    assert view.pool.max_nodes == 14  # 16 - team-b's 2
    # Holding its grant on the view costs exactly its share of the bill.
    assert view.granted_replicas * view.pool.gpus_per_node * view.pool.price_per_gpu_hour == pytest.approx(9.6)


def test_a_plan_on_the_view_becomes_a_claim_within_the_allowance() -> None:
    pool = gpu_pool()
    view = pool_view(SharedPool(pool="p", tokensPerSecondPerReplica=1000), pool, None, "team-a", "llm", 1)
    spec = make_spec(nodePools=[view.pool.model_dump(by_alias=True, exclude_none=True)])
    decision = decide_for(observe(rps=5.0, nodes={"p": 0}), spec, ControllerState(), NOW)
    [claim] = claims_of(decision.plan, [SharedPool(pool="p", tokensPerSecondPerReplica=1000)], 1)
    assert claim.gpus == decision.plan.nodes_by_pool()["p"] > 0
    assert claim.payable_per_hour == pytest.approx(decision.plan.allowed_spend_per_hour)


def test_a_claim_is_bounded_by_what_its_spec_could_ask() -> None:
    spec = make_spec(replicas={"min": 0, "max": 3, "gpusPerReplica": 2})
    forged = PoolClaim(pool="p", gpus=101, gpus_per_replica=1, payable_per_hour=1.0)
    bounded = bounded_claim(forged, spec)
    assert (bounded.gpus, bounded.gpus_per_replica) == (6, 2)
    assert bounded_claim(PoolClaim(pool="p", gpus=3, gpus_per_replica=2, payable_per_hour=1.0), spec).gpus == 2
