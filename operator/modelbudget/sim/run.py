"""Replaying one trace against one policy: the clock, the warm-up, and what is recorded.

The clock advances in steps of ``step`` seconds; policies act every ``decision_interval``
(the operator's timer; the oracle at its own interval).  Before the scored window the trace's
first ``warmup`` seconds are replayed once, unscored, so that every policy starts from the state
its own rules reach on this demand rather than from an arbitrary cold start.  After the last
arrival the clock runs on for ``drain`` seconds so queued requests can finish; their spend counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.core.capacity import CapacityLadder
from modelbudget.core.planner import resolve
from modelbudget.sim.metrics import buckets_1_2_5, scrape, window_seconds
from modelbudget.sim.oracle import DelayAwareOraclePolicy, OraclePolicy
from modelbudget.sim.policies import HpaPolicy, KedaPolicy, PlannerPolicy, Policy, StaticPolicy
from modelbudget.sim.trace import Trace
from modelbudget.sim.world import NO_DELAYS, NO_INTERRUPTIONS, Delays, Interruptions, World

POLICIES = ("planner", "hpa", "keda", "static", "oracle", "oracle-delays")


@dataclass(frozen=True)
class SimConfig:
    step: float = 5.0
    decision_interval: float = 15.0
    delays: Delays = field(default_factory=Delays)
    timeout: float | None = None  # seconds a client waits in the queue; default: twice the SLO
    warmup: float = 600.0
    drain: float | None = None  # default: the timeout
    start: datetime = datetime(2023, 11, 16, tzinfo=UTC)  # wall clock at time 0 (pacing, periods)
    hpa_target: float = 0.8  # the HPA's utilisation target (must be below 1 - tolerance to scale up)
    hpa_limit: int | None = None  # the HPA's fixed token limit; None: the top of the token range
    keda_threshold: float = 4.0  # waiting requests per replica
    node_unneeded: float = 600.0  # cluster autoscaler: a node goes after this long unneeded
    interruptions: Interruptions = NO_INTERRUPTIONS  # spot nodes taken away during the run

    def timeout_for(self, spec: ModelBudgetSpec) -> float:
        return self.timeout if self.timeout is not None else 2.0 * spec.slo.latency_seconds


@dataclass(frozen=True)
class Workload:
    """The requests one run replays: the warm-up copy first (negative times), then the trace."""

    arrival: npt.NDArray[np.float64]
    wanted: npt.NDArray[np.float64]
    prompt: npt.NDArray[np.float64]
    scored: npt.NDArray[np.bool_]
    span: float  # seconds of the scored trace

    @staticmethod
    def of(trace: Trace, reasoning_factor: float, warmup: float) -> Workload:
        head = trace.window(0.0, warmup)
        arrival = np.concatenate([head.arrival - warmup, trace.arrival])
        generated = np.concatenate([head.generated, trace.generated])
        return Workload(
            arrival=arrival,
            wanted=np.maximum(np.round(generated * reasoning_factor), 1.0),
            prompt=np.concatenate([head.prompt, trace.prompt]),
            scored=arrival >= 0,
            span=trace.span,
        )


@dataclass(frozen=True)
class Series:
    """Per step over the scored window: the time axis of the figures and of the breach count."""

    t: npt.NDArray[np.float64]
    arrivals: npt.NDArray[np.float64]  # requests arriving in the step
    spend_rate: npt.NDArray[np.float64]  # $/hour of the nodes existing during the step
    allowance: npt.NDArray[np.float64]  # $/hour allowed, judged at the last decision
    replicas: npt.NDArray[np.float64]
    ready: npt.NDArray[np.float64]
    nodes: npt.NDArray[np.float64]
    token_limit: npt.NDArray[np.float64]


@dataclass(frozen=True)
class PolicyRun:
    policy: str
    world: World
    series: Series
    step: float


def build_policy(name: str, spec: ModelBudgetSpec, world: World, config: SimConfig) -> Policy:
    start = config.start
    if name == "planner":
        return PlannerPolicy(spec)
    if name == "hpa":
        return HpaPolicy(spec, start, config.node_unneeded, config.hpa_target, config.hpa_limit)
    if name == "keda":
        return KedaPolicy(spec, start, config.node_unneeded, config.keda_threshold)
    if name == "static":
        return StaticPolicy(spec, start)
    if name == "oracle":
        return OraclePolicy(spec, world, config.step)
    if name == "oracle-delays":
        return DelayAwareOraclePolicy(spec, world, config.step)
    raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")


def run_policy(
    spec: ModelBudgetSpec, work: Workload, name: str, config: SimConfig, progress: Callable[[float], None] | None = None
) -> PolicyRun:
    step, timeout = config.step, config.timeout_for(spec)
    drain = config.drain if config.drain is not None else timeout
    delays = NO_DELAYS if name == "oracle" else config.delays
    world = World(spec, work.arrival, work.wanted, work.prompt, delays, timeout, config.start, config.interruptions)
    policy = build_policy(name, spec, world, config)
    # The oracles re-plan every step; the others on the operator's timer.
    every = (
        1
        if isinstance(policy, OraclePolicy | DelayAwareOraclePolicy)
        else max(1, round(config.decision_interval / step))
    )
    window = window_seconds(spec.metrics.window)
    bounds = buckets_1_2_5(resolve(spec).token_max)

    ladder = CapacityLadder(spec)
    initial = ladder.allocation(min(spec.replicas.min, ladder.total_slots))
    first = -math.ceil(config.warmup / step) * step
    world.place(initial.replicas, initial.nodes, first)

    total = math.ceil((work.span + drain) / step)
    warm = round(-first / step)
    rows = np.zeros((total, 8))
    allowance = 0.0
    for k in range(warm + total):
        now = first + k * step
        if k % every == 0:
            action = policy.act(scrape(world, now, window, bounds), world.books.wall(now))
            world.apply(action, now)
            allowance = world.books.allowance(now)
        world.step(now, step)
        if k >= warm:
            j = k - warm
            lo, hi = np.searchsorted(work.arrival, [now, now + step])
            rows[j] = (
                now,
                hi - lo,
                world.spend_rate(),
                allowance,
                world.replicas(),
                world.ready_replicas(now),
                sum(world.nodes().values()),
                world.token_limit,
            )
            if progress is not None and j % 720 == 0:
                progress(j / total)
    if progress is not None:
        progress(1.0)
    series = Series(*(rows[:, c] for c in range(8)))
    return PolicyRun(name, world, series, step)
