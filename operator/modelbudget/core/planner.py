"""``decide(observation, spec, state, now) -> Decision``: the pure decision core.

One frozen ``Context`` holds every fact the decision needs, worked out once: the resolved spec
(curve, token grid, capacity ladders), the ledger and allowance, the metrics verdict.  A
``Draft`` of the plan then passes through named stages, each ``(draft, ctx) -> draft`` and each
only ever narrowing what the previous allowed, adding its own typed reasons:

1. ``target``: the economic target (trusted metrics only): for each token limit ``L`` on a log
   grid (plus the marginal-rule optimum ``L* = v*b/c`` of each pool), the replicas that serve the
   demand (``lambda * G(L)`` tokens/s, queue drained in ``queueDrainSeconds``) on the
   cheapest-per-token ladder, and the net value ``v * lambda * score(L) - spend``.  The best
   feasible ``L`` wins, and free slots on nodes paid anyway are filled.  Only requests that finish
   in time score (as the oracles count them): each limit is valued at the batch a busy moment
   brings (``BURST_MARGIN``), with replicas added while the requests they bring in time pay.  If
   none is feasible even at the smallest limit, demand is capped (admitted rate) -- tokens are trimmed before requests.
   Untrusted metrics: hold replicas (never scale up); after ``fallback.afterSeconds`` apply the
   fallback, which can only scale down.
   ``size_for_limit_in_force``: when no gate applies the published limit (TokenLimitEnforced),
   replicas are sized for the limit actually in force (unbounded without gates) and for demand
   without the admission cap: the ceiling is then kept by the slow knobs alone.
2. ``limit_scale_up`` and 3. ``stabilise_scale_down``: the HPA's behaviour rules.
4. ``enforce_ceiling``: last and unconditional for replicas, cut to what the allowance buys.
5. ``hold_nodes``: nodes wanted recently are kept through their window, as far as it pays.
   Looking ahead (``core/forecast.py``; only on trusted metrics and a current history):
   ``forecast_headroom`` (between 1. and 2.): replicas (and so nodes) sized for what the economic
   target wants at the forecast's peak of demand within the time new capacity takes to serve,
   within what the allowance buys (``ForecastScaleUp``).  Where the headroom goes to a CapacityBuffer
   (``behavior.forecast.headroom``), it is not replicas but placeholder pods: ``forecast_buffer``
   (after 4.) makes the buffer what the forecast wants beyond the replicas planned, within what the
   allowance buys, and ``hold_nodes`` places replicas and buffer together, so the buffer's nodes
   count within the ceiling like any other (``ForecastBuffer``).  ``forecast_release_replicas`` (after 3.)
   and ``forecast_release_nodes`` (after 5.): what a scale-down window holds goes once the forecast
   says it is not needed before new capacity could be back, and nothing in the last horizon
   wanted it (``ForecastHold``).
6. ``fast_limit``: the token limit drops at once to what the replicas serving now can carry,
   rises at most ``maxStepUpFactor`` per decision, stays where it is while the change is within
   one grid step (and the replicas serving now carry it), and stays within its bounds.
7. ``respect_latency``: no limit whose decode time at the batch the replicas serving now run
   (continuous batching, ``core.serving``) breaks the SLO for the SLO's percentile request;
   the target stage already sizes replicas so batches stay small enough (``LatencyBound``).

The ``Decision`` carries the plan, the next controller state, the verdict, the curve and the
running spend: status, Events and metrics are projections of it, never worked out again.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from statistics import NormalDist
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from modelbudget.api.reasons import Reason
from modelbudget.api.spec import FallbackAction, Headroom, ModelBudgetSpec, PriceSource
from modelbudget.api.spec import Forecast as ForecastSpec
from modelbudget.api.status import (
    ControllerState,
    DemandForecast,
    DemandHistory,
    Knob,
    Ledger,
    Plan,
    PlanReason,
    PoolAllocation,
    Recommendation,
    ScaleUpEvent,
)
from modelbudget.core.capacity import CapacityLadder, cost_per_token, node_price, spend_of
from modelbudget.core.curve import LogCurve, resolve_curve
from modelbudget.core.dynamics import in_window, scale_up_cap, stabilised_nodes, stabilised_replicas
from modelbudget.core.enforcement import Enforcement, assess_enforcement
from modelbudget.core.forecast import Forecast, forecast, record
from modelbudget.core.generation import GenerationProfile
from modelbudget.core.observation import MetricsVerdict, Observation, assess
from modelbudget.core.pacing import Allowance, accrue, allowed_rate
from modelbudget.core.prices import PriceVerdict, assess_prices
from modelbudget.core.serving import (
    ServingSpeed,
    batch_within_many,
    busy_batch,
    busy_batch_many,
    largest_limit_within,
    largest_limit_within_many,
    mean_batch_within_many,
    slowest_speed,
)

GRID_STEPS_PER_DOUBLING = 8  # token limits tried: 2**(1/8) apart, about 9% -- finer than whole-node steps
GRID_MAX_POINTS = 161
# The published limit moves only when the new one is more than one grid step away: under steady
# demand the best limit wobbles by a step from tick to tick, and each move is a ConfigMap write,
# an Event and a reload in every gate for b*ln(1.09) of performance.
HOLD_RATIO = 2.0 ** (1.0 / GRID_STEPS_PER_DOUBLING) * (1.0 + 1e-9)
# The economic search values a limit at the requests that finish in time at the batch of a busy
# moment: ``b + BURST_MARGIN * z * sqrt(b)``.  The demand it sizes for is one window's mean, and the
# replicas it picks serve until the next decision plus a replica start: bursts in between run far
# larger batches than a Poisson batch around that mean.  Measured on bench/simulate.py (share of
# the delay-aware oracle's score on the four weakest rows): 1 (no margin) 0.83-0.92, 1.41
# 0.83-0.96, 2 0.84-0.97, 3 0.86-0.97 -- 3 also changed plans 2 leaves alone (spot, catching up).
BURST_MARGIN = 2.0
FORECAST_BUCKET_SECONDS = 30  # two decisions of the operator's timer per bucket of demand history
_EPS = 1e-6


def token_bounds(spec: ModelBudgetSpec, curve: LogCurve) -> tuple[int, int]:
    """The token limit's range: the spec's tokenLimits within the curve's valid range."""
    lo = max(spec.token_limits.min or curve.min_tokens, curve.min_tokens)
    hi = min(spec.token_limits.max or curve.max_tokens, curve.max_tokens)
    return lo, max(hi, lo)


def token_grid(lo: int, hi: int, anchors: tuple[float, ...] = ()) -> npt.NDArray[np.float64]:
    """Log-spaced limits in ``[lo, hi]`` plus ``anchors`` (the marginal-rule optima), as integers."""
    points = min(GRID_MAX_POINTS, max(2, round(np.log2(hi / lo) * GRID_STEPS_PER_DOUBLING) + 1))
    grid = np.concatenate([np.geomspace(lo, hi, points), np.clip(anchors, lo, hi)])
    return np.unique(np.round(grid)).astype(float)


@dataclass(frozen=True)
class Share:
    """A variant's part of a demand split between variants: the history the forecast is made from is
    the whole demand's (a variant's own would jump with every change of the split), and the
    forecast is this variant's fraction of it."""

    total: float  # requests/s arriving at all the variants that split it
    fraction: float


@dataclass(frozen=True, eq=False)
class ResolvedSpec:
    """A spec with what depends on it alone worked out once: the curve (fitted when the spec gives
    samples), the token limit's bounds and grid, and the capacity ladders."""

    spec: ModelBudgetSpec
    curve: LogCurve
    token_min: int
    token_max: int
    grid: npt.NDArray[np.float64]
    ladder: CapacityLadder
    ladder_without_min_nodes: CapacityLadder  # when the ceiling cannot pay even the pools' minNodes
    speed: ServingSpeed  # the slowest pool's serving speed: latency promises hold on every pool


def resolve(spec: ModelBudgetSpec) -> ResolvedSpec:
    """Raises ``CurveFitError`` when the spec's curve samples cannot give a curve."""
    curve = resolve_curve(spec.curve)
    lo, hi = token_bounds(spec, curve)
    g = spec.replicas.gpus_per_replica
    # L* = v*b/c per pool: where a token's marginal value meets its marginal cost.
    optima = tuple(spec.budget.value_of_point * curve.slope / cost_per_token(p, g) for p in spec.node_pools)
    return ResolvedSpec(
        spec=spec,
        curve=curve,
        token_min=lo,
        token_max=hi,
        grid=token_grid(lo, hi, optima),
        ladder=CapacityLadder(spec),
        ladder_without_min_nodes=CapacityLadder(spec, honour_min_nodes=False),
        speed=slowest_speed(spec),
    )


@dataclass(frozen=True, eq=False)
class GridFacts:
    """What the grid search reads that does not depend on the demand, worked out once per decision:
    with the forecast on it searches twice (at the demand seen and at the forecast's peak)."""

    tokens: npt.NDArray[np.float64]  # mean generated tokens per request at each limit
    scores: npt.NDArray[np.float64]  # mean score per request at each limit
    # (limit, request): what each of the profile's equally likely requests generates, and its score
    generated: npt.NDArray[np.float64]
    request_scores: npt.NDArray[np.float64]
    # Per limit, the largest batch at which the SLO's percentile request meets the SLO (0: none),
    # and what one replica generates at the mean batch whose busy moments stay within it.
    latency_batch: npt.NDArray[np.float64]
    latency_throughput: npt.NDArray[np.float64]


def grid_facts(resolved: ResolvedSpec, profile: GenerationProfile, prompt_tokens: float) -> GridFacts:
    grid, speed, spec = resolved.grid, resolved.speed, resolved.spec
    slo_tokens = np.minimum(profile.quantile_wanted(spec.slo.percentile / 100.0), grid)
    batch = batch_within_many(speed, spec.slo, prompt_tokens, slo_tokens)
    # Size for the busy moments: where latency bounds the batch, the batch at the SLO's percentile
    # (not the mean) must fit; a full batch is what tokensPerSecondPerReplica already plans for.
    full = batch >= speed.max_num_seqs
    mean = np.where(full, batch, np.maximum(mean_batch_within_many(batch, _slo_z(spec)), 1.0))
    generated = profile.generated_many(grid)
    request_scores = profile.scores_many(resolved.curve, generated)
    return GridFacts(
        tokens=profile.mean_generated_many(grid),
        scores=request_scores.sum(axis=1) / profile.wanted.size,  # mean_score_many, from what is here already
        generated=generated,
        request_scores=request_scores,
        latency_batch=batch,
        latency_throughput=speed.throughput_many(mean),
    )


@dataclass(frozen=True)
class Context:
    """Every fact one decision needs, worked out once, read by every stage."""

    resolved: ResolvedSpec
    obs: Observation
    state: ControllerState
    now: datetime
    verdict: MetricsVerdict
    enforcement: Enforcement
    running_spend: float  # $/h of the nodes running now
    prices: PriceVerdict  # whose prices billed running_spend
    ledger: Ledger
    allowance: Allowance
    ladder: CapacityLadder
    affordable: int  # most replicas the allowance, the pools and replicas.max allow
    min_replicas: int
    previous_limit: int | None
    demand_history: DemandHistory | None  # with this observation, when it is trusted
    forecast: Forecast | None  # None: off, untrusted metrics, or not enough recent history
    forecast_need: int | None  # replicas the economic target wants at the forecast peak (None: unaffordable)
    buffered: bool = False  # the forecast's headroom goes to a CapacityBuffer, not to replicas
    grid_facts: GridFacts | None = None  # trusted metrics only
    search: _Search | None = None  # the economic target's grid search at the demand seen (trusted metrics only)

    @property
    def spec(self) -> ModelBudgetSpec:
        return self.resolved.spec

    @property
    def demand(self) -> float:
        """Requests/s to serve now: arrivals plus the queue drained in ``queueDrainSeconds``."""
        seen = self.obs.demand
        waiting = seen.requests_waiting or 0.0
        return (seen.request_rate or 0.0) + waiting / self.spec.behavior.queue_drain_seconds


_Record = TypeVar("_Record", "Context", "Draft")


def _evolve(record: _Record, **changes: Any) -> _Record:
    """``dataclasses.replace`` for the planner's own frozen records, ``Context`` and ``Draft``
    (plain fields only: no ``__post_init__``, no init-only or cached fields): the fields are
    copied and the changed ones set, where ``replace`` walks every field into a new ``__init__``.
    A decision makes a dozen of them, and ``replace`` was a twentieth of its time."""
    unknown = changes.keys() - record.__dict__.keys()
    if unknown:
        raise TypeError(f"{type(record).__name__} has no fields {sorted(unknown)}")
    new = object.__new__(type(record))
    new.__dict__.update(record.__dict__)
    new.__dict__.update(changes)
    return new


@dataclass(frozen=True)
class Draft:
    """The plan as it passes through the stages."""

    replicas: int
    raw_replicas: int  # before the dynamics: what the scale-down window remembers
    limit: int
    admitted: float | None = None
    missing_since: datetime | None = None
    headroom: int = 0  # replicas + buffer the forecast wants ready (buffered headroom only)
    buffer: int = 0  # placeholder pods in the CapacityBuffer
    nodes: Mapping[str, int] = field(default_factory=dict)
    raw_nodes: Mapping[str, int] = field(default_factory=dict)  # before the node hold
    pool_replicas: Mapping[str, int] = field(default_factory=dict)
    reasons: tuple[PlanReason, ...] = ()

    def because(self, knob: Knob, reason: Reason, message: str, **changes: Any) -> Draft:
        return _evolve(self, reasons=(*self.reasons, PlanReason(knob=knob, reason=reason, message=message)), **changes)


@dataclass(frozen=True)
class Decision:
    """Everything the later steps (act, status, Events, metrics) read; nothing is recomputed."""

    plan: Plan
    next_state: ControllerState
    verdict: MetricsVerdict
    enforcement: Enforcement
    curve: LogCurve
    running_spend: float
    allowance: Allowance
    prices: PriceVerdict
    # The economic target's net value ($/h) at the demand seen, before the dynamics (None: untrusted
    # metrics, or not even the smallest limit fits): what variants' splits are compared by.
    target_net_per_hour: float | None = None
    target_limit: int | None = None  # the token limit of that target


Stage = Callable[[Draft, Context], Draft]


def decide(
    obs: Observation,
    resolved: ResolvedSpec,
    state: ControllerState,
    now: datetime,
    books: tuple[Ledger, Allowance] | None = None,
    share: Share | None = None,
) -> Decision:
    """``books``: the ledger and allowance when someone else keeps them -- several variants share
    one budget (``core/variants.py``), each planned within its part of the allowance; None: the
    ledger is accrued from this spec's own running nodes, as for a single Deployment.  ``share``:
    this variant's part of a demand split between variants (None: all of it)."""
    ctx, draft = context(obs, resolved, state, now, books, share)
    for stage in STAGES:
        draft = stage(draft, ctx)
    return Decision(
        plan=_plan(draft, ctx),
        next_state=_next_state(draft, ctx),
        verdict=ctx.verdict,
        enforcement=ctx.enforcement,
        curve=resolved.curve,
        running_spend=ctx.running_spend,
        allowance=ctx.allowance,
        prices=ctx.prices,
        target_net_per_hour=None if ctx.search is None else ctx.search.best_net,
        target_limit=None if ctx.search is None or ctx.search.best is None else int(resolved.grid[ctx.search.best[0]]),
    )


def buffers_headroom(look: ForecastSpec, served: bool) -> bool:
    """Whether the forecast's headroom goes to a CapacityBuffer: the spec asks for one (or says
    Auto) and the cluster serves the API.  Where it does not, an explicit CapacityBuffer buys no
    headroom at all (nothing would fill the nodes) and ``Auto`` falls back to replicas."""
    return look.enabled and served and look.headroom is not Headroom.REPLICAS


def context(
    obs: Observation,
    resolved: ResolvedSpec,
    state: ControllerState,
    now: datetime,
    books: tuple[Ledger, Allowance] | None = None,
    share: Share | None = None,
) -> tuple[Context, Draft]:
    """The facts, and an empty draft carrying the reasons the facts alone give."""
    spec = resolved.spec
    prices = assess_prices(obs.prices, obs.current_nodes, spec, now)
    running = prices.running_per_hour
    if books is None:
        at_spec = prices.source is PriceSource.SPEC
        ledger = accrue(state.ledger, running, now, spec.budget.ceiling.period, at_spec)
        allowance = allowed_rate(spec.budget, ledger, now)
    else:
        ledger, allowance = books
    draft = Draft(replicas=obs.current_replicas, raw_replicas=obs.current_replicas, limit=resolved.token_max)
    ladder = resolved.ladder
    if ladder.base_spend > allowance.per_hour + _EPS:
        ladder = resolved.ladder_without_min_nodes
        message = f"minNodes cost ${resolved.ladder.base_spend:.2f}/h, over the {allowance.explain()}"
        draft = draft.because(Knob.NODES, Reason.CEILING_BELOW_MINIMUM, message)
    affordable = min(spec.replicas.max, ladder.total_slots, ladder.max_affordable(allowance.per_hour))
    min_replicas = min(spec.replicas.min, affordable)
    verdict = assess(obs, spec, now)
    look = spec.behavior.forecast
    history = state.demand_history
    if verdict.ok and obs.demand.request_rate is not None:  # only trusted input enters the history
        seen = obs.demand.request_rate if share is None else share.total
        history = record(history, seen, now, FORECAST_BUCKET_SECONDS, look.horizon_seconds)
    ahead = forecast(history, now, look.horizon_seconds, look.quantile) if look.enabled and verdict.ok else None
    if ahead is not None and share is not None:
        ahead = replace(ahead, expected=ahead.expected * share.fraction, upper=ahead.upper * share.fraction)
    if min_replicas < spec.replicas.min:
        message = f"replicas.min={spec.replicas.min} costs more than the {allowance.explain()}"
        draft = draft.because(Knob.REPLICAS, Reason.CEILING_BELOW_MINIMUM, message)
    ctx = Context(
        resolved=resolved,
        obs=obs,
        state=state,
        now=now,
        verdict=verdict,
        enforcement=assess_enforcement(
            obs.demand.gates,
            obs.current_token_limit,
            state.limit_unenforced_since,
            now,
            spec.token_limits.enforcement_grace_seconds,
        ),
        running_spend=running,
        prices=prices,
        ledger=ledger,
        allowance=allowance,
        ladder=ladder,
        affordable=affordable,
        min_replicas=min_replicas,
        previous_limit=state.token_limit or obs.current_token_limit,
        demand_history=history,
        forecast=ahead,
        forecast_need=None,
        buffered=buffers_headroom(look, obs.capacity_buffers),
        grid_facts=grid_facts(resolved, verdict.profile, obs.demand.prompt_tokens_per_request or 0.0)
        if verdict.ok and verdict.profile is not None
        else None,
    )
    if ctx.grid_facts is not None:
        # The target's search and, with a forecast, the same search at the forecast's peak (three
        # stages read what it wants): both in one pass over the grid.
        assert obs.demand.request_rate is not None
        seen = obs.demand.request_rate
        found = _search(ctx, [seen] if ahead is None else [seen, max(ahead.upper, seen)])
        need = None if ahead is None or found[1].best is None else found[1].best[1]
        ctx = _evolve(ctx, search=found[0], forecast_need=need)
    return ctx, draft


# ---------------------------------------------------------------------------------------------
# 1. The target


def target(draft: Draft, ctx: Context) -> Draft:
    return economic_target(draft, ctx) if ctx.verdict.ok else hold_or_fall_back(draft, ctx)


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity, as GridFacts
class _Search:
    """The grid search: per limit, the replicas it needs, its value, and the best feasible one."""

    tokens: npt.NDArray[np.float64]  # mean generated tokens per request at each limit
    needed: list[int | None]  # replicas each limit needs (None: more than the pools hold)
    value_per_hour: npt.NDArray[np.float64]
    blocked: list[tuple[int, int, Reason]]  # infeasible limits: (grid index, replicas needed, why)
    best: tuple[int, int] | None  # (grid index, replicas) of the best feasible limit
    best_net: float | None = None  # its net value, $/h: what requests in time are worth less the spend


def _search(ctx: Context, rates: list[float]) -> list[_Search]:
    """The grid search at each request rate (arriving now, the queue drained as ``Context.demand``
    says), all rates in one numpy pass.

    Every (rate, limit) pair is judged with whole-array integer arithmetic (the replicas for its
    tokens/s, for its latency, and whether the pools and the allowance hold them): a decision
    searches 2 x ~60 pairs, and a Python walk over them cost more than the numbers it read.  Only
    the blocked pairs (their reasons) and the feasible ones (their replicas in time) go on one by one."""
    spec, ladder, facts = ctx.spec, ctx.ladder, ctx.grid_facts
    assert facts is not None
    queue = (ctx.obs.demand.requests_waiting or 0.0) / spec.behavior.queue_drain_seconds
    demands = [rate + queue for rate in rates]
    tokens = facts.tokens
    loads = np.array(demands)[:, None] * tokens[None, :]  # tokens/s each limit needs, per rate
    room = min(spec.replicas.max, ladder.total_slots)
    # The replicas for each limit's tokens/s, for the whole grid at once (-1: no fit).
    need_tokens = ladder.replicas_for_many(loads.ravel()).reshape(loads.shape)
    has_tokens = need_tokens >= 0
    # The replicas that keep each batch small enough for the SLO's percentile request to meet the
    # SLO at each limit (sequences in flight per replica within the batch that allows).  The
    # smallest limit is never blocked by latency: there is nothing lower to serve at
    # (respect_latency says so); at the others no batch may do, not even a lone sequence.
    unbatchable = facts.latency_batch <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for_latency = np.ceil(loads / facts.latency_throughput - _EPS)
    latency_need = np.where(unbatchable[None, :] | (loads <= 0), 0.0, for_latency).astype(np.int64)
    latency_need[:, 0] = 0
    no_batch = np.broadcast_to(unbatchable, loads.shape).copy()
    no_batch[:, 0] = False
    need = np.where(has_tokens, np.maximum(need_tokens, latency_need), -1)
    fits_tokens = has_tokens & (need_tokens <= min(room, ctx.affordable))
    too_many = ~no_batch & (~has_tokens | (need > room) | (need > ctx.affordable))
    feasible = ~no_batch & ~too_many
    # What the economics reads of each limit: the replicas it needs (None: more than the pools
    # hold), and why each infeasible one is out.
    needed_of = np.where(no_batch, need_tokens, need).tolist()
    searched = []
    for k in range(len(rates)):
        needed: list[int | None] = [None if n < 0 else n for n in needed_of[k]]
        blocked: list[tuple[int, int, Reason]] = []
        for i in np.flatnonzero(no_batch[k] | too_many[k]).tolist():
            if no_batch[k, i]:  # not even a lone sequence meets the SLO at this limit
                blocked.append((i, 0, Reason.LATENCY_BOUND))
                continue
            n = needed[i]
            # The replicas for its tokens/s would do; those for batches small enough for the SLO would not.
            why = Reason.LATENCY_BOUND if fits_tokens[k, i] else _why_blocked(n, room, spec)
            blocked.append((i, ladder.total_slots + 1 if n is None else n, why))
        searched.append((needed, blocked))
    asked_rate, asked_limit = np.nonzero(feasible)  # rate by rate, limits in grid order
    found = _best_replicas_in_time(
        ctx,
        asked_limit,
        np.array(demands)[asked_rate],
        np.array(rates)[asked_rate],
        np.maximum(need[asked_rate, asked_limit], ctx.min_replicas),
    )
    best: list[tuple[int, int, float] | None] = [None] * len(rates)
    for k, i, (n, net) in zip(asked_rate.tolist(), asked_limit.tolist(), found, strict=True):
        held = best[k]
        if held is None or net >= held[2] - _EPS:
            best[k] = (i, n, net)
    return [
        _Search(
            tokens,
            needed,
            spec.budget.value_of_point * rate * 3600.0 * facts.scores,
            blocked,
            None if b is None else (b[0], b[1]),
            None if b is None else b[2],
        )
        for rate, (needed, blocked), b in zip(rates, searched, best, strict=True)
    ]


def _best_replicas_in_time(
    ctx: Context,
    limits: Sequence[int] | npt.NDArray[np.int64],
    demands: Sequence[float] | npt.NDArray[np.float64],
    rates: Sequence[float] | npt.NDArray[np.float64],
    fewest: Sequence[int] | npt.NDArray[np.int64],
) -> list[tuple[int, float]]:
    """For each limit (an index into the grid) at its demand (requests/s to serve; ``rates``: those
    arriving, whose score is the value), the replicas, from its ``fewest`` up to what the
    allowance and the pools allow, with the best net value at that limit, valuing only the requests
    that finish in time: a request generating ``min(W, limit)`` scores only if its prefill and decode
    at the busy batch (the SLO's percentile of a Poisson batch) its replica runs meet the SLO -- as
    the oracles count it.  More replicas mean smaller batches and so more requests in time; the
    search pays for them only as far as they are worth it.

    The batches of every (limit, replicas) pair come from one numpy pass (a decision asks this of a
    whole token grid, at two demands with the forecast on); the requests in time are then counted
    only for the replicas the one-at-a-time walk reaches: from ``fewest`` up to the first count at
    which every request is in time (more replicas only cost more), keeping the first count better
    by more than ``_EPS``."""
    facts, speed, spec = ctx.grid_facts, ctx.resolved.speed, ctx.spec
    assert facts is not None
    if len(fewest) == 0:
        return []
    first = np.asarray(fewest)
    last = np.maximum(min(ctx.affordable, spec.replicas.max, ctx.ladder.total_slots), first)
    counts = np.arange(first.min(), last.max() + 1)
    # Rows: limits; columns: replica counts; the last axis: the profile's equally likely requests.
    used, scores = facts.generated[limits], facts.request_scores[limits]
    prompt = ctx.obs.demand.prompt_tokens_per_request or 0.0
    value_of_all = spec.budget.value_of_point * np.asarray(rates, dtype=float) * 3600.0
    with np.errstate(divide="ignore", invalid="ignore"):
        per_replica = (np.asarray(demands, dtype=float) * facts.tokens[limits])[:, None] / counts[None, :]
    mean = np.where(counts[None, :] > 0, speed.batch_for_many(per_replica), math.inf)
    busy = np.minimum(busy_batch_many(mean, BURST_MARGIN * _slo_z(spec)), speed.max_num_seqs)
    # More than a full batch per replica: the queue grows and nobody is in time.
    within = np.where(mean <= speed.max_num_seqs, largest_limit_within_many(speed, spec.slo, prompt, busy), 0.0)
    walked = (counts[None, :] >= first[:, None]) & (counts[None, :] <= last[:, None])
    all_in_time = walked & (within + _EPS >= used[:, -1:])
    stop = np.where(all_in_time, counts[None, :], last[:, None]).min(axis=1)
    row, column = np.nonzero(walked & (counts[None, :] <= stop[:, None]))
    in_time = used[row] <= within[row, column][:, None] + _EPS
    share = np.where(in_time, scores[row], 0.0).sum(axis=1) / scores.shape[1]  # the mean, as generation.py takes it
    net = value_of_all[row] * share - ctx.ladder.spend_table[counts[column]]
    # Row by row, in increasing replicas: the first count better than the best so far by _EPS.
    best: dict[int, tuple[int, float]] = {}
    for r, n, value in zip(row.tolist(), counts[column].tolist(), net.tolist(), strict=True):
        if r not in best or value > best[r][1] + _EPS:
            best[r] = (n, value)
    return [best[r] for r in range(len(fewest))]


def _slo_tokens(ctx: Context, limit: float) -> float:
    """What the SLO's percentile request generates under ``limit``."""
    profile = ctx.verdict.profile
    assert profile is not None
    return min(profile.quantile_wanted(ctx.spec.slo.percentile / 100.0), limit)


def _slo_z(spec: ModelBudgetSpec) -> float:
    """The standard normal quantile of the SLO's percentile (1.645 for p95)."""
    return _normal_quantile(spec.slo.percentile)


@functools.lru_cache(maxsize=16)
def _normal_quantile(percentile: float) -> float:
    return NormalDist().inv_cdf(percentile / 100.0)


def _why_blocked(need: int | None, room: int, spec: ModelBudgetSpec) -> Reason:
    if need is not None and need <= room:
        return Reason.BUDGET_LIMITED
    return Reason.MAX_REPLICAS if need is not None and need > spec.replicas.max else Reason.MAX_NODES


def economic_target(draft: Draft, ctx: Context) -> Draft:
    found = ctx.search
    assert found is not None
    if found.best is None:
        return _admission_capped(draft, ctx, found)
    i, n = found.best
    limit = int(ctx.resolved.grid[i])
    draft = _evolve(draft, limit=limit)
    rmax = ctx.spec.replicas.max
    if n > ctx.min_replicas and n == ctx.affordable and n < rmax:
        draft = draft.because(Knob.REPLICAS, Reason.BUDGET_LIMITED, f"{n} replicas is all the allowance buys")
    if n == ctx.min_replicas and ctx.min_replicas > 0:
        message = f"demand needs fewer, replicas.min is {ctx.min_replicas}"
        draft = draft.because(Knob.REPLICAS, Reason.MIN_REPLICAS, message)
    draft = _why_not_higher(draft, ctx, found, i, n)
    # Slots on nodes that are paid anyway (minNodes, the rest of a node) cost nothing: fill them.
    # They are headroom for the next burst while new pods and nodes take a minute or more.
    ladder = ctx.ladder
    while n < min(ctx.affordable, rmax) and ladder.spend(n + 1) <= ladder.spend(n) + _EPS:
        n += 1
    return _evolve(draft, replicas=n, raw_replicas=n)


def _why_not_higher(draft: Draft, ctx: Context, found: _Search, i: int, n: int) -> Draft:
    """The reason the token limit is not the next one up the grid."""
    grid, value = ctx.resolved.grid, found.value_per_hour
    if i == grid.size - 1:
        return draft.because(
            Knob.TOKEN_LIMIT, Reason.MAX_TOKENS, f"at the upper bound {int(grid[i])} of the token limit"
        )
    better = [(j, need, why) for j, need, why in found.blocked if j > i and value[j] > value[i]]
    if better:
        j, need, why = better[0]
        needs = f" needs {need} replicas" if need else ""
        message = f"a limit of {int(grid[j])} tokens{needs}: {_held_message(why, need, ctx.spec)}"
        return draft.because(Knob.TOKEN_LIMIT, why, message)
    need_next = found.needed[i + 1] or n
    cost = ctx.ladder.spend(max(need_next, ctx.min_replicas)) - ctx.ladder.spend(n)
    message = (
        f"raising the limit to {int(grid[i + 1])} adds ${value[i + 1] - value[i]:.2f}/h of value for ${cost:.2f}/h"
    )
    return draft.because(Knob.TOKEN_LIMIT, Reason.MARGINAL_VALUE, message)


def _admission_capped(draft: Draft, ctx: Context, found: _Search) -> Draft:
    """Not even the smallest limit fits: serve what the affordable replicas can, at that limit."""
    n, smallest = ctx.affordable, int(ctx.resolved.grid[0])
    admitted = ctx.ladder.throughput(n) / max(found.tokens[0], 1.0)
    why = found.blocked[0][2]
    draft = _evolve(draft, replicas=n, raw_replicas=n, limit=smallest, admitted=admitted)
    draft = draft.because(Knob.REPLICAS, why, _held_message(why, n, ctx.spec))
    message = (
        f"even the minimum token limit ({smallest}) needs more than {n} replicas "
        f"for {ctx.demand:.3g} req/s; admitting {admitted:.3g} req/s"
    )
    return draft.because(Knob.ADMITTED_RATE, Reason.ADMISSION_CAPPED, message)


def _held_message(why: Reason, replicas: int, spec: ModelBudgetSpec) -> str:
    if why is Reason.LATENCY_BOUND and replicas == 0:
        return f"even a lone sequence would miss the latency SLO ({_slo_terms(spec)})"
    if why is Reason.LATENCY_BOUND:
        held = "replicas.max" if replicas > spec.replicas.max else "the allowance and the pools"
        return f"batches small enough for the latency SLO ({_slo_terms(spec)}) need more than {held} allow"
    if why is Reason.MAX_REPLICAS:
        return f"more than replicas.max={spec.replicas.max}"
    if why is Reason.MAX_NODES:
        return "more than the node pools hold at maxNodes"
    return f"{replicas} replicas cost more than the allowance"


def hold_or_fall_back(draft: Draft, ctx: Context) -> Draft:
    """Untrusted metrics never scale up: hold, and after the fallback delay apply the fallback."""
    missing_since = ctx.state.metrics_missing_since or ctx.now
    blind_for = (ctx.now - missing_since).total_seconds()
    current = ctx.obs.current_replicas
    r = ctx.resolved
    limit = min(max(ctx.previous_limit or r.token_max, r.token_min), r.token_max)
    draft = _evolve(draft, replicas=current, raw_replicas=current, limit=limit, missing_since=missing_since)
    fallback = ctx.spec.behavior.fallback
    if blind_for >= fallback.after_seconds and fallback.action is FallbackAction.SCALE_TO:
        assert fallback.replicas is not None
        n = min(current, fallback.replicas)
        message = f"metrics missing for {blind_for:.0f}s: fallback to {n} (never above current)"
        return draft.because(Knob.REPLICAS, Reason.FALLBACK_SCALE_TO, message, replicas=n, raw_replicas=n)
    message = f"holding {current} replicas and limit {limit}: {ctx.verdict.message}"
    return draft.because(Knob.REPLICAS, ctx.verdict.reason, message)


def size_for_limit_in_force(draft: Draft, ctx: Context) -> Draft:
    """Never plan on a knob that is not there: without gates applying the published limit (and the
    admission cap), requests take what they want up to the limit actually in force."""
    if not ctx.verdict.ok or ctx.enforcement.plannable:
        return draft
    profile = ctx.verdict.profile
    assert profile is not None
    in_force = ctx.enforcement.limit_in_force
    tokens_per_second = ctx.demand * profile.mean_generated(in_force) if ctx.demand > 0 else 0.0
    need = ctx.ladder.replicas_for(tokens_per_second)
    n = min(ctx.affordable, ctx.spec.replicas.max) if need is None else max(need, ctx.min_replicas)
    n = max(draft.replicas, n)
    what = "unbounded requests" if math.isinf(in_force) else f"the {in_force:g} tokens the gates apply"
    message = (
        f"{ctx.enforcement.message}; sizing for {what} and all {ctx.demand:.3g} req/s: "
        f"{n} replicas (the ceiling is kept by replicas and nodes alone)"
    )
    return draft.because(Knob.REPLICAS, Reason.LIMIT_NOT_ENFORCED, message, replicas=n, raw_replicas=n)


# ---------------------------------------------------------------------------------------------
# Looking ahead


def forecast_headroom(draft: Draft, ctx: Context) -> Draft:
    """New replicas and nodes take the forecast's horizon to serve: size them now for the demand
    the forecast's upper quantile expects by then.  The economic target decides what that demand
    is worth: where another node costs more than its value, the same nodes serve the peak at a
    lower limit (the fast knob), so headroom never buys a node the economics would not."""
    ahead = ctx.forecast
    if ahead is None or not ctx.verdict.ok or draft.admitted is not None:
        return draft
    if ahead.upper <= (ctx.obs.demand.request_rate or 0.0):
        return draft
    need = ctx.forecast_need
    n = ctx.affordable if need is None else need
    n = min(n, ctx.affordable, ctx.spec.replicas.max)
    if n <= draft.replicas:
        return draft
    if ctx.buffered:  # forecast_buffer sizes the buffer once the replicas are known
        return _evolve(draft, headroom=n)
    if ctx.spec.behavior.forecast.headroom is Headroom.CAPACITY_BUFFER:
        message = (
            f"{ahead.explain()}: headroom goes to a CapacityBuffer, and the cluster does not serve "
            "autoscaling.x-k8s.io/v1beta1 capacitybuffers: none bought"
        )
        return draft.because(Knob.CAPACITY_BUFFER, Reason.CAPACITY_BUFFER_NOT_SERVED, message)
    message = f"{ahead.explain()}: {n} replicas (not {draft.replicas}) ready for it"
    return draft.because(Knob.REPLICAS, Reason.FORECAST_SCALE_UP, message, replicas=n)


def forecast_buffer(draft: Draft, ctx: Context) -> Draft:
    """The CapacityBuffer: placeholder pods for what the forecast wants ready beyond the replicas
    planned, so the cluster autoscaler brings their nodes up ahead while the replicas follow demand.
    Within what the allowance buys with the replicas -- whatever came before.  Zero on untrusted or
    stale metrics: ``forecast_headroom`` then set no headroom."""
    # The headroom is within what the allowance buys, and so are the replicas: the cut to the room
    # left is the ceiling's guarantee stated where the buffer is made, not a bound that binds today.
    room = max(ctx.affordable - draft.replicas, 0)
    buffer = min(max(draft.headroom - draft.replicas, 0), room)
    if buffer == 0 or not ctx.verdict.ok or ctx.forecast is None:
        return _evolve(draft, buffer=0)
    ahead = ctx.forecast
    message = (
        f"{ahead.explain()}: {buffer} placeholder pods beside {draft.replicas} replicas, ready for {draft.headroom}"
    )
    return draft.because(Knob.CAPACITY_BUFFER, Reason.FORECAST_BUFFER, message, buffer=buffer)


def _wanted_within(ctx: Context, seconds: float) -> list[Recommendation]:
    return in_window(ctx.state.recommendations, ctx.now, seconds)


def forecast_release_replicas(draft: Draft, ctx: Context) -> Draft:
    """Replicas the scale-down window holds go once the forecast says they are not needed within
    its horizon -- the time new ones would take to serve again -- and nothing in the last horizon
    wanted them: the window still holds for at least the horizon, the forecast decides the rest."""
    ahead, current = ctx.forecast, ctx.obs.current_replicas
    if ahead is None or not ctx.verdict.ok or draft.replicas <= draft.raw_replicas:
        return draft
    need = ctx.forecast_need
    if need is None:
        return draft
    recent = [r.replicas for r in _wanted_within(ctx, ahead.horizon_seconds)]
    keep = min(max(draft.raw_replicas, need, *recent), draft.replicas)
    if keep >= draft.replicas:
        return draft
    message = f"{keep} replicas, not the {draft.replicas} the window holds (current {current}): {ahead.explain()}"
    return draft.because(Knob.REPLICAS, Reason.FORECAST_HOLD, message, replicas=keep)


def forecast_release_nodes(draft: Draft, ctx: Context) -> Draft:
    """The same for nodes the node window holds beyond what the replicas need."""
    ahead = ctx.forecast
    if ahead is None or not ctx.verdict.ok:
        return draft
    need = ctx.forecast_need
    if need is None:
        return draft
    enough = ctx.ladder.allocation(max(need, draft.replicas + draft.buffer)).nodes
    recent = _wanted_within(ctx, ahead.horizon_seconds)
    nodes = dict(draft.nodes)
    for pool in ctx.spec.node_pools:
        held = nodes[pool.name]
        keep = max(draft.raw_nodes[pool.name], enough[pool.name], *(r.nodes.get(pool.name, 0) for r in recent))
        if held > keep:
            message = f"pool {pool.name}: {keep} nodes, not the {held} the window holds: {ahead.explain()}"
            draft = draft.because(Knob.NODES, Reason.FORECAST_HOLD, message)
            nodes[pool.name] = keep
    return _evolve(draft, nodes=nodes)


# ---------------------------------------------------------------------------------------------
# 2.-4. The slow knobs' dynamics and the ceiling


def limit_scale_up(draft: Draft, ctx: Context) -> Draft:
    current, policy = ctx.obs.current_replicas, ctx.spec.behavior.scale_up
    if not ctx.verdict.ok or draft.replicas <= current:
        return draft
    cap = scale_up_cap(current, ctx.state.scale_ups, ctx.now, policy)
    if draft.replicas <= cap:
        return draft
    message = f"wants {draft.replicas}, scale-up limited to {cap} per {policy.period_seconds}s"
    return draft.because(Knob.REPLICAS, Reason.SCALE_UP_LIMIT, message, replicas=cap)


def stabilise_scale_down(draft: Draft, ctx: Context) -> Draft:
    current, window = ctx.obs.current_replicas, ctx.spec.behavior.scale_down.stabilization_window_seconds
    if not ctx.verdict.ok or draft.replicas >= current:
        return draft
    held = stabilised_replicas(draft.replicas, current, ctx.state.recommendations, ctx.now, window)
    if held <= draft.replicas:
        return draft
    message = f"wants {draft.replicas}, holding {held} for the {window}s stabilisation window"
    return draft.because(Knob.REPLICAS, Reason.SCALE_DOWN_STABILIZATION, message, replicas=held)


def enforce_ceiling(draft: Draft, ctx: Context) -> Draft:
    """The ceiling holds whatever came before it."""
    if draft.replicas <= ctx.affordable:
        return draft
    budget_bound = ctx.affordable == ctx.ladder.max_affordable(ctx.allowance.per_hour)
    why = Reason.BUDGET_LIMITED if budget_bound else Reason.MAX_REPLICAS
    message = f"cut from {draft.replicas} to {ctx.affordable}: {_held_message(why, draft.replicas, ctx.spec)}"
    return draft.because(Knob.REPLICAS, why, message, replicas=ctx.affordable)


def hold_nodes(draft: Draft, ctx: Context) -> Draft:
    """Place the replicas, and the buffer's placeholder pods after them (the ladder fills the
    cheapest slots first, so the replicas keep the slots they would have alone); keep recently
    wanted nodes through the node window, as far as the allowance pays for them."""
    spec, allocation = ctx.spec, ctx.ladder.allocation(draft.replicas + draft.buffer)
    nodes = dict(allocation.nodes)
    window = spec.behavior.node_scale_down.stabilization_window_seconds
    placed = ctx.ladder.allocation(draft.replicas).replicas
    draft = _evolve(draft, raw_nodes=allocation.nodes, pool_replicas=placed)
    for pool in spec.node_pools:
        current = ctx.obs.current_nodes.get(pool.name, 0)
        wanted = nodes[pool.name]
        held = stabilised_nodes(pool.name, wanted, current, ctx.state.recommendations, ctx.now, window)
        held = min(held, pool.max_nodes)
        if held > wanted and spend_of({**nodes, pool.name: held}, spec) <= ctx.allowance.per_hour + _EPS:
            message = f"pool {pool.name}: wants {wanted} nodes, holding {held} for {window}s"
            draft = draft.because(Knob.NODES, Reason.NODE_SCALE_DOWN_STABILIZATION, message)
            nodes[pool.name] = held
    return _evolve(draft, nodes=nodes)


# ---------------------------------------------------------------------------------------------
# 6. The fast knob


def fast_limit(draft: Draft, ctx: Context) -> Draft:
    if ctx.verdict.ok:
        draft = _carry_now(draft, ctx)
        draft = _step_up(draft, ctx)
        draft = _hold_within_a_step(draft, ctx)
    r = ctx.resolved
    return _evolve(draft, limit=min(max(draft.limit, r.token_min), r.token_max))


def _carry_now(draft: Draft, ctx: Context) -> Draft:
    """The largest limit, up to the target, that the replicas serving now can carry."""
    profile, grid = ctx.verdict.profile, ctx.resolved.grid
    assert profile is not None
    serving = ctx.ladder.throughput(min(ctx.obs.ready_replicas, draft.replicas))
    if ctx.demand * profile.mean_generated(draft.limit) <= serving + _EPS:
        return draft
    assert ctx.grid_facts is not None
    fits = grid[(grid <= draft.limit) & (ctx.demand * ctx.grid_facts.tokens <= serving + _EPS)]
    lowered = int(fits[-1]) if fits.size else int(grid[0])
    ready = f"{ctx.obs.ready_replicas} of {draft.replicas} replicas ready"
    message = f"{ready}: limit {lowered} (not {draft.limit}) until they are"
    return draft.because(Knob.TOKEN_LIMIT, Reason.CAPACITY_CATCHING_UP, message, limit=lowered)


def _step_up(draft: Draft, ctx: Context) -> Draft:
    previous, factor = ctx.previous_limit, ctx.spec.token_limits.max_step_up_factor
    if previous is None or draft.limit <= previous * factor:
        return draft
    stepped = max(int(previous * factor), ctx.resolved.token_min)
    message = f"wants {draft.limit}, rising from {previous} to {stepped} this step"
    return draft.because(Knob.TOKEN_LIMIT, Reason.TOKEN_STEP_UP_LIMIT, message, limit=stepped)


def _hold_within_a_step(draft: Draft, ctx: Context) -> Draft:
    previous = ctx.previous_limit
    if previous is None or previous == draft.limit:
        return draft
    if max(previous, draft.limit) > min(previous, draft.limit) * HOLD_RATIO:
        return draft
    r, profile = ctx.resolved, ctx.verdict.profile
    assert profile is not None
    serving = ctx.ladder.throughput(min(ctx.obs.ready_replicas, draft.replicas))
    if not r.token_min <= previous <= r.token_max or ctx.demand * profile.mean_generated(previous) > serving + _EPS:
        return draft  # a limit the replicas serving now cannot carry is never kept
    message = f"wants {draft.limit}, keeping {previous}: within one step ({HOLD_RATIO - 1:.0%}) of it"
    return draft.because(Knob.TOKEN_LIMIT, Reason.TOKEN_LIMIT_HELD, message, limit=previous)


# ---------------------------------------------------------------------------------------------
# 7. Latency


def respect_latency(draft: Draft, ctx: Context) -> Draft:
    """No limit whose decode time, at the batch the replicas serving now run in their busy moments
    (the SLO's percentile of a Poisson batch), breaks the SLO."""
    if not ctx.verdict.ok:
        return draft
    profile, grid, speed = ctx.verdict.profile, ctx.resolved.grid, ctx.resolved.speed
    assert profile is not None
    serving = min(ctx.obs.ready_replicas, draft.replicas)
    prompt = ctx.obs.demand.prompt_tokens_per_request or 0.0

    def meets(limit: float) -> bool:
        per_replica = ctx.demand * profile.mean_generated(limit) / serving if serving else math.inf
        mean = speed.batch_for(per_replica)
        if mean > speed.max_num_seqs:
            return False
        batch = min(busy_batch(mean, _slo_z(ctx.spec)), speed.max_num_seqs)
        return _slo_tokens(ctx, limit) <= largest_limit_within(speed, ctx.spec.slo, prompt, batch) + _EPS

    if meets(draft.limit):
        return draft
    if draft.limit <= grid[0]:
        message = f"even the smallest limit {draft.limit} misses the latency SLO ({_slo_terms(ctx.spec)})"
        return draft.because(Knob.TOKEN_LIMIT, Reason.LATENCY_BOUND, message)
    # Both the batch and the tokens fall with the limit: the first that fits from the top is the largest.
    lowered = next((int(g) for g in grid[::-1] if g < draft.limit and meets(float(g))), int(grid[0]))
    message = (
        f"a limit of {draft.limit} tokens would miss the latency SLO ({_slo_terms(ctx.spec)}) "
        f"at the batch {serving} replicas run: {lowered}"
    )
    return draft.because(Knob.TOKEN_LIMIT, Reason.LATENCY_BOUND, message, limit=lowered)


def _slo_terms(spec: ModelBudgetSpec) -> str:
    slo = spec.slo
    terms = [f"p{slo.percentile:g} e2e {slo.latency_seconds:g}s"]
    if slo.time_to_first_token_seconds is not None:
        terms.append(f"TTFT {slo.time_to_first_token_seconds:g}s")
    if slo.time_per_output_token_seconds is not None:
        terms.append(f"TPOT {slo.time_per_output_token_seconds:g}s")
    return ", ".join(terms)


STAGES: tuple[Stage, ...] = (
    target,
    size_for_limit_in_force,
    forecast_headroom,
    limit_scale_up,
    stabilise_scale_down,
    forecast_release_replicas,
    enforce_ceiling,
    forecast_buffer,
    hold_nodes,
    forecast_release_nodes,
    fast_limit,
    respect_latency,
)


# ---------------------------------------------------------------------------------------------
# The results


def _plan(draft: Draft, ctx: Context) -> Plan:
    spec = ctx.spec
    return Plan(
        replicas=draft.replicas,
        buffer_replicas=draft.buffer,
        pools=[
            PoolAllocation(
                pool=p.name,
                nodes=draft.nodes[p.name],
                replicas=draft.pool_replicas[p.name],
                spend_per_hour=draft.nodes[p.name] * node_price(p),
            )
            for p in spec.node_pools
        ],
        token_limit=draft.limit,
        admitted_requests_per_second=draft.admitted,
        demand_requests_per_second=ctx.obs.demand.request_rate if ctx.verdict.ok else None,
        expected_spend_per_hour=spend_of(draft.nodes, spec),
        allowed_spend_per_hour=ctx.allowance.per_hour,
        expected_performance=_expected_performance(draft, ctx),
        metrics_available=ctx.verdict.ok,
        forecast=_forecast_status(ctx.forecast),
        reasons=list(draft.reasons),
        decided_at=ctx.now,
    )


def _forecast_status(ahead: Forecast | None) -> DemandForecast | None:
    if ahead is None:
        return None
    return DemandForecast(
        model=ahead.model,
        horizon_seconds=ahead.horizon_seconds,
        quantile=ahead.quantile,
        expected_requests_per_second=ahead.expected,
        upper_requests_per_second=ahead.upper,
    )


def _expected_performance(draft: Draft, ctx: Context) -> float:
    curve, profile = ctx.resolved.curve, ctx.verdict.profile
    if profile is None or not ctx.verdict.ok:
        return min(max(curve.performance(draft.limit), 0.0), 1.0)
    grid, facts = ctx.resolved.grid, ctx.grid_facts
    at = int(np.searchsorted(grid, draft.limit))
    if facts is not None and at < grid.size and grid[at] == draft.limit:  # worked out already
        score = float(facts.scores[at])
    else:
        score = float(profile.mean_score_many(curve, np.array([float(draft.limit)]))[0])
    demand = ctx.obs.demand.request_rate or 0.0
    if demand <= 0:
        return score
    served = demand if draft.admitted is None else min(draft.admitted, demand)
    served = min(served, ctx.ladder.throughput(draft.replicas) / max(profile.mean_generated(draft.limit), 1.0))
    return score * served / demand


def _next_state(draft: Draft, ctx: Context) -> ControllerState:
    behavior, now, state = ctx.spec.behavior, ctx.now, ctx.state
    keep = timedelta(
        seconds=max(
            behavior.scale_down.stabilization_window_seconds,
            behavior.node_scale_down.stabilization_window_seconds,
        )
    )
    recs = [r for r in state.recommendations if now - r.at < keep]
    recs.append(Recommendation(at=now, replicas=draft.raw_replicas, nodes=dict(draft.raw_nodes)))
    period = timedelta(seconds=behavior.scale_up.period_seconds)
    ups = [e for e in state.scale_ups if now - e.at < period]
    current = ctx.obs.current_replicas
    if draft.replicas > current:
        ups.append(ScaleUpEvent(at=now, added=draft.replicas - current))
    return ControllerState(
        ledger=ctx.ledger,
        recommendations=recs,
        scale_ups=ups,
        metrics_missing_since=draft.missing_since,
        token_limit=draft.limit,
        limit_unenforced_since=ctx.enforcement.mismatch_since,
        demand_history=ctx.demand_history,
    )
