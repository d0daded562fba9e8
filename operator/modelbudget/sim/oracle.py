"""The oracles: perfect foresight, with and without start-up delays -- the bounds policies are held to.

``OraclePolicy`` has no start-up delays: the loose bound, never matched, whose gap mixes "could not
know" with "did not plan".  ``DelayAwareOraclePolicy`` (below) has the same foresight and the same
delays as every other policy: the fair bound.

Definition.  At every step (its interval) the oracle knows, for every request arriving in the
interval, its exact prompt and wanted tokens ``W_i``, and the work still waiting in the queue.  It
serves them under the same continuous-batching engine as every policy (``sim/serving.py``, the
speeds of ``core/serving.py``): a request generating ``t_i = min(W_i, L)`` tokens takes
``prefill_i + (t_i - 1) * itl(b)``, ``b`` the batch its replica runs.  It chooses one token limit
``L`` (on the planner's grid) and a replica count ``n`` to maximise

    v * sum_i clamp(a + b ln t_i, 0, 1) * [request i meets the SLO]  -  spend(n) * interval / 3600

where, with ``X(L)`` the tokens/s the arriving requests (and the waiting backlog, drained within
the interval) need, each replica generates ``X(L) / n`` and so runs the batch ``b`` with
``b / itl(b) = X(L) / n``; a request meets the SLO when its prefill plus its decode at the busy batch
``b + z sqrt(b)`` (``z`` the SLO's percentile; sequences in flight are close to Poisson, and capped
at ``maxNumSeqs``) is within ``latencySeconds`` (and the TTFT/TPOT targets, if set).  So it sizes
replicas for concurrency (small enough batches) as well as for tokens/s (``X / n`` at most a full
batch's throughput), and it picks the limit knowing every request it will cut: the planner sees
only the histogram of the last window and the SLO's percentile request.

It obeys the ceiling: ``spend(n)`` within the allowance (the hourly cap, or the paced rate computed
from what the oracle has actually spent), replicas placed cheapest-per-token first on whole nodes,
minNodes and replicas.min/max honoured.  It knows what a scale-down costs: a replica going away hands its
requests back to start over, so the value of those that then miss counts against it.  If not even
the smallest limit fits, it serves at the smallest limit with every affordable replica and admits
what they can carry.  Replicas that fit on nodes already paid for are free, so it always fills
them (smaller batches at no cost).  Its world has no replica start or node provisioning delay,
so what it chooses serves at once.

The objective is the benchmark's net value, so the oracle's (score, spend) is on the efficient
frontier of its choices, as far as the batch arithmetic above predicts the engine: a policy with a
higher score at no more spend would need to know more than every request's size in advance.
It is greedy interval by interval (it does not save money for a later peak, and for a paced
budget it paces as it goes): there it bounds policies that pace the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.core.capacity import CapacityLadder
from modelbudget.core.curve import resolve_curve
from modelbudget.core.planner import token_bounds, token_grid
from modelbudget.core.serving import slowest_speed
from modelbudget.sim.metrics import Scrape
from modelbudget.sim.serving import Job
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
        self.z = NormalDist().inv_cdf(spec.slo.percentile / 100.0)

    def _scores(self, tokens: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.clip(self.a + self.b * np.log(np.maximum(tokens, 1.0)), 0.0, 1.0)

    def _interval(self, t: float, which: npt.NDArray[np.int64] | None = None) -> _Interval:
        """What the requests arriving in ``[t, t + interval)`` need and are worth at each limit
        (``which``: only these requests, by index -- those routed to one variant)."""
        world, slo = self.world, self.spec.slo
        lo, hi = np.searchsorted(world.arrival, [t, t + self.interval])
        chosen = slice(lo, hi) if which is None else which
        tokens = np.maximum(np.minimum(world.wanted[chosen][None, :], self.grid[:, None]), 1.0)  # (grid, requests)
        backlog = sum(job.tokens for job in world.engine.waiting_jobs())  # drained within the interval
        load = (tokens.sum(axis=1) + backlog) / self.interval
        prefill = self.speed.prefill_seconds(world.prompt[chosen])
        # The largest inter-token latency at which each request still meets the SLO.
        room = slo.latency_seconds - prefill
        with np.errstate(divide="ignore"):
            slack = np.where(tokens > 1.0, room[None, :] / (tokens - 1.0), np.inf)
        slack = np.where(room[None, :] < 0, -np.inf, slack)
        if slo.time_per_output_token_seconds is not None:
            slack = np.minimum(slack, slo.time_per_output_token_seconds)
        if slo.time_to_first_token_seconds is not None:
            slack = np.where(prefill[None, :] > slo.time_to_first_token_seconds, -np.inf, slack)
        order = np.argsort(slack, axis=1)
        slack = np.take_along_axis(slack, order, axis=1)
        scores = np.take_along_axis(self._scores(tokens), order, axis=1)
        # value[i, k]: what the requests with the k smallest slacks' complement are worth at limit i.
        tail = np.concatenate([np.cumsum(scores[:, ::-1], axis=1)[:, ::-1], np.zeros((self.grid.size, 1))], axis=1)
        arrivals = int(hi - lo) if which is None else int(which.size)
        return _Interval(load, slack, self.value * tail, arrivals, self._lost_by_scale_down(t))

    def _lost_by_scale_down(self, t: float) -> npt.NDArray[np.float64]:
        """``lost[k]``: the value of the requests in flight that miss their deadline if the ``k``
        newest ready replicas go (a replica going away hands its requests back to start over; the
        world drops the newest first)."""
        speed, slo = self.speed, self.spec.slo.latency_seconds
        held = self.world.engine.remaining()
        newest_first = sorted(
            (f"{name}/{int(p[1])}" for name, pool in self.world.pools.items() for p in pool.pods if p[0] <= t),
            key=lambda pod: self._ready_order(pod),
            reverse=True,
        )
        lone = speed.itl(1.0)
        # A request starting over joins the batches running now (at their busy size), not an idle replica.
        in_flight = sum(len(pod) for name, pod in held.items() if name)
        busy = self._itl(np.array([speed.throughput(in_flight / max(len(newest_first), 1))]))
        again = float(busy[0]) if newest_first else lone

        def lost(job: Job, left: float) -> float:
            """Its score, if it makes its deadline where it is and not when it starts over."""
            room = job.arrival + slo - t
            restart = speed.prefill_seconds(job.prompt) + (job.tokens - 1) * again
            if not left * lone <= room < restart:
                return 0.0
            return min(max(self.a + self.b * math.log(max(job.tokens, 1.0)), 0.0), 1.0)  # as ``_scores``, scalar

        losses = [self.value * sum(lost(job, left) for job, left in held.get(pod, [])) for pod in newest_first]
        return np.concatenate([[0.0], np.cumsum(losses)])

    def _ready_order(self, pod: str) -> tuple[float, int]:
        name, serial = pod.rsplit("/", 1)
        for ready, s in self.world.pools[name].pods:
            if int(s) == int(serial):
                return ready, int(s)
        return math.inf, int(serial)

    def _itl(self, tokens_per_second: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The inter-token latency a replica generating ``tokens_per_second`` runs at in its busy
        moments (the batch at the SLO's percentile, at most ``maxNumSeqs``)."""
        speed = self.speed
        x = np.maximum(tokens_per_second, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(x > 0, np.maximum(x * speed.alpha / np.maximum(1.0 - x * speed.beta, _EPS), 1.0), 0.0)
        busy = np.minimum(mean + self.z * np.sqrt(mean), float(speed.max_num_seqs))
        return speed.alpha + speed.beta * np.maximum(busy, 1.0)

    def _values(self, now: _Interval, replicas: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """The value of each limit (rows) served by each count of ``replicas`` (columns); ``-inf``
        where they cannot generate its tokens/s even with full batches."""
        per_replica = now.load[:, None] / np.maximum(replicas, 1)[None, :]
        itl = self._itl(per_replica)
        rows = range(itl.shape[0])
        value = np.stack([now.value[i][np.searchsorted(now.slack[i], itl[i], side="left")] for i in rows])
        fits = (per_replica <= self.speed.capacity + _EPS) & ((replicas > 0)[None, :] | (now.load <= 0)[:, None])
        return np.where(fits, value, -np.inf)

    def _bounds(self, t: float, allowance: float | None = None) -> tuple[CapacityLadder, int, int]:
        """The ladder the allowance pays for, the most replicas it buys, and the least to run
        (``allowance``: $/h when not the world's own -- a variant's part of a shared one)."""
        if allowance is None:
            allowance = self.world.books.allowance(t)
        ladder = self.ladder if self.ladder.base_spend <= allowance + _EPS else self.free_ladder
        affordable = min(self.spec.replicas.max, ladder.total_slots, ladder.max_affordable(allowance))
        return ladder, affordable, min(self.spec.replicas.min, affordable)

    def act(self, seen: Scrape, now: datetime) -> Action:
        return self.decide((now - self.world.books.origin).total_seconds())

    def by_count(
        self, t: float, which: npt.NDArray[np.int64], allowance: float
    ) -> tuple[CapacityLadder, npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """For the requests ``which`` (one variant's) and every replica count within ``allowance``:
        the best value less what a scale-down loses (``-inf``: no limit fits), and its limit (ties
        to the larger).  The spend is left to the caller, which shares one allowance among variants."""
        ladder, affordable, least = self._bounds(t, allowance)
        now = self._interval(t, which)
        counts = np.arange(least, affordable + 1)
        ready = now.lost.size - 1
        values = self._values(now, counts) - now.lost[np.clip(ready - counts, 0, ready)][None, :]
        top = values.shape[0] - 1 - np.argmax(values[::-1] >= values.max(axis=0)[None, :] - _EPS, axis=0)
        return ladder, counts, values.max(axis=0), self.grid[top].astype(np.int64)

    def decide(self, t: float, allowance: float | None = None) -> Action:
        ladder, affordable, least = self._bounds(t, allowance)
        now = self._interval(t)
        counts = np.arange(least, affordable + 1)
        cost = ladder.spend_table[counts] * self.interval / 3600.0
        # Fewer replicas than are ready: the newest go, and their requests start over.
        ready = now.lost.size - 1
        cost += now.lost[np.clip(ready - counts, 0, ready)]
        best: tuple[float, int, int] | None = None  # (net value, replicas, limit)
        values = self._values(now, counts)
        for i, limit in enumerate(self.grid):
            net = values[i] - cost
            k = int(np.argmax(net))  # the fewest replicas among equals
            # Ties go to the larger limit: queued requests start under it too.
            if np.isfinite(net[k]) and (best is None or net[k] >= best[0] - _EPS):
                best = (float(net[k]), int(counts[k]), int(limit))
        admitted = None
        if best is None:
            n, limit = affordable, int(self.grid[0])
            admitted = ladder.throughput(n) / max(now.load[0] / max(now.arrivals, 1) * self.interval, 1.0)
        else:
            _, n, limit = best
            n = _fill_paid_slots(ladder, n, affordable)
        allocation = ladder.allocation(n)
        return Action(allocation.replicas, allocation.nodes, limit, admitted)

    def fast_knobs(self, t: float, serving: int) -> tuple[int, float | None]:
        """The token limit (and admission cap) worth most for the ``serving`` replicas ready now."""
        now = self._interval(t)
        values = self._values(now, np.array([serving]))[:, 0]
        feasible = np.flatnonzero(np.isfinite(values))
        if feasible.size == 0:
            capacity = serving * self.speed.capacity
            per_request = max(now.load[0] / max(now.arrivals, 1) * self.interval, 1.0)
            return int(self.grid[0]), (capacity / per_request if capacity > 0 else None)
        # Ties go to the larger limit, as in ``decide``.
        best = feasible[np.flatnonzero(values[feasible] >= values[feasible].max() - _EPS)[-1]]
        return int(self.grid[best]), None


@dataclass(frozen=True)
class _Interval:
    """One interval's requests, per limit on the grid (rows)."""

    load: npt.NDArray[np.float64]  # tokens/s they (and the waiting backlog) need
    slack: npt.NDArray[np.float64]  # each request's largest ITL meeting the SLO, ascending
    value: npt.NDArray[np.float64]  # value[i, k]: what the requests from the k-th slack on are worth
    arrivals: int
    lost: npt.NDArray[np.float64]  # value lost if the k newest ready replicas go


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
    replicas actually serving: the limit worth most at the batch they will run (as ``OraclePolicy`` reckons it).
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
            min(pool.ready_pods(t), allocation.replicas.get(name, 0)) for name, pool in self.world.pools.items()
        )
        limit, admitted = self.fast.fast_knobs(t, serving)
        return Action(allocation.replicas, allocation.nodes, limit, admitted)
