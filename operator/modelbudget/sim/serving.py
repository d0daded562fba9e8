"""The request-level serving engine: vLLM-like replicas under continuous batching.

One copy, used by the simulator's world and by the testbed's synthetic model server, so both
serve the same way.  Pure and clock-free: time comes in as arguments.

- A request is routed at its arrival time to the ready replica with the fewest sequences running
  plus waiting at that moment (ties by name), as a load-aware router in front of vLLM pods does,
  and waits in that replica's own FIFO queue.  With no ready replica it waits unrouted.  Routing
  at the arrival time itself (not when the caller hands requests over) keeps the result the same
  whatever step the caller advances by.
- A replica runs at most ``maxNumSeqs`` sequences.  A sequence first prefills its prompt
  (``prompt / prefill rate`` seconds; that produces its first token), then decodes its other
  tokens at one per ``itl(b) = alpha + beta * b``, ``b`` the sequences running on the replica.
  All running sequences of a replica advance together, so the engine keeps one decode clock per
  replica (tokens decoded per sequence so far) and a heap of the clock values at which each
  sequence is done: an event costs ``O(log b)``, and time between events costs nothing.
- A request that has waited longer than ``timeout`` is dropped (its client gave up).
- A replica that goes away (scale-down, spot interruption) hands all its requests back; they are
  routed again with their original arrival time and start over (the client retries), so a lost
  pod costs latency and work, not requests.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from modelbudget.core.serving import ServingSpeed

_EPS = 1e-9
_LOAD = attrgetter("load")
_DONE_ORDER = attrgetter("finished_at", "job.id")


# Job and Done are named tuples, not frozen dataclasses: a replay makes one of each per request
# (millions in a week), and a tuple is built about four times faster.
class Job(NamedTuple):
    id: int
    arrival: float
    prompt: float
    tokens: int  # tokens it generates (the limit already applied), at least 1


class Done(NamedTuple):
    job: Job
    pod: str
    first_token_at: float
    finished_at: float


@dataclass
class Events:
    """What happened in one ``advance``."""

    started: list[tuple[str, Job]] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)
    timed_out: list[Job] = field(default_factory=list)
    generated: dict[str, float] = field(default_factory=dict)  # tokens decoded per pod


class _Replica:
    def __init__(self, name: str, speed: ServingSpeed, now: float) -> None:
        self.name, self.speed, self.clock = name, speed, now
        self.decoded = 0.0  # the decode clock: tokens each running sequence has gained
        self.decoding: list[tuple[float, int, Job, float]] = []  # (clock when done, id, job, first token at)
        self.prefilling: list[tuple[float, int, Job]] = []  # (first token at, id, job)
        self.waiting: deque[Job] = deque()
        # Counted, not recomputed: routing reads ``load`` once per replica per arrival.
        self.running = 0  # sequences in the batch (prefilling or decoding)
        self.load = 0  # running + waiting
        # The earliest time its load can drop: until then routing may read the load without
        # advancing it (a replica with no event costs nothing between arrivals).
        self.next_change = now

    def jobs(self) -> list[Job]:
        return [e[2] for e in self.decoding] + [e[2] for e in self.prefilling] + list(self.waiting)

    def enqueue(self, job: Job) -> None:
        self.waiting.append(job)
        self.load += 1
        if job.arrival < self.next_change:  # it may start at once
            self.next_change = job.arrival

    def advance(self, until: float, timeout: float, events: Events) -> None:
        if not self.load:  # idle: nothing starts, decodes or times out
            self.clock, self.next_change = until, math.inf
            return
        # The hot loop of every simulation (a few events per request): attributes and functions
        # read into locals, and the ITL worked out again only when the batch changed (``itl``'s
        # arithmetic written out: the same numbers without a method call).
        speed, t, name = self.speed, self.clock, self.name
        decoding, prefilling, waiting = self.decoding, self.prefilling, self.waiting
        max_num_seqs, done = speed.max_num_seqs, events.done
        alpha, beta = speed.alpha, speed.beta
        heappop, heappush = heapq.heappop, heapq.heappush
        decoded, generated = self.decoded, 0.0
        batch, itl = -1, 0.0
        while True:
            if waiting:
                self._start(t, timeout, events)
            if self.running != batch:
                batch = self.running
                itl = alpha + beta * (batch if batch > 1 else 1.0)
            # The next event: min() and max() spelled out (the same choices, without the calls).
            nxt = until
            if decoding:
                event = t + (decoding[0][0] - decoded) * itl
                if event < nxt:
                    nxt = event
            if prefilling and prefilling[0][0] < nxt:
                nxt = prefilling[0][0]
            if waiting and batch < max_num_seqs and waiting[0].arrival < nxt:
                nxt = waiting[0].arrival
            if nxt < t:
                nxt = t
            moved = nxt > t
            if decoding:
                gained = (nxt - t) / itl
                decoded += gained
                generated += gained * len(decoding)
            t = nxt
            finished = 0
            while decoding and decoding[0][0] <= decoded + _EPS:
                _, _, job, first = heappop(decoding)
                done.append(Done(job, name, first, t))
                finished += 1
            while prefilling and prefilling[0][0] <= t + _EPS:
                first, _, job = heappop(prefilling)
                moved = True
                generated += 1.0  # prefill yields the first token
                if job.tokens <= 1:
                    done.append(Done(job, name, first, t))
                    finished += 1
                else:
                    heappush(decoding, (decoded + job.tokens - 1, job.id, job, first))
            self.running -= finished
            self.load -= finished
            if t >= until:
                break
            if not moved and not finished:
                # Nothing happened and the clock did not move: the first sequence's last token is
                # due sooner than the clock can tell apart from now (its remaining time is below
                # the resolution of a float this far into the run), and nothing else can change
                # until it is done.  It is done now; waiting on it would loop for ever.
                decoded = decoding[0][0]
        self.clock, self.decoded = until, decoded
        while waiting and until - waiting[0].arrival > timeout:
            events.timed_out.append(waiting.popleft())
            self.load -= 1
        self.next_change = math.inf
        if decoding:
            self.next_change = until + (decoding[0][0] - decoded) * (
                itl if batch == self.running else speed.itl(self.running)
            )
        if prefilling:  # a one-token request is done when its prefill is
            self.next_change = min(self.next_change, prefilling[0][0])
        if waiting:
            self.next_change = min(self.next_change, waiting[0].arrival + timeout)
        if generated:
            events.generated[name] = events.generated.get(name, 0.0) + generated

    def _start(self, t: float, timeout: float, events: Events) -> None:
        waiting, speed, running = self.waiting, self.speed, self.running
        # ``max`` and ``prefill_seconds`` written out: the same numbers, once per request.
        most, rate, prefilling = speed.max_num_seqs, speed.prefill_rate, self.prefilling
        while waiting and running < most and waiting[0].arrival <= t + _EPS:
            job = waiting.popleft()
            if t - job.arrival > timeout:
                events.timed_out.append(job)
                self.load -= 1
                continue
            start = t if t >= job.arrival else job.arrival
            heapq.heappush(prefilling, (start + job.prompt / rate, job.id, job))
            running += 1
            events.started.append((self.name, job))
        self.running = running


class ServingEngine:
    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self._pods: dict[str, _Replica] = {}
        self._replicas: list[_Replica] = []  # the same, in name order
        self._arriving: deque[Job] = deque()  # submitted, routed when the engine reaches their arrival
        self._unrouted: deque[Job] = deque()  # arrived while no replica was ready

    @property
    def pods(self) -> list[str]:
        return sorted(self._pods)

    def running(self) -> dict[str, int]:
        return {name: r.running for name, r in sorted(self._pods.items())}

    def waiting(self) -> int:
        return len(self._unrouted) + sum(len(r.waiting) for r in self._pods.values())

    def waiting_jobs(self) -> list[Job]:
        """Every request that has arrived and not started: waiting on a replica, or unrouted."""
        return [j for r in self._replicas for j in r.waiting] + list(self._unrouted)

    def remaining(self) -> dict[str, list[tuple[Job, float]]]:
        """Per pod (``""``: not routed), every request on it that is not done, with the tokens it
        still has to generate."""
        held = {
            r.name: [
                *((e[2], e[0] - r.decoded) for e in r.decoding),
                *((e[2], float(e[2].tokens)) for e in r.prefilling),
                *((job, float(job.tokens)) for job in r.waiting),
            ]
            for r in self._replicas
        }
        held[""] = [(job, float(job.tokens)) for job in self._unrouted]
        return held

    def in_flight(self) -> list[Job]:
        """Every request that has arrived and is not done: running, waiting on a replica, or unrouted."""
        return [j for r in self._pods.values() for j in r.jobs()] + list(self._unrouted)

    def set_pods(self, pods: Mapping[str, ServingSpeed], now: float) -> None:
        """The ready replicas (and how each serves) from ``now``; the requests of those that went
        away are routed again."""
        retried = [job for name in sorted(set(self._pods) - set(pods)) for job in self._pods.pop(name).jobs()]
        for name in sorted(set(pods) - set(self._pods)):
            self._pods[name] = _Replica(name, pods[name], now)
        self._replicas = [self._pods[name] for name in sorted(self._pods)]
        pending = sorted([*retried, *self._unrouted], key=lambda j: (j.arrival, j.id))
        self._unrouted = deque()
        for job in pending:  # they have arrived already: routed now, oldest first
            self._route(job)

    def submit(self, jobs: Iterable[Job]) -> None:
        """Requests arriving from now on, in arrival order; each is routed when it arrives."""
        self._arriving.extend(jobs)

    def _route(self, job: Job) -> None:
        if not self._pods:
            self._unrouted.append(job)
            return
        # The least loaded; ties go to the first name (the replicas are kept in name order).
        min(self._replicas, key=_LOAD).enqueue(job)

    def advance(self, until: float) -> Events:
        """Serve up to ``until``: route each arrival at its time, and every replica starts,
        decodes and finishes what it can."""
        events = Events()
        replicas, arriving, timeout = self._replicas, self._arriving, self.timeout
        while arriving and arriving[0].arrival < until:
            job = arriving.popleft()
            at = job.arrival
            for replica in replicas:
                if replica.next_change <= at:
                    replica.advance(at, timeout, events)
            self._route(job)
        for replica in replicas:
            replica.advance(until, self.timeout, events)
        while self._unrouted and until - self._unrouted[0].arrival > self.timeout:
            events.timed_out.append(self._unrouted.popleft())
        events.done.sort(key=_DONE_ORDER)
        return events
