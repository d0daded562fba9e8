"""The simulated cluster: node pools, serving pods, one FIFO queue, and the bill.

Everything a policy cannot choose lives here, so every policy meets the same world:

- Nodes are asked for per pool and billed from that moment (provisioning is paid too); they
  take ``node_provision`` seconds to become ready.  Fewer nodes: the newest go first.
- Pods are asked for per pool; a pod is scheduled once its pool has a free slot on a ready node
  and serves ``replica_start`` seconds later (image pull, model load).  Fewer pods: pending pods
  go first, then the newest.  A pod whose node goes away is pending again.
- Serving is a fluid FIFO: the ready pods together generate ``sum(tokens/s per replica)``; the
  head of the queue takes all of it until it has generated ``min(W, L)`` tokens, with ``L`` the
  limit in force when it started.  A request that has waited longer than ``timeout`` is dropped
  (the client gave up), and so is one beyond the admitted rate (a token bucket, one step deep).
  Per-sequence decode speed is not modelled: latency is queueing plus service at fleet rate.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import Budget, ModelBudgetSpec
from modelbudget.api.status import Ledger
from modelbudget.core.capacity import node_price
from modelbudget.core.pacing import allowed_rate, period_bounds

# Request status codes in ``World.status``.
QUEUED, SERVED, TIMED_OUT, REJECTED = 0, 1, 2, 3


@dataclass(frozen=True)
class Delays:
    replica_start: float = 60.0
    node_provision: float = 120.0


NO_DELAYS = Delays(0.0, 0.0)


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
    rpn: int  # replicas per node
    throughput: float  # tokens/s per ready replica
    price: float  # $/hour per node
    nodes: list[float]  # ready-at time of each node
    pods: list[float]  # ready-at time of each pod; inf while unscheduled

    def ready_pods(self, now: float) -> int:
        return sum(1 for p in self.pods if p <= now)


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
    ) -> None:
        g = spec.replicas.gpus_per_replica
        self.pools = {
            p.name: _Pool(p.gpus_per_node // g, p.tokens_per_second_per_replica, node_price(p), [], [])
            for p in spec.node_pools
        }
        self.arrival, self.wanted, self.prompt = arrival, wanted, prompt
        self.books = Books(spec.budget, origin)
        self.delays, self.timeout = delays, timeout
        n = arrival.size
        self.status = np.full(n, QUEUED, dtype=np.int8)
        self.limit = np.zeros(n)  # limit in force when service started
        self.finish = np.full(n, np.nan)
        self.token_limit = 0
        self.admitted_rps: float | None = None
        self._bucket = 0.0
        self._next = 0  # the next request to arrive
        self._queue: deque[int] = deque()
        self._remaining = 0.0  # tokens left for the head of the queue, once it has started
        self._started = False
        # Completions in time order: what the server's counters and histograms are built from.
        self.done_at: list[float] = []
        self.done_index: list[int] = []

    # -- the slow knobs -------------------------------------------------------------------------

    def place(self, replicas: Mapping[str, int], nodes: Mapping[str, int], now: float) -> None:
        """Start with these pods and nodes already ready (the state before the run)."""
        for name, pool in self.pools.items():
            pool.nodes = [now] * nodes.get(name, 0)
            pool.pods = [now] * min(replicas.get(name, 0), len(pool.nodes) * pool.rpn)

    def apply(self, action: Action, now: float) -> None:
        for name, pool in self.pools.items():
            _resize(pool.nodes, action.nodes.get(name, 0), now + self.delays.node_provision)
            _resize(pool.pods, action.replicas.get(name, 0), math.inf)
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
            scheduled = sum(1 for p in pool.pods if p < math.inf)
            for i in range(slots, scheduled):  # their node is gone: pending again
                pool.pods[i] = math.inf
            for i in range(scheduled, min(slots, len(pool.pods))):
                pool.pods[i] = now + self.delays.replica_start

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
        return sum(p.ready_pods(now) * p.throughput for p in self.pools.values())

    def waiting(self) -> int:
        return len(self._queue) - int(self._started)

    def running(self) -> int:
        return int(self._started)

    def queued(self) -> npt.NDArray[np.int64]:
        """Indices of the requests in the queue, in order; the first may have started (``running``)."""
        return np.fromiter(self._queue, dtype=np.int64, count=len(self._queue))

    def head_remaining(self) -> float:
        """Tokens the request being served still has to generate (0 when none is)."""
        return self._remaining if self._started else 0.0

    def arrived(self) -> int:
        """Index one past the last request that has arrived (admitted or not)."""
        return self._next

    # -- one step -------------------------------------------------------------------------------

    def step(self, now: float, dt: float) -> None:
        """Advance ``[now, now + dt)``: schedule pods, admit arrivals, serve, time out."""
        self._schedule(now)
        end = now + dt
        hi = int(np.searchsorted(self.arrival, end))
        self._admit(self._next, hi, dt)
        self._next = hi
        self._serve(now, end)
        self.books.bill(self.spend_rate(), now, dt)
        # Clients that have waited too long leave the queue (the one being served stays).
        q, keep = self._queue, int(self._started)
        while len(q) > keep and end - self.arrival[q[keep]] > self.timeout:
            self.status[q[keep]] = TIMED_OUT
            del q[keep]

    def _admit(self, lo: int, hi: int, dt: float) -> None:
        if self.admitted_rps is None:
            self._queue.extend(range(lo, hi))
            return
        depth = max(self.admitted_rps * dt, 1.0)
        self._bucket = min(self._bucket + self.admitted_rps * dt, depth)
        for i in range(lo, hi):
            if self._bucket >= 1.0:
                self._bucket -= 1.0
                self._queue.append(i)
            else:
                self.status[i] = REJECTED

    def _serve(self, now: float, end: float) -> None:
        rate = self.throughput(now)
        q, clock = self._queue, now
        while q and rate > 0 and clock < end:
            i = q[0]
            if not self._started:
                clock = max(clock, float(self.arrival[i]))
                if clock >= end:
                    return
                if clock - self.arrival[i] > self.timeout:
                    q.popleft()
                    self.status[i] = TIMED_OUT
                    continue
                self.limit[i] = self.token_limit
                self._remaining = min(float(self.wanted[i]), float(self.token_limit))
                self._started = True
            done = clock + self._remaining / rate
            if done > end:
                self._remaining -= (end - clock) * rate
                return
            clock = done
            q.popleft()
            self._started = False
            self.status[i] = SERVED
            self.finish[i] = done
            self.done_at.append(done)
            self.done_index.append(i)

    def completed_since(self, since: float) -> list[int]:
        """Indices of the requests completed after ``since``, in completion order."""
        return self.done_index[bisect.bisect_right(self.done_at, since) :]


def _resize(items: list[float], want: int, new: float) -> None:
    """Grow with ``new`` entries or shrink by dropping the latest (unscheduled/newest first)."""
    if want > len(items):
        items.extend([new] * (want - len(items)))
    elif want < len(items):
        items.sort()
        del items[want:]
