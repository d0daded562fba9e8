"""The simulated cluster: node pools, serving pods, one FIFO queue, and the bill.

Everything a policy cannot choose lives here, so every policy meets the same world:

- Nodes are asked for per pool and billed from that moment (provisioning is paid too); they
  take ``node_provision`` seconds to become ready.  Fewer nodes: the newest go first.
- Pods are asked for per pool; a pod is scheduled once its pool has a free slot on a ready node
  and serves ``replica_start`` seconds later (image pull, model load).  Fewer pods: pending pods
  go first, then the newest.  A pod whose node goes away is pending again.
- Serving is the request-level engine of ``sim.serving`` (continuous batching per replica, as vLLM
  does; each pool's ``serving`` parameters).  A request takes the token limit in force when it
  arrives (the gate clamps it then) and generates ``min(W, L)`` tokens.  A request that has
  waited longer than ``timeout`` is dropped (the client gave up), and so is one beyond the
  admitted rate (a token bucket, one step deep).
- Spot interruptions (``Interruptions``): a spot node is taken away and its pool provisions a
  replacement (``node_provision`` seconds, billed as any node); its pods are pending again and
  their requests are retried on the other replicas.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import Budget, CapacityType, ModelBudgetSpec
from modelbudget.api.status import Ledger
from modelbudget.core.capacity import node_price
from modelbudget.core.pacing import allowed_rate, period_bounds
from modelbudget.core.serving import ServingSpeed, serving_speed
from modelbudget.sim.serving import Job, ServingEngine

# Request status codes in ``World.status``.
QUEUED, SERVED, TIMED_OUT, REJECTED = 0, 1, 2, 3


@dataclass(frozen=True)
class Delays:
    replica_start: float = 60.0
    node_provision: float = 120.0


NO_DELAYS = Delays(0.0, 0.0)


@dataclass(frozen=True)
class Interruptions:
    """Spot nodes taken away: at random (``per_node_hour`` on each ready spot node, seeded) and/or
    at the given times (seconds; each takes one ready spot node, if there is one)."""

    per_node_hour: float = 0.0
    at: tuple[float, ...] = ()
    seed: int = 0


NO_INTERRUPTIONS = Interruptions()


@dataclass(frozen=True)
class Action:
    """What a policy sets: pods and nodes per pool, the token limit, and an admission cap."""

    replicas: Mapping[str, int]
    nodes: Mapping[str, int]
    token_limit: int
    admitted_rps: float | None = None


class Books:
    """What was actually spent in the current budget period, and the rate the ceiling allows now.

    This is the world's own account (exact, from what ran), not the planner's ledger: breaches
    are judged against it, and the oracle paces itself with it.
    """

    def __init__(self, budget: Budget, origin: datetime) -> None:
        self.budget, self.origin = budget, origin
        self.period_start: datetime | None = None
        self.spent = 0.0

    def wall(self, now: float) -> datetime:
        return self.origin + timedelta(seconds=now)

    def bill(self, per_hour: float, now: float, dt: float) -> None:
        start, _ = period_bounds(self.budget.ceiling.period, self.wall(now))
        if start != self.period_start:
            self.period_start, self.spent = start, 0.0
        self.spent += per_hour * dt / 3600.0

    def allowance(self, now: float) -> float:
        """$/hour allowed at ``now``: the hourly cap, or the paced rate given what was spent."""
        wall = self.wall(now)
        start, _ = period_bounds(self.budget.ceiling.period, wall)
        spent = self.spent if start == self.period_start else 0.0
        ledger = Ledger(period_start=start, spent=spent, accrued_at=wall, rate_per_hour=0.0)
        return allowed_rate(self.budget, ledger, wall).per_hour


@dataclass
class _Pool:
    name: str
    rpn: int  # replicas per node
    speed: ServingSpeed
    price: float  # $/hour per node
    spot: bool
    nodes: list[float] = field(default_factory=list)  # ready-at time of each node
    pods: list[list[float]] = field(default_factory=list)  # [ready-at, serial] per pod; inf while unscheduled

    def ready_pods(self, now: float) -> int:
        return sum(1 for p in self.pods if p[0] <= now)


class World:
    def __init__(
        self,
        spec: ModelBudgetSpec,
        arrival: npt.NDArray[np.float64],
        wanted: npt.NDArray[np.float64],
        prompt: npt.NDArray[np.float64],
        delays: Delays,
        timeout: float,
        origin: datetime,
        interruptions: Interruptions = NO_INTERRUPTIONS,
    ) -> None:
        g = spec.replicas.gpus_per_replica
        self.pools = {
            p.name: _Pool(
                p.name, p.gpus_per_node // g, serving_speed(p), node_price(p), p.capacity_type == CapacityType.SPOT
            )
            for p in spec.node_pools
        }
        self.arrival, self.wanted, self.prompt = arrival, wanted, prompt
        self.books = Books(spec.budget, origin)
        self.delays, self.timeout = delays, timeout
        n = arrival.size
        self.status = np.full(n, QUEUED, dtype=np.int8)
        self.limit = np.zeros(n)  # limit in force when it arrived
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.token_limit = 0
        self.admitted_rps: float | None = None
        self._bucket = 0.0
        self._next = 0  # the next request to arrive
        # With variants (``sim/variants.py``): the requests routed to this world (the rest go to the
        # others' worlds); None: every request arrives here.
        self.routed: npt.NDArray[np.bool_] | None = None
        self.engine = ServingEngine(timeout)
        self._ready: list[tuple[str, float]] = []  # (pool, serial) of the pods the engine serves with
        self._serial = itertools.count()
        self.interruptions = interruptions
        self._rng = np.random.default_rng(interruptions.seed)
        self.interrupted = 0  # spot nodes taken away so far
        # Completions in time order: what the server's counters and histograms are built from.
        self.done_at: list[float] = []
        self.done_index: list[int] = []

    # -- the slow knobs -------------------------------------------------------------------------

    def place(self, replicas: Mapping[str, int], nodes: Mapping[str, int], now: float) -> None:
        """Start with these pods and nodes already ready (the state before the run)."""
        for name, pool in self.pools.items():
            pool.nodes = [now] * nodes.get(name, 0)
            pool.pods = [
                [now, next(self._serial)] for _ in range(min(replicas.get(name, 0), len(pool.nodes) * pool.rpn))
            ]

    def apply(self, action: Action, now: float) -> None:
        for name, pool in self.pools.items():
            _resize(pool.nodes, action.nodes.get(name, 0), now + self.delays.node_provision)
            want = action.replicas.get(name, 0)
            pool.pods.sort()
            del pool.pods[want:]  # fewer: pending pods go first, then the newest
            pool.pods.extend([math.inf, next(self._serial)] for _ in range(want - len(pool.pods)))
        self.token_limit = action.token_limit
        if action.admitted_rps is None:
            self._bucket = 0.0
        elif self.admitted_rps is None:
            self._bucket = 1.0  # a new cap starts with one request's worth
        self.admitted_rps = action.admitted_rps

    def _schedule(self, now: float) -> None:
        for pool in self.pools.values():
            slots = sum(1 for n in pool.nodes if n <= now) * pool.rpn
            pool.pods.sort()
            scheduled = sum(1 for p in pool.pods if p[0] < math.inf)
            for i in range(slots, scheduled):  # their node is gone: pending again, a new pod
                pool.pods[i] = [math.inf, next(self._serial)]
            for i in range(scheduled, min(slots, len(pool.pods))):
                pool.pods[i][0] = now + self.delays.replica_start

    def _interrupt(self, now: float, dt: float) -> None:
        """Take spot nodes away in ``[now, now + dt)``; each is replaced after ``node_provision``."""
        plan = self.interruptions
        count = sum(1 for t in plan.at if now <= t < now + dt)
        for pool in self.pools.values():
            if not pool.spot:
                continue
            ready = [i for i, t in enumerate(pool.nodes) if t <= now]
            if plan.per_node_hour > 0 and ready:
                count += int(self._rng.poisson(plan.per_node_hour * len(ready) * dt / 3600.0))
            for i in self._rng.permutation(ready)[:count].tolist():
                pool.nodes[i] = now + self.delays.node_provision
                self.interrupted += 1
            count = 0 if ready else count  # scheduled ones take the first spot pool that has nodes

    # -- what is running ------------------------------------------------------------------------

    def replicas(self) -> int:
        return sum(len(p.pods) for p in self.pools.values())

    def ready_replicas(self, now: float) -> int:
        return sum(p.ready_pods(now) for p in self.pools.values())

    def nodes(self) -> dict[str, int]:
        return {name: len(p.nodes) for name, p in self.pools.items()}

    def spend_rate(self) -> float:
        """$/hour of the nodes that exist now, ready or not."""
        return sum(len(p.nodes) * p.price for p in self.pools.values())

    def throughput(self, now: float) -> float:
        """Tokens/s the ready pods generate with full batches."""
        return sum(p.ready_pods(now) * p.speed.capacity for p in self.pools.values())

    def waiting(self) -> int:
        return self.engine.waiting()

    def running(self) -> int:
        return sum(self.engine.running().values())

    def queued(self) -> npt.NDArray[np.int64]:
        """Indices of the requests admitted and not yet done (running or waiting), oldest first."""
        ids = sorted(job.id for job in self.engine.in_flight())
        return np.asarray(ids, dtype=np.int64)

    def arrived(self) -> int:
        """Index one past the last request that has arrived (admitted or not)."""
        return self._next

    # -- one step -------------------------------------------------------------------------------

    def step(self, now: float, dt: float) -> None:
        """Advance ``[now, now + dt)``: interrupt, schedule pods, admit arrivals, serve, time out."""
        if self.interruptions != NO_INTERRUPTIONS:
            self._interrupt(now, dt)
        self._schedule(now)
        ready = [(pool.name, p[1]) for pool in self.pools.values() for p in pool.pods if p[0] <= now]
        if ready != self._ready:  # the same pods serving: nothing for the engine to add or take away
            self._ready = ready
            pods = {f"{name}/{int(serial)}": self.pools[name].speed for name, serial in ready}
            self.engine.set_pods(pods, now)
        end = now + dt
        hi = int(np.searchsorted(self.arrival, end))
        self.engine.submit(self._admit(self._next, hi, dt))
        self._next = hi
        self._serve(end)
        self.books.bill(self.spend_rate(), now, dt)

    def _admit(self, lo: int, hi: int, dt: float) -> list[Job]:
        index = range(lo, hi)
        if self.routed is not None:
            index = [i for i in index if self.routed[i]]  # type: ignore[assignment]
        if self.admitted_rps is not None:
            depth = max(self.admitted_rps * dt, 1.0)
            self._bucket = min(self._bucket + self.admitted_rps * dt, depth)
            kept = []
            for i in index:
                if self._bucket >= 1.0:
                    self._bucket -= 1.0
                    kept.append(i)
                else:
                    self.status[i] = REJECTED
            index = kept  # type: ignore[assignment]
        self.limit[lo:hi] = self.token_limit
        tokens = np.maximum(np.minimum(self.wanted[lo:hi], self.token_limit), 1.0).astype(np.int64).tolist()
        arrival, prompt = self.arrival[lo:hi].tolist(), self.prompt[lo:hi].tolist()
        if self.admitted_rps is None and self.routed is None:  # every arrival: built column by column
            return list(map(Job, range(lo, hi), arrival, prompt, tokens))
        return [Job(i, arrival[i - lo], prompt[i - lo], tokens[i - lo]) for i in index]

    def _serve(self, end: float) -> None:
        events = self.engine.advance(end)
        for job in events.timed_out:
            self.status[job.id] = TIMED_OUT
        if events.done:
            index = [done.job.id for done in events.done]
            finished = [done.finished_at for done in events.done]
            self.status[index] = SERVED
            self.first_token[index] = [done.first_token_at for done in events.done]
            self.finish[index] = finished
            self.done_at.extend(finished)
            self.done_index.extend(index)

    def completed_since(self, since: float) -> list[int]:
        """Indices of the requests completed after ``since``, in completion order."""
        return self.done_index[bisect.bisect_right(self.done_at, since) :]


def _resize(items: list[float], want: int, new: float) -> None:
    """Grow with ``new`` entries or shrink by dropping the latest."""
    if want > len(items):
        items.extend([new] * (want - len(items)))
    elif want < len(items):
        items.sort()
        del items[want:]
