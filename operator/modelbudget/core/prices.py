"""Which prices bill the ledger: the spec's, or what OpenCost says the running nodes cost.

With ``spend.source: OpenCost`` the observation carries the Nodes running in each pool (from the
apiserver, by the pool's node selector) and OpenCost's hourly cost of each Node (from
Prometheus, by node name).  The running spend is the sum of those costs only when every running
node has a fresh, plausible price: a partly priced cluster would under-bill, so any gap bills
the whole tick at the spec's prices and says why.  Where both are known, a pool whose observed
node price is off the spec's by more than ``spend.priceTolerance`` is flagged: the plan is sized
with the spec's prices, so the budget is only as right as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from modelbudget.api.reasons import Reason
from modelbudget.api.spec import ModelBudgetSpec, PriceSource
from modelbudget.api.status import PoolPrice
from modelbudget.core.capacity import node_price, spend_of

# Beyond this a node price is a broken exporter or query, not a price.
ABSURD_NODE_PRICE_PER_HOUR = 100_000.0
MAX_NAMED = 3  # nodes named in a message; the rest are counted


@dataclass(frozen=True)
class NodePrice:
    """OpenCost's figures for one Node."""

    per_hour: float  # the whole node (node_total_hourly_cost)
    per_gpu_hour: float | None  # the GPU part, per GPU (node_gpu_hourly_cost); None: not exported
    at: datetime  # when the price was sampled


@dataclass(frozen=True)
class ObservedPrices:
    """The running Nodes of each pool and the prices found for them; ``error``: none could be read."""

    pool_nodes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    node_prices: Mapping[str, NodePrice] = field(default_factory=dict)
    error: str | None = None


def deviation(price: PoolPrice) -> float | None:
    """(observed - spec) / spec; None when no node of the pool is priced."""
    if price.observed_per_node_hour is None:
        return None
    return (price.observed_per_node_hour - price.spec_per_node_hour) / price.spec_per_node_hour


@dataclass(frozen=True)
class PriceVerdict:
    source: PriceSource  # what billed this tick
    reason: Reason | None  # PricesFromOpenCost, PriceMismatch, PricesFromSpec; None: the spec asks for Spec
    message: str
    running_per_hour: float
    pools: tuple[PoolPrice, ...] = ()


def _plausible(price: NodePrice) -> bool:
    return math.isfinite(price.per_hour) and 0 <= price.per_hour <= ABSURD_NODE_PRICE_PER_HOUR


def _named(nodes: list[str]) -> str:
    shown = ", ".join(nodes[:MAX_NAMED])
    return shown if len(nodes) <= MAX_NAMED else f"{shown} and {len(nodes) - MAX_NAMED} more"


def _pool_prices(spec: ModelBudgetSpec, seen: ObservedPrices) -> tuple[PoolPrice, ...]:
    pools = []
    for pool in spec.node_pools:
        if pool.name not in seen.pool_nodes:
            continue  # a shared pool's view: billed by its share, not by Nodes seen here
        prices = [seen.node_prices[n] for n in seen.pool_nodes[pool.name] if n in seen.node_prices]
        gpu = [p.per_gpu_hour for p in prices if p.per_gpu_hour is not None and math.isfinite(p.per_gpu_hour)]
        pools.append(
            PoolPrice(
                pool=pool.name,
                nodes=len(seen.pool_nodes.get(pool.name, ())),
                spec_per_node_hour=node_price(pool),
                observed_per_node_hour=sum(p.per_hour for p in prices) / len(prices) if prices else None,
                observed_per_gpu_hour=sum(gpu) / len(gpu) if gpu else None,
            )
        )
    return tuple(pools)


def assess_prices(
    seen: ObservedPrices | None, current_nodes: Mapping[str, int], spec: ModelBudgetSpec, now: datetime
) -> PriceVerdict:
    """The prices that bill this tick, and what the status should say about them."""
    at_spec = spend_of(current_nodes, spec)
    if spec.spend.source is PriceSource.SPEC:
        return PriceVerdict(PriceSource.SPEC, None, "spend.source is Spec", at_spec)
    if seen is None or seen.error is not None:
        why = seen.error if seen is not None else "not observed"
        return PriceVerdict(PriceSource.SPEC, Reason.PRICES_FROM_SPEC, f"OpenCost prices unavailable: {why}", at_spec)
    if not seen.node_prices:  # not even for nodes of other pools: OpenCost is not there, or not scraped
        message = f"billing at spec prices: no {spec.spend.queries.node_hourly_cost} series in Prometheus"
        return PriceVerdict(PriceSource.SPEC, Reason.PRICES_FROM_SPEC, message, at_spec)
    limit = spec.spend.max_staleness_seconds
    missing, stale, absurd = [], [], []
    for pool in spec.node_pools:
        for node in seen.pool_nodes.get(pool.name, ()):
            price = seen.node_prices.get(node)
            if price is None:
                missing.append(node)
            elif (now - price.at).total_seconds() > limit:
                stale.append(node)
            elif not _plausible(price):
                absurd.append(node)
    problems = [
        f"{label} for {_named(nodes)}"
        for label, nodes in (
            ("no price", missing),
            (f"prices older than {limit:g}s", stale),
            ("implausible prices", absurd),
        )
        if nodes
    ]
    if problems:
        message = f"billing at spec prices: OpenCost has {'; '.join(problems)}"
        return PriceVerdict(PriceSource.SPEC, Reason.PRICES_FROM_SPEC, message, at_spec)
    pools = _pool_prices(spec, seen)
    # A shared pool (a GpuPool view) has no Nodes of its own here: its share of the pool's bill is
    # what the pool reconciler charges, at the view's price.
    shared = {
        p.name: n
        for p, n in ((p, current_nodes.get(p.name, 0)) for p in spec.node_pools)
        if p.name not in seen.pool_nodes
    }
    running = spend_of(shared, spec) + sum(
        seen.node_prices[n].per_hour for p in spec.node_pools for n in seen.pool_nodes.get(p.name, ())
    )
    tolerance = spec.spend.price_tolerance
    off = [
        f"pool {p.pool}: OpenCost ${p.observed_per_node_hour:.2f}/node-hour vs spec ${p.spec_per_node_hour:.2f} "
        f"({off_by:+.0%})"
        for p in pools
        if (off_by := deviation(p)) is not None and abs(off_by) > tolerance + 1e-9
    ]
    if off:
        message = f"spec prices off by more than {tolerance:.0%}: {'; '.join(off)}"
        return PriceVerdict(PriceSource.OPEN_COST, Reason.PRICE_MISMATCH, message, running, pools)
    nodes = sum(p.nodes for p in pools)
    message = f"billing ${running:.2f}/h for {nodes} nodes at OpenCost prices (within {tolerance:.0%} of the spec)"
    return PriceVerdict(PriceSource.OPEN_COST, Reason.PRICES_FROM_OPEN_COST, message, running, pools)
