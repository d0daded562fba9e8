"""Replaying one trace against several model variants that share one budget.

Each variant has a world of its own (``sim/world.py``: its pools, pods, serving engine), all of
them stepping on one clock and billing one set of books (``Books``: the spend of every variant's
nodes, the allowance the shared ceiling gives).  Requests are routed by the policy's traffic
shares with a smooth weighted round-robin (``Router``, as nginx splits by weight: deterministic,
each variant's count within one request of its share at every point), each request to one variant,
which serves it at the token limit in force there and scores it on its own curve.

Policies:

- ``planner``: ``core.variants.decide_variants`` on one scrape per variant (its own metrics).
- ``oracle``: perfect foresight, no start-up delays (the loose bound).  Every step it tries each
  split on the grid (``ORACLE_SHARE_STEPS``), routes the step's arrivals by it as the router would,
  and for each variant values every replica count at its best limit on exactly those requests
  (``OraclePolicy.by_count``: the delay-free oracle's arithmetic, its requests in time, what a
  scale-down loses); it keeps the split and counts with the best net value whose spend together is
  within the allowance.  It is greedy step by step, as the single-variant oracle.

The best single variant is the ordinary planner on one variant's spec with all the traffic
(``sim/run.py``), so the comparison is the same requests, ceiling and clock.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.core.capacity import CapacityLadder
from modelbudget.core.planner import resolve
from modelbudget.core.variants import (
    Variant,
    VariantsDecision,
    VariantsState,
    decide_variants,
    even_shares,
    shared_budget,
)
from modelbudget.sim.metrics import Scrape, buckets_1_2_5, scrape, window_seconds
from modelbudget.sim.oracle import OraclePolicy
from modelbudget.sim.policies import observation
from modelbudget.sim.run import SimConfig, Workload
from modelbudget.sim.score import PolicyResult, judged, minutes_over
from modelbudget.sim.world import NO_DELAYS, QUEUED, REJECTED, SERVED, TIMED_OUT, Action, Books, World

ORACLE_SHARE_STEPS = 10  # the oracle's split grid: tenths, as the planner's for two variants
_EPS = 1e-9

VARIANT_POLICIES = ("planner", "oracle")


class Router:
    """Smooth weighted round-robin: each request to the variant furthest behind its share."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.credit = np.zeros(len(names))

    def route(self, weights: Mapping[str, int], count: int) -> npt.NDArray[np.int64]:
        """Variant indices for ``count`` requests in arrival order, under ``weights`` (percent)."""
        w = np.array([float(weights.get(n, 0)) for n in self.names])
        total = w.sum()
        out = np.zeros(count, dtype=np.int64)
        if total <= 0:
            return out
        for k in range(count):
            self.credit += w
            pick = int(np.argmax(self.credit))
            self.credit[pick] -= total
            out[k] = pick
        return out

    def copy(self) -> Router:
        other = Router(self.names)
        other.credit = self.credit.copy()
        return other


@dataclass(frozen=True)
class VariantsAction:
    actions: Mapping[str, Action]
    shares: Mapping[str, int]


class VariantsPolicy:
    name = "planner"

    def __init__(self, variants: Sequence[tuple[str, ModelBudgetSpec]]) -> None:
        self.variants = [Variant(n, resolve(s)) for n, s in variants]
        self.state = VariantsState()
        self.last: VariantsDecision | None = None

    def act(self, seen: Mapping[str, Scrape], now: datetime, t: float) -> VariantsAction:
        observations = {n: observation(s, now) for n, s in seen.items()}
        decision = decide_variants(self.variants, observations, self.state, now)
        self.state, self.last = decision.next_state, decision
        actions = {}
        for name, d in decision.decisions.items():
            plan = d.plan
            actions[name] = Action(
                replicas={a.pool: a.replicas for a in plan.pools},
                nodes=plan.nodes_by_pool(),
                token_limit=plan.token_limit,
                admitted_rps=plan.admitted_requests_per_second,
            )
        return VariantsAction(actions, decision.shares)


class VariantsOraclePolicy:
    """See the module's docstring."""

    name = "oracle"

    def __init__(
        self, variants: Sequence[tuple[str, ModelBudgetSpec]], worlds: Mapping[str, World], router: Router, step: float
    ) -> None:
        self.names = [n for n, _ in variants]
        self.oracles = {n: OraclePolicy(s, worlds[n], step) for n, s in variants}
        self.worlds, self.router, self.step = worlds, router, step
        self.books = next(iter(worlds.values())).books
        self.splits = [dict(zip(self.names, g, strict=True)) for g in _grid(len(self.names), ORACLE_SHARE_STEPS)]
        self.shares = even_shares(self.names)

    def act(self, seen: Mapping[str, Scrape], now: datetime, t: float) -> VariantsAction:
        allowance = self.books.allowance(t)
        world = next(iter(self.worlds.values()))
        lo, hi = np.searchsorted(world.arrival, [t, t + self.step])
        best: tuple[float, dict[str, int], dict[str, tuple[CapacityLadder, int, int]]] | None = None
        for shares in self.splits:
            routed = self.router.copy().route(shares, int(hi - lo))
            tables: list[_Table] = []
            for k, name in enumerate(self.names):
                which = np.flatnonzero(routed == k).astype(np.int64) + lo
                ladder, counts, value, limits = self.oracles[name].by_count(t, which, allowance)
                spend = ladder.spend_table[counts]
                tables.append((name, ladder, counts, value - spend * self.step / 3600.0, spend, limits))
            found = _best_combination(tables, allowance)
            if found is not None and (best is None or found[0] > best[0] + _EPS):
                best = (found[0], shares, found[1])
        if best is None:  # not even the smallest limits fit anywhere: each variant's own oracle, even parts
            share = allowance / len(self.names)
            actions = {n: self.oracles[n].decide(t, share) for n in self.names}
            return VariantsAction(actions, self.shares)
        _, self.shares, picks = best
        actions = {}
        for name in self.names:
            ladder, n, limit = picks[name]
            allocation = ladder.allocation(n)
            actions[name] = Action(allocation.replicas, allocation.nodes, limit)
        return VariantsAction(actions, self.shares)


# One variant's replica counts: (name, ladder, counts, net value less spend, spend $/h, limit) per count.
_Table = tuple[
    str,
    CapacityLadder,
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]


def _best_combination(
    tables: list[_Table],
    allowance: float,
) -> tuple[float, dict[str, tuple[CapacityLadder, int, int]]] | None:
    """The replica counts, one per variant, with the best net value whose spend together is within
    the allowance (every combination: a few dozen counts per variant, two or three variants)."""
    net = np.zeros(())
    spend = np.zeros(())
    for _, _, _, value, cost, _ in tables:
        net = net[..., None] + value
        spend = spend[..., None] + cost
    net = np.where((spend <= allowance + 1e-6) & np.isfinite(net), net, -np.inf)
    if net.size == 0 or not np.isfinite(net.max()):
        return None
    at = np.unravel_index(int(np.argmax(net)), net.shape)
    picks = {}
    for (name, ladder, counts, _, _, limits), i in zip(tables, at, strict=True):
        picks[name] = (ladder, int(counts[i]), int(limits[i]))
    return float(net[at]), picks


def _grid(n: int, steps: int) -> list[list[int]]:
    """Every split of 100 percent among ``n`` variants in ``100 / steps`` steps."""
    out = []
    for parts in itertools.product(range(steps + 1), repeat=n - 1):
        last = steps - sum(parts)
        if last >= 0:
            out.append([round(100 * p / steps) for p in (*parts, last)])
    return out


@dataclass(frozen=True)
class VariantsRun:
    policy: str
    worlds: dict[str, World]
    owner: npt.NDArray[np.int64]  # which variant each request went to (-1: never arrived)
    t: npt.NDArray[np.float64]
    spend_rate: npt.NDArray[np.float64]
    allowance: npt.NDArray[np.float64]
    shares: npt.NDArray[np.float64]  # (steps, variants): percent in force
    replicas: npt.NDArray[np.float64]  # (steps, variants)
    step: float


def run_variants(
    variants: Sequence[tuple[str, ModelBudgetSpec]],
    work: Workload,
    name: str,
    config: SimConfig,
    progress: Callable[[float], None] | None = None,
) -> VariantsRun:
    specs = dict(variants)
    names = list(specs)
    budget = shared_budget([Variant(n, resolve(s)) for n, s in variants])
    step = config.step
    delays = NO_DELAYS if name == "oracle" else config.delays
    books = Books(budget, config.start)
    worlds: dict[str, World] = {}
    for n, spec in variants:
        timeout = config.timeout_for(spec)
        world = World(spec, work.arrival, work.wanted, work.prompt, delays, timeout, config.start)
        world.books = books  # one ledger: every world bills it, the allowance is the shared one
        world.routed = np.zeros(work.arrival.size, dtype=bool)
        worlds[n] = world
    router = Router(names)
    policy: VariantsPolicy | VariantsOraclePolicy
    if name == "planner":
        policy = VariantsPolicy(variants)
    elif name == "oracle":
        policy = VariantsOraclePolicy(variants, worlds, router, step)
    else:
        raise ValueError(f"unknown variants policy {name!r} (known: {', '.join(VARIANT_POLICIES)})")
    every = 1 if name == "oracle" else max(1, round(config.decision_interval / step))
    windows = {n: window_seconds(s.metrics.window) for n, s in specs.items()}
    bounds = {n: buckets_1_2_5(resolve(s).token_max) for n, s in specs.items()}
    first = -math.ceil(config.warmup / step) * step
    for n, spec in variants:
        ladder = CapacityLadder(spec)
        initial = ladder.allocation(min(spec.replicas.min, ladder.total_slots))
        worlds[n].place(initial.replicas, initial.nodes, first)
    drain = config.drain if config.drain is not None else max(config.timeout_for(s) for s in specs.values())
    total = math.ceil((work.span + drain) / step)
    warm = round(-first / step)
    owner = np.full(work.arrival.size, -1, dtype=np.int64)
    rows = np.zeros((total, 3))
    share_rows = np.zeros((total, len(names)))
    replica_rows = np.zeros((total, len(names)))
    shares: Mapping[str, int] = even_shares(names)
    allowance = 0.0
    for k in range(warm + total):
        now = first + k * step
        if k % every == 0:
            seen = {n: scrape(worlds[n], now, windows[n], bounds[n]) for n in names}
            act = policy.act(seen, books.wall(now), now)
            for n in names:
                worlds[n].apply(act.actions[n], now)
            shares = act.shares
            allowance = books.allowance(now)
        lo, hi = np.searchsorted(work.arrival, [now, now + step])
        picks = router.route(shares, int(hi - lo))
        owner[lo:hi] = picks
        for i, n in enumerate(names):
            worlds[n].routed[lo:hi] = picks == i  # type: ignore[index]
        for n in names:
            worlds[n].step(now, step)
        if k >= warm:
            j = k - warm
            rows[j] = (now, sum(w.spend_rate() for w in worlds.values()), allowance)
            share_rows[j] = [shares[n] for n in names]
            replica_rows[j] = [worlds[n].replicas() for n in names]
            if progress is not None and j % 720 == 0:
                progress(j / total)
    return VariantsRun(name, worlds, owner, rows[:, 0], rows[:, 1], rows[:, 2], share_rows, replica_rows, step)


def score_variants(run: VariantsRun, work: Workload, variants: Sequence[tuple[str, ModelBudgetSpec]]) -> PolicyResult:
    """As ``sim.score.score``, each request judged in the world it was routed to, on its curve."""
    n = work.arrival.size
    status = np.full(n, QUEUED, dtype=np.int8)
    quality = np.zeros(n)
    on_time = np.zeros(n, dtype=bool)
    for k, (name, spec) in enumerate(variants):
        world, mine = run.worlds[name], run.owner == k
        its_quality, its_on_time = judged(world, spec)
        status[mine] = world.status[mine]
        quality[mine] = its_quality[mine]
        on_time[mine] = its_on_time[mine]
    scored = work.scored
    budget = variants[0][1].budget
    return PolicyResult(
        policy=f"variants-{run.policy}",
        requests=int(scored.sum()),
        served=int(np.count_nonzero(status[scored] == SERVED)),
        timed_out=int(np.count_nonzero(status[scored] == TIMED_OUT)),
        rejected=int(np.count_nonzero(status[scored] == REJECTED)),
        still_queued=int(np.count_nonzero(status[scored] == QUEUED)),
        slo_met=int(np.count_nonzero(on_time[scored])),
        total_score=float(np.where(on_time, quality, 0.0)[scored].sum()),
        dollars=float(np.sum(run.spend_rate) * run.step / 3600.0),
        breach_minutes=minutes_over(run.t, run.spend_rate, run.allowance),
        limit_changes=0,
        value_per_point=budget.value_of_point,
    )
