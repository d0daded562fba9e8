"""The oracle: perfect foresight, no start-up delays -- the upper bound every policy is held to.

Definition.  At every step (its interval) the oracle knows the exact wanted tokens ``W_i`` and
arrival times of every request arriving in the interval and of every request still queued.  It
chooses one token limit ``L`` (on the planner's grid) and a replica count ``n`` to maximise

    v * sum_i clamp(a + b ln min(W_i, L), 0, 1)  -  spend(n) * interval / 3600

over those requests, subject to:

- deadlines: served FIFO at the rate ``r(n)`` of ``n`` replicas, every one of them that can
  still make its SLO finishes by ``arrival + SLO``.  For a fluid FIFO that is
  ``r >= (C_j - C_{i-1}) / (d_j - s_i)`` for every pair ``i <= j`` (``C`` cumulative tokens, ``s``
  when a request can start, ``d`` its deadline), so the smallest such ``r`` is exact, and
  queueing within the SLO is used as fully as any policy could use it;
- the ceiling: ``spend(n)`` within the allowance (the hourly cap, or the paced rate computed from
  what the oracle has actually spent), replicas placed cheapest-per-token first on whole nodes,
  minNodes and replicas.min/max honoured.

If not even the smallest limit fits, it serves at the smallest limit with every affordable
replica and admits what they can carry.  Replicas that fit on nodes already paid for are free,
so it always fills them (more capacity at no cost never lowers the score).  Its world has no
replica start or node provisioning delay, so what it chooses serves at once.

The objective is the benchmark's net value, so the oracle's (score, spend) is on the efficient
frontier of its choices: a policy with a higher score at no more spend would have a higher net
value than the oracle, which (within the resolution of the token grid, and of choosing interval
by interval) it cannot have.  For a paced budget the oracle is greedy over time (it does not save
money for a later peak): there it bounds policies that pace the same way.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.core.capacity import CapacityLadder
from modelbudget.core.curve import resolve_curve
from modelbudget.core.planner import token_bounds, token_grid
from modelbudget.sim.metrics import Scrape
from modelbudget.sim.world import Action, World

_EPS = 1e-9


class OraclePolicy:
    name = "oracle"

    def __init__(self, spec: ModelBudgetSpec, world: World, interval: float) -> None:
        self.spec, self.world, self.interval = spec, world, interval
        curve = resolve_curve(spec.curve)
        self.a, self.b = curve.intercept, curve.slope
        self.grid = token_grid(*token_bounds(spec, curve))
        self.value = spec.budget.value_of_point
        self.slo = spec.slo.latency_seconds
        self.ladder = CapacityLadder(spec)
        self.free_ladder = CapacityLadder(spec, honour_min_nodes=False)

    def _scores(self, tokens: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.clip(self.a + self.b * np.log(np.maximum(tokens, 1.0)), 0.0, 1.0)

    @staticmethod
    def _least_rates(
        cum: npt.NDArray[np.float64],
        arrival: npt.NDArray[np.float64],
        deadline: npt.NDArray[np.float64],
        queued: int,
        t: float,
    ) -> npt.NDArray[np.float64]:
        """Per (limit, request j): the least constant rate finishing j by its deadline, FIFO.

        ``max_i (C_j - C_{i-1}) / (d_j - s_i)`` over the points ``i <= j`` where a busy period can
        begin: the queued requests can all start now (they share ``s = t``, so the first dominates),
        a new one not before it arrives.  Deadlines already past are left out (0).
        """
        grid, count = cum.shape
        need = np.zeros((grid, count))
        if queued:
            span = deadline - t
            need = np.where(span > _EPS, cum / np.where(span > _EPS, span, 1.0), 0.0)
        if count > queued:  # busy periods starting at a new arrival: (limit, start i, request j)
            begin = np.maximum(arrival[queued:], t)
            before = cum[:, queued - 1 : count - 1] if queued else np.pad(cum[:, :-1], ((0, 0), (1, 0)))
            work = cum[:, None, queued:] - before[:, :, None]
            span = deadline[None, queued:] - begin[:, None]
            new = np.arange(count - queued)
            binding = (new[:, None] <= new[None, :]) & (span > _EPS)
            late = np.where(binding[None], work / np.where(binding, span, 1.0)[None], 0.0).max(axis=1)
            need[:, queued:] = np.maximum(need[:, queued:], late)
        return need

    def act(self, seen: Scrape, now: datetime) -> Action:
        world, spec = self.world, self.spec
        t = (now - world.books.origin).total_seconds()
        allowance = world.books.allowance(t)
        ladder = self.ladder if self.ladder.base_spend <= allowance + _EPS else self.free_ladder
        affordable = min(spec.replicas.max, ladder.total_slots, ladder.max_affordable(allowance))
        least = min(spec.replicas.min, affordable)

        queued = world.queued()
        lo, hi = np.searchsorted(world.arrival, [t, t + self.interval])
        index = np.concatenate([queued, np.arange(lo, hi)])
        tokens = np.minimum(world.wanted[index][None, :], self.grid[:, None])  # (grid, requests)
        if world.running():
            tokens[:, 0] = world.head_remaining()  # its limit is fixed already
        deadline = world.arrival[index] + self.slo
        reachable = deadline > t + _EPS
        need = self._least_rates(np.cumsum(tokens, axis=1), world.arrival[index], deadline, queued.size, t)
        # A request that misses its deadline even at the smallest limit with every affordable
        # replica is lost whatever is chosen: it must not make every choice look infeasible.
        reachable &= need[0] <= ladder.throughput(affordable) + _EPS
        rates = np.where(reachable[None, :], need, 0.0).max(axis=1, initial=0.0)  # (grid,)
        # Each request's score counts once, in the interval it arrives in; the queued ones were
        # counted before, but their tokens still need serving (the rate above).
        arriving = np.arange(index.size) >= queued.size
        value = self.value * (self._scores(tokens) * (arriving & reachable)[None, :]).sum(axis=1)

        best: tuple[float, int, int] | None = None  # (net value, replicas, limit)
        needed = ladder.replicas_for_many(rates)
        misfit = (needed < 0) | (needed > affordable)
        # Tokens only grow with the limit: past the first limit that does not fit, none does.
        fitting = int(np.argmax(misfit)) if misfit.any() else needed.size
        replicas = np.maximum(needed[:fitting], least)
        nets = value[:fitting] - ladder.spend_many(replicas) * self.interval / 3600.0
        for net, n, limit in zip(nets.tolist(), replicas.tolist(), self.grid[:fitting].tolist(), strict=True):
            # Ties go to the larger limit: queued requests start under it too, and are not in the value.
            if best is None or net >= best[0] - _EPS:
                best = (net, n, int(limit))
        admitted = None
        if best is None:
            n, limit = affordable, int(self.grid[0])
            admitted = ladder.throughput(n) / float(self.grid[0])
        else:
            _, n, limit = best
            # Slots on nodes that are paid anyway cost nothing: fill them (headroom for free).
            while n < affordable and ladder.spend(n + 1) <= ladder.spend(n) + _EPS:
                n += 1
        allocation = ladder.allocation(n)
        return Action(allocation.replicas, allocation.nodes, limit, admitted)
