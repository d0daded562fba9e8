"""Where replicas go and what they cost: the pools' offerings turned into a capacity ladder.

Replicas are placed one slot at a time in a fixed order: first the slots on nodes that are paid
anyway (each pool's ``minNodes``), then pool by pool from the cheapest generated token
(``c_k = g * price_k / (3600 * mu_k)``; spot before on-demand on a tie).  Whole nodes are what
is paid, so a slot that opens a node adds the node's price and the next slots on it add nothing.
The ladder answers the planner's three questions with per-block arithmetic (no per-replica
loop): capacity of the first ``j`` replicas, their spend, and the most replicas a budget buys.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import CapacityType, ModelBudgetSpec, NodePool

_EPS = 1e-9


def node_price(pool: NodePool) -> float:
    return pool.gpus_per_node * pool.price_per_gpu_hour


def cost_per_token(pool: NodePool, gpus_per_replica: int) -> float:
    """Dollars per generated token on a fully used node of this pool."""
    return gpus_per_replica * pool.price_per_gpu_hour / (3600.0 * pool.tokens_per_second_per_replica)


def spend_of(nodes: Mapping[str, int], spec: ModelBudgetSpec) -> float:
    """$/hour of the given node counts per pool (pools not in the spec cost nothing here)."""
    prices = {p.name: node_price(p) for p in spec.node_pools}
    return sum(n * prices.get(name, 0.0) for name, n in nodes.items())


@dataclass(frozen=True)
class _Block:
    pool: str
    slots: int
    throughput: float  # tokens/s per replica
    replicas_per_node: int
    node_price: float
    paid: bool  # False: on a node that is paid anyway (minNodes)


@dataclass(frozen=True)
class Allocation:
    replicas: dict[str, int]
    nodes: dict[str, int]


class CapacityLadder:
    def __init__(self, spec: ModelBudgetSpec, honour_min_nodes: bool = True) -> None:
        g = spec.replicas.gpus_per_replica
        self._gpus_per_replica = g
        self._pools = spec.node_pools
        self._min_nodes = {p.name: (p.min_nodes if honour_min_nodes else 0) for p in spec.node_pools}
        free: list[_Block] = []
        paid: list[_Block] = []
        order = sorted(
            spec.node_pools,
            key=lambda p: (cost_per_token(p, g), p.capacity_type != CapacityType.SPOT, p.name),
        )
        for p in order:
            rpn = p.gpus_per_node // g
            n_free = self._min_nodes[p.name] * rpn
            n_all = p.max_nodes * rpn
            if n_free:
                free.append(_Block(p.name, n_free, p.tokens_per_second_per_replica, rpn, node_price(p), False))
            if n_all > n_free:
                paid.append(_Block(p.name, n_all - n_free, p.tokens_per_second_per_replica, rpn, node_price(p), True))
        # Free slots with the most throughput first: they cost nothing at the margin.
        free.sort(key=lambda b: -b.throughput)
        self._blocks = free + paid
        self.base_spend = sum(self._min_nodes[p.name] * node_price(p) for p in spec.node_pools)
        self.total_slots = sum(b.slots for b in self._blocks)
        # The blocks as arrays, for the per-limit questions the planner asks of a whole token grid.
        self._slots = np.array([b.slots for b in self._blocks], dtype=np.int64)
        self._rates = np.array([b.throughput for b in self._blocks], dtype=float)
        self._per_node = np.array([b.replicas_per_node for b in self._blocks], dtype=np.int64)
        self._paid_price = np.array([b.node_price if b.paid else 0.0 for b in self._blocks], dtype=float)
        self._slots_before = np.cumsum(self._slots) - self._slots
        self._capacity_to = np.cumsum(self._slots * self._rates)  # tokens/s of every block up to this one

    @staticmethod
    def _block_spend(block: _Block, taken: int) -> float:
        return math.ceil(taken / block.replicas_per_node) * block.node_price if block.paid else 0.0

    def throughput(self, replicas: int) -> float:
        left, total = replicas, 0.0
        for b in self._blocks:
            take = min(left, b.slots)
            total += take * b.throughput
            left -= take
            if left <= 0:
                break
        return total

    def spend(self, replicas: int) -> float:
        left, total = replicas, self.base_spend
        for b in self._blocks:
            take = min(left, b.slots)
            total += self._block_spend(b, take)
            left -= take
            if left <= 0:
                break
        return total

    @functools.cached_property
    def spend_table(self) -> npt.NDArray[np.float64]:
        """``spend(n)`` for every ``n`` in ``0..total_slots``, worked out once per ladder (exactly
        ``spend``'s numbers: the searches that read it must decide as ``spend`` would)."""
        return np.array([self.spend(n) for n in range(self.total_slots + 1)])

    def replicas_for(self, tokens_per_second: float) -> int | None:
        """Fewest replicas (in ladder order) whose throughput covers the demand; None if none do."""
        need, count = tokens_per_second, 0
        if need <= _EPS:
            return 0
        for b in self._blocks:
            if need <= b.slots * b.throughput + _EPS:
                return count + max(1, math.ceil(need / b.throughput - _EPS))
            need -= b.slots * b.throughput
            count += b.slots
        return None

    def replicas_for_many(self, tokens_per_second: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """``replicas_for`` of each demand at once; -1 where no number of replicas covers it."""
        need = np.asarray(tokens_per_second, dtype=float)
        block = np.searchsorted(self._capacity_to + _EPS, need, side="left")
        out = np.full(need.shape, -1, dtype=np.int64)
        inside = block < self._slots.size
        k = block[inside]
        rest = need[inside] - (self._capacity_to[k] - self._slots[k] * self._rates[k])
        out[inside] = self._slots_before[k] + np.maximum(1, np.ceil(rest / self._rates[k] - _EPS)).astype(np.int64)
        out[need <= _EPS] = 0
        return out

    def spend_many(self, replicas: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """``spend`` of each replica count at once."""
        taken = np.clip(np.asarray(replicas)[:, None] - self._slots_before[None, :], 0, self._slots[None, :])
        nodes = -(-taken // self._per_node[None, :])
        spend: npt.NDArray[np.float64] = self.base_spend + (nodes * self._paid_price[None, :]).sum(axis=1)
        return spend

    def max_affordable(self, allowed_per_hour: float) -> int:
        """Most replicas (in ladder order) whose nodes cost no more than ``allowed_per_hour``."""
        money = allowed_per_hour - self.base_spend
        if money < -_EPS:
            return 0
        count = 0
        for b in self._blocks:
            if not b.paid:
                count += b.slots
                continue
            nodes = math.floor((money + _EPS) / b.node_price)
            take = min(b.slots, nodes * b.replicas_per_node)
            count += take
            money -= self._block_spend(b, take)
            if take < b.slots:
                break
        return count

    def allocation(self, replicas: int) -> Allocation:
        per_pool = {p.name: 0 for p in self._pools}
        left = replicas
        for b in self._blocks:
            take = min(left, b.slots)
            per_pool[b.pool] += take
            left -= take
        nodes = {}
        for p in self._pools:
            rpn = p.gpus_per_node // self._gpus_per_replica
            nodes[p.name] = max(self._min_nodes[p.name], math.ceil(per_pool[p.name] / rpn))
        return Allocation(per_pool, nodes)
