"""Shared GPU pools: claims, the split rule, the pool's size and each ModelBudget's share: pure.

Two halves meet in a GpuPool's status:

* a ModelBudget's reconcile sees a shared pool through ``pool_view``: a pool of one-replica
  "nodes" it may fill up to its grant plus the pool's unclaimed room, priced so that what it
  holds costs exactly its share of the pool's bill. The planner is unchanged: it sizes replicas
  on that view, and its plan becomes the ModelBudget's claim (``claims_of``);
* the pool reconciler (``settle``) sums the claims, splits ``maxNodes`` when they exceed it,
  sizes the pool once, and bills each ModelBudget ``bill x its granted GPUs / all granted GPUs``
  -- so the shares add up to the bill -- never more than the claim says its allowance pays.

The split rule, when claims exceed ``maxNodes x gpusPerNode``: every claim gets the same
fraction of what it asked, rounded down to whole replicas; GPUs left by the rounding go one
replica at a time to the largest rounded-off remainders (ties: namespace/name). Proportional
and order-free: no tenant can gain by naming itself first, only by claiming more, and a claim
is bounded by what its own allowance pays for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from modelbudget.api.pool import GpuPoolSpec, GpuPoolStatus, PoolGrant, SizeWanted
from modelbudget.api.spec import ModelBudgetSpec, NodePool, SharedPool
from modelbudget.api.status import Plan, PoolClaim

_EPS = 1e-9
SPLIT_RULE = "in proportion to claims, in whole replicas, largest remainders first"


@dataclass(frozen=True)
class Claimant:
    namespace: str
    name: str
    claim: PoolClaim

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class PoolView:
    """A shared pool as one ModelBudget's planner sees it."""

    pool: NodePool  # one "node" = one replica's GPUs; maxNodes = the replicas it may hold
    granted_replicas: int  # what it holds now: its share of the bill is these "nodes" at the view's price


def _grants(status: GpuPoolStatus | None) -> list[PoolGrant]:
    return list(status.grants) if status is not None else []


def overhead_factor(spec: GpuPoolSpec, status: GpuPoolStatus | None) -> float:
    """The pool's bill per granted GPU over the GPU price (>= 1): whole-node rounding and idle GPUs."""
    granted = sum(g.granted_gpus for g in _grants(status))
    bill = status.bill_per_hour if status is not None else None
    if not granted or not bill:
        return 1.0
    return max(bill / (granted * spec.price_per_gpu_hour), 1.0)


def pool_view(
    shared: SharedPool,
    spec: GpuPoolSpec,
    status: GpuPoolStatus | None,
    namespace: str,
    name: str,
    gpus_per_replica: int,
) -> PoolView:
    """What the ModelBudget ``namespace/name`` may use of a shared pool, and what it costs it."""
    grants = _grants(status)
    own = sum(g.granted_gpus for g in grants if (g.namespace, g.name) == (namespace, name))
    others = sum(g.granted_gpus for g in grants if (g.namespace, g.name) != (namespace, name))
    may_use = max(spec.max_gpus - others, 0)
    factor = overhead_factor(spec, status)
    view = NodePool(
        name=shared.pool,
        gpu_type=spec.gpu_type,
        price_per_gpu_hour=spec.price_per_gpu_hour,
        capacity_type=spec.capacity_type,
        gpus_per_node=gpus_per_replica,
        min_nodes=0,
        max_nodes=min(may_use // gpus_per_replica, 10_000),
        tokens_per_second_per_replica=shared.tokens_per_second_per_replica,
        serving=shared.serving,
    )
    # The price is not re-validated: with rounding on big nodes it may pass the spec's bound.
    priced = view.model_copy(update={"price_per_gpu_hour": spec.price_per_gpu_hour * factor})
    return PoolView(priced, min(own // gpus_per_replica, priced.max_nodes))


def with_views(spec: ModelBudgetSpec, views: Sequence[PoolView]) -> ModelBudgetSpec:
    """The spec as the planner sees it: its own pools, then its view of each shared pool."""
    return spec.model_copy(update={"node_pools": [*spec.node_pools, *(v.pool for v in views)]}) if views else spec


def claims_of(plan: Plan, shared: Sequence[SharedPool], gpus_per_replica: int) -> list[PoolClaim]:
    """The plan's replicas on each shared pool, as claims; each pays at most what the allowance
    leaves after the plan's other pools."""
    allocations = {a.pool: a for a in plan.pools}
    claims = []
    for s in shared:
        a = allocations.get(s.pool)
        nodes, spend = (a.nodes, a.spend_per_hour) if a is not None else (0, 0.0)
        others = plan.expected_spend_per_hour - spend
        claims.append(
            PoolClaim(
                pool=s.pool,
                gpus=nodes * gpus_per_replica,
                gpus_per_replica=gpus_per_replica,
                payable_per_hour=max(plan.allowed_spend_per_hour - others, 0.0),
            )
        )
    return claims


def bounded_claim(claim: PoolClaim, spec: ModelBudgetSpec) -> PoolClaim:
    """A claim as far as its ModelBudget's spec could ask: at most ``replicas.max`` replicas of
    the spec's GPUs each. The claim sits in a status, which whoever may write the status can
    edit; the spec is what the tenant is accountable for."""
    per_replica = spec.replicas.gpus_per_replica
    most = spec.replicas.max * per_replica
    gpus = min(claim.gpus - claim.gpus % per_replica, most)
    return claim.model_copy(update={"gpus": max(gpus, 0), "gpus_per_replica": per_replica})


def stated_claims(
    namespace: str, name: str, raw_spec: Mapping[str, Any], raw_status: Mapping[str, Any]
) -> dict[str, Claimant]:
    """The claims on shared pools a ModelBudget's status states, by pool, each bounded by its spec
    (``bounded_claim``): what a pool's settlement sums.  A spec that does not parse claims
    nothing, nor does a claim this version did not write (no claim rather than a wrong one), nor
    one on a pool the spec does not name."""
    raw_claims = raw_status.get("poolClaims") or []
    if not raw_claims:
        return {}
    try:
        spec = ModelBudgetSpec.model_validate(dict(raw_spec))
    except ValueError:
        return {}
    claims = {}
    for raw in raw_claims:
        try:
            claim = PoolClaim.model_validate(raw)
        except ValueError:
            continue
        if any(s.pool == claim.pool for s in spec.shared_pools):
            claims[claim.pool] = Claimant(namespace, name, bounded_claim(claim, spec))
    return claims


def split(max_gpus: int, claimants: Sequence[Claimant]) -> dict[tuple[str, str], int]:
    """GPUs granted to each claimant: everything when the claims fit, else the split rule."""
    asked = sum(c.claim.gpus for c in claimants)
    if asked <= max_gpus:
        return {c.key: c.claim.gpus for c in claimants}
    fair = {c.key: max_gpus * c.claim.gpus / asked for c in claimants}
    grants = {c.key: math.floor(fair[c.key] / c.claim.gpus_per_replica) * c.claim.gpus_per_replica for c in claimants}
    left = max_gpus - sum(grants.values())
    by_remainder = sorted(claimants, key=lambda c: (-(fair[c.key] - grants[c.key]), c.key))
    for c in by_remainder:
        step = c.claim.gpus_per_replica
        if step <= left and grants[c.key] + step <= c.claim.gpus:
            grants[c.key] += step
            left -= step
    return grants


def _nodes_for(spec: GpuPoolSpec, gpus: int) -> int:
    return min(max(math.ceil(gpus / spec.gpus_per_node), spec.min_nodes), spec.max_nodes)


def _shares(bill: float, grants: dict[tuple[str, str], int]) -> dict[tuple[str, str], float]:
    total = sum(grants.values())
    return {k: (bill * g / total if total else 0.0) for k, g in grants.items()}


def _bill(spec: GpuPoolSpec, nodes: int) -> float:
    return nodes * spec.gpus_per_node * spec.price_per_gpu_hour


def _over_payable(
    claimants: Sequence[Claimant], shares: dict[tuple[str, str], float], grants: dict[tuple[str, str], int]
) -> Claimant | None:
    """The claimant billed furthest beyond what it pays for (None: every share is payable)."""
    over = [c for c in claimants if grants[c.key] > 0 and shares[c.key] > c.claim.payable_per_hour + _EPS]
    return min(over, key=lambda c: (-(shares[c.key] - c.claim.payable_per_hour), c.key), default=None)


@dataclass(frozen=True)
class Settlement:
    status: GpuPoolStatus
    nodes: int  # what the provider object should be sized to


def settle(
    spec: GpuPoolSpec,
    claimants: Sequence[Claimant],
    sized_now: int | None,
    history: Sequence[SizeWanted],
    now: datetime,
) -> Settlement:
    """Grants, the pool's size and each share, from the claims seen now."""
    claimants = sorted(claimants, key=lambda c: c.key)
    grants = split(spec.max_gpus, claimants)
    notes: list[str] = []
    over_max = sum(c.claim.gpus for c in claimants) > spec.max_gpus
    if over_max:
        notes.append(
            f"claims of {sum(c.claim.gpus for c in claimants)} GPUs exceed maxNodes "
            f"({spec.max_gpus} GPUs): split in proportion to claims, in whole replicas"
        )
    # The ceiling holds on each share: cut the grant of whoever is billed beyond what it pays.
    # Each cut takes a replica off a grant, and with nothing granted no share is over: this ends.
    nodes = _nodes_for(spec, sum(grants.values()))
    while (over := _over_payable(claimants, _shares(_bill(spec, nodes), grants), grants)) is not None:
        grants[over.key] -= over.claim.gpus_per_replica
        nodes = _nodes_for(spec, sum(grants.values()))
        cut = f"{over.namespace}/{over.name}: grant cut to keep its share within what it pays"
        if cut not in notes:
            notes.append(cut)
    wanted = nodes
    # Scale-down waits out the window: the largest size wanted within it, as far as every share pays.
    window = timedelta(seconds=spec.scale_down_stabilization_seconds)
    recent = [w for w in history if now - w.at < window]
    if sized_now is not None and nodes < sized_now:
        held = min(max([nodes, *(w.nodes for w in recent)]), sized_now, spec.max_nodes)
        if held > nodes and _over_payable(claimants, _shares(_bill(spec, held), grants), grants) is None:
            notes.append(f"holding {held} nodes (wanted {nodes}) for {spec.scale_down_stabilization_seconds}s")
            nodes = held
    bill = _bill(spec, nodes)
    shares = _shares(bill, grants)
    granted_any = sum(grants.values()) > 0
    status = GpuPoolStatus(
        nodes=nodes,
        bill_per_hour=bill,
        unbilled_per_hour=0.0 if granted_any else bill,
        grants=[
            PoolGrant(
                namespace=c.namespace,
                name=c.name,
                claimed_gpus=c.claim.gpus,
                granted_gpus=grants[c.key],
                share_per_hour=shares[c.key],
            )
            for c in claimants
        ],
        split=SPLIT_RULE if over_max else None,
        message="; ".join(notes)[:4096] or None,
        wanted=[*recent, SizeWanted(at=now, nodes=wanted)][-2048:],
        updated_at=now,
    )
    return Settlement(status, nodes)
