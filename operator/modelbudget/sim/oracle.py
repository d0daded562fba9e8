"""The oracles: perfect foresight, with and without start-up delays -- the bounds policies are held to.

``OraclePolicy`` has no start-up delays: the loose bound, never matched, whose gap mixes "could not
know" with "did not plan".  ``DelayAwareOraclePolicy`` (below) has the same foresight and the same
delays as every other policy: the fair bound.

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

import math
from collections.abc import Callable
from datetime import datetime

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.core.capacity import CapacityLadder
from modelbudget.core.curve import resolve_curve
from modelbudget.core.planner import token_bounds, token_grid
from modelbudget.core.serving import slowest_speed
from modelbudget.sim.metrics import Scrape
from modelbudget.sim.world import NO_DELAYS, Action, World

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
        self.speed = slowest_speed(spec)

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

    def _options(
        self, t: float, capacity: float
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], Callable[[int, int], float]]:
        """Per limit on the grid: the least serving rate meeting every reachable deadline of the
        queued requests and of those arriving in ``[t, t + interval)``, and the value of the arriving
        ones.  A request not reachable even at the smallest limit with ``capacity`` tokens/s is
        left out: it is lost whatever is chosen, and must not make every choice look infeasible."""
        world = self.world
        queued = world.queued()
        lo, hi = np.searchsorted(world.arrival, [t, t + self.interval])
        index = np.concatenate([queued, np.arange(lo, hi)])
        tokens = np.minimum(world.wanted[index][None, :], self.grid[:, None])  # (grid, requests)
        tokens[:, : queued.size] = np.minimum(world.wanted[queued], world.limit[queued])  # their limit is fixed
        deadline = world.arrival[index] + self.slo
        reachable = deadline > t + _EPS
        need = self._least_rates(np.cumsum(tokens, axis=1), world.arrival[index], deadline, queued.size, t)
        reachable &= need[0] <= capacity + _EPS
        rates = np.where(reachable[None, :], need, 0.0).max(axis=1, initial=0.0)  # (grid,)
        # Each request's score counts once, in the interval it arrives in; the queued ones were
        # counted before, but their tokens still need serving (the rate above).
        arriving = np.arange(index.size) >= queued.size
        value = self.value * (self._scores(tokens) * (arriving & reachable)[None, :]).sum(axis=1)
        prompt = world.prompt[index]

        def late_loss(i: int, replicas: int) -> float:
            """Under continuous batching a request also needs its own prefill and decode time at
            the batch this load runs: one that cannot make its SLO even unqueued scores nothing."""
            batch = self.speed.batch_for(float(rates[i]) / max(replicas, 1))
            late = self.speed.latency(prompt, tokens[i], batch) > self.slo
            return self.value * float((self._scores(tokens[i]) * (arriving & reachable & late)).sum())

        return rates, value, late_loss

    def _bounds(self, t: float) -> tuple[CapacityLadder, int, int]:
        """The ladder the allowance pays for, the most replicas it buys, and the least to run."""
        allowance = self.world.books.allowance(t)
        ladder = self.ladder if self.ladder.base_spend <= allowance + _EPS else self.free_ladder
        affordable = min(self.spec.replicas.max, ladder.total_slots, ladder.max_affordable(allowance))
        return ladder, affordable, min(self.spec.replicas.min, affordable)

    def act(self, seen: Scrape, now: datetime) -> Action:
        return self.decide((now - self.world.books.origin).total_seconds())

    def decide(self, t: float) -> Action:
        ladder, affordable, least = self._bounds(t)
        rates, value, late_loss = self._options(t, ladder.throughput(affordable))
        best: tuple[float, int, int] | None = None  # (net value, replicas, limit)
        for i, limit in enumerate(self.grid):
            n = ladder.replicas_for(float(rates[i]))
            if n is None or n > affordable:
                break  # tokens only grow with the limit: no larger limit fits either
            n = max(n, least)
            net = float(value[i]) - late_loss(i, n) - ladder.spend(n) * self.interval / 3600.0
            # Ties go to the larger limit: queued requests start under it too, and are not in the value.
            if best is None or net >= best[0] - _EPS:
                best = (net, n, int(limit))
        admitted = None
        if best is None:
            n, limit = affordable, int(self.grid[0])
            admitted = ladder.throughput(n) / float(self.grid[0])
        else:
            _, n, limit = best
            n = _fill_paid_slots(ladder, n, affordable)
        allocation = ladder.allocation(n)
        return Action(allocation.replicas, allocation.nodes, limit, admitted)


def _fill_paid_slots(ladder: CapacityLadder, n: int, most: int) -> int:
    """Slots on nodes that are paid anyway cost nothing: fill them (headroom for free)."""
    while n < most and ladder.spend(n + 1) <= ladder.spend(n) + _EPS:
        n += 1
    return n


class DelayAwareOraclePolicy:
    """The fair upper bound: the oracle's foresight, the same start delays as every other policy.

    It runs the delay-free oracle (``OraclePolicy``) on a shadow copy of the world, ``lead`` seconds
    ahead of the real one (``lead`` = node provisioning + replica start: what a new replica takes
    from the request for its node until it serves).  At ``t`` it asks for the most replicas the
    delay-free oracle uses anywhere in ``[t, t + lead]`` -- capacity needed at ``t + lead`` must be
    asked for now, and capacity needed before then cannot be got back in time if released -- on
    whole nodes, cheapest first, within its own allowance; free slots on paid nodes are filled.
    A gap in the delay-free oracle's use shorter than ``lead`` is held through (releasing and
    asking again would pay for provisioning anyway); a longer one is released.  It never releases
    what the delay-free oracle would use for its own queue now.  The token limit
    and the admission cap, the fast knobs, are chosen every step with full foresight for the
    replicas actually serving: the highest-value limit whose deadlines they meet.
    """

    name = "oracle-delays"

    def __init__(self, spec: ModelBudgetSpec, world: World, interval: float) -> None:
        self.world, self.interval = world, interval
        self.lead = world.delays.node_provision + world.delays.replica_start
        self.shadow = World(
            spec, world.arrival, world.wanted, world.prompt, NO_DELAYS, world.timeout, world.books.origin
        )
        self.ahead = OraclePolicy(spec, self.shadow, interval)
        self.fast = OraclePolicy(spec, world, interval)  # the same search, on the real world
        self.planned: dict[int, int] = {}  # shadow step -> replicas the delay-free oracle used
        self.t0: float | None = None  # the first decision: shadow step 0
        self.shadow_next = 0

    def _advance_shadow(self, until: int, t0: float) -> None:
        while self.shadow_next <= until:
            t = t0 + self.shadow_next * self.interval
            action = self.ahead.decide(t)
            self.shadow.apply(action, t)
            self.shadow.step(t, self.interval)
            self.planned[self.shadow_next] = sum(action.replicas.values())
            self.shadow_next += 1

    def act(self, seen: Scrape, now: datetime) -> Action:
        t = (now - self.world.books.origin).total_seconds()
        if self.t0 is None:  # the shadow starts where the real world starts
            self.t0 = t
            ladder = self.ahead.ladder
            start = ladder.allocation(min(self.ahead.spec.replicas.min, ladder.total_slots))
            self.shadow.place(start.replicas, start.nodes, t)
        k = round((t - self.t0) / self.interval)
        last = k + math.ceil(self.lead / self.interval)
        self._advance_shadow(last, self.t0)
        for done in [s for s in self.planned if s < k]:
            del self.planned[done]
        ladder, affordable, least = self.fast._bounds(t)
        wanted = max(self.planned[s] for s in range(k, last + 1))
        # Its own queue may hold more than the shadow's: never release what serving it needs now.
        wanted = max(wanted, sum(self.fast.decide(t).replicas.values()))
        n = _fill_paid_slots(ladder, max(min(wanted, affordable), least), affordable)
        allocation = ladder.allocation(n)
        # What serves once this action is applied: fewer pods drop the newest (not ready) first.
        serving = sum(
            min(pool.ready_pods(t), allocation.replicas.get(name, 0)) * pool.speed.capacity
            for name, pool in self.world.pools.items()
        )
        rates, value, _ = self.fast._options(t, serving)
        feasible = np.flatnonzero(rates <= serving + _EPS)
        if feasible.size == 0:
            limit = int(self.fast.grid[0])
            admitted = serving / float(self.fast.grid[0]) if serving > 0 else None
            return Action(allocation.replicas, allocation.nodes, limit, admitted)
        # Ties go to the larger limit, as in the delay-free oracle.
        best = feasible[np.flatnonzero(value[feasible] >= value[feasible].max() - _EPS)[-1]]
        return Action(allocation.replicas, allocation.nodes, int(self.fast.grid[best]))
