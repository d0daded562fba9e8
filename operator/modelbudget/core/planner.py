"""``decide(observation, spec, state, now) -> Plan``: the pure decision core.

Order of the rules, each one only ever narrowing what the previous allowed:

1. Ledger and allowance: integrate spend, derive the allowed rate (hourly cap or paced budget).
2. Economic target (trusted metrics only): for each token limit ``L`` on a log grid (plus the
   marginal-rule optimum ``L* = v*b/c`` of each pool), the
   replicas that serve the demand (``lambda * G(L)`` tokens/s, queue drained in
   ``queueDrainSeconds``) on the cheapest-per-token ladder, and the net value
   ``v * lambda * score(L) - spend``.  The best feasible ``L`` wins, and free slots on nodes paid
   anyway are filled; if none is feasible even at the smallest limit, demand is capped (admitted
   rate) -- tokens are trimmed before requests.
3. Untrusted metrics: hold replicas (never scale up); after ``fallback.afterSeconds`` apply the
   fallback, which can only scale down.
4. Dynamics: scale-up rate limit, scale-down stabilisation (replicas and nodes).
5. The ceiling, last and unconditional: replicas and nodes are cut to what the allowance buys.
6. The fast knob: the token limit drops at once to what the replicas serving now can carry,
   and rises at most ``maxStepUpFactor`` per decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import FallbackAction, ModelBudgetSpec
from modelbudget.api.status import (
    ControllerState,
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
from modelbudget.core.dynamics import scale_up_cap, stabilised_nodes, stabilised_replicas
from modelbudget.core.generation import GenerationProfile
from modelbudget.core.observation import Observation, assess
from modelbudget.core.pacing import Allowance, accrue, allowed_rate

GRID_STEPS_PER_DOUBLING = 8  # token limits tried: 2**(1/8) apart, about 9% -- finer than whole-node steps
GRID_MAX_POINTS = 161
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


@dataclass
class _Target:
    replicas: int
    token_limit: int
    admitted: float | None
    reasons: list[PlanReason] = field(default_factory=list)


def _economic_target(
    spec: ModelBudgetSpec,
    curve: LogCurve,
    profile: GenerationProfile,
    demand: float,
    waiting: float,
    ladder: CapacityLadder,
    affordable: int,
    min_replicas: int,
    grid: npt.NDArray[np.float64],
) -> _Target:
    drain = waiting / spec.behavior.queue_drain_seconds
    tokens = profile.mean_generated_many(grid)
    scores = profile.mean_score_many(curve, grid)
    value_per_hour = spec.budget.value_of_point * demand * 3600.0 * scores
    rmax, slots = spec.replicas.max, ladder.total_slots

    best: tuple[int, int, float] | None = None  # (grid index, replicas, net value)
    blocked: list[tuple[int, int, str]] = []  # infeasible limits: (grid index, replicas needed, why)
    for i in range(grid.size):
        need = ladder.replicas_for((demand + drain) * tokens[i])
        if need is None or need > min(rmax, slots) or need > affordable:
            why = "MaxReplicas" if need is not None and need > rmax else "MaxNodes"
            if need is not None and need <= min(rmax, slots):
                why = "BudgetLimited"
            blocked.append((i, need if need is not None else slots + 1, why))
            continue
        n = max(need, min_replicas)
        net = value_per_hour[i] - ladder.spend(n)
        if best is None or net >= best[2] - _EPS:
            best = (i, n, net)

    if best is None:
        # Not even the smallest limit fits: serve what the affordable replicas can, at that limit.
        n = affordable
        admitted = ladder.throughput(n) / max(tokens[0], 1.0)
        why = blocked[0][2]
        return _Target(
            n,
            int(grid[0]),
            admitted,
            [
                PlanReason(knob=Knob.REPLICAS, reason=why, message=_held_message(why, n, spec)),
                PlanReason(
                    knob=Knob.ADMITTED_RATE,
                    reason="AdmissionCapped",
                    message=f"even the minimum token limit ({int(grid[0])}) needs more than {n} replicas "
                    f"for {demand + drain:.3g} req/s; admitting {admitted:.3g} req/s",
                ),
            ],
        )

    i, n, _ = best
    limit = int(grid[i])
    reasons: list[PlanReason] = []
    if n > min_replicas and n == affordable and n < rmax:
        reasons.append(
            PlanReason(knob=Knob.REPLICAS, reason="BudgetLimited", message=f"{n} replicas is all the allowance buys")
        )
    if n == min_replicas and min_replicas > 0:
        reasons.append(
            PlanReason(
                knob=Knob.REPLICAS,
                reason="MinReplicas",
                message=f"demand needs fewer, replicas.min is {min_replicas}",
            )
        )
    if i == grid.size - 1:
        reasons.append(
            PlanReason(
                knob=Knob.TOKEN_LIMIT,
                reason="MaxTokens",
                message=f"at the upper bound {limit} of the token limit",
            )
        )
    else:
        better = [(j, need, why) for j, need, why in blocked if j > i and value_per_hour[j] > value_per_hour[i]]
        if better:
            j, need, why = better[0]
            reasons.append(
                PlanReason(
                    knob=Knob.TOKEN_LIMIT,
                    reason=why,
                    message=f"a limit of {int(grid[j])} tokens needs {need} replicas: {_held_message(why, need, spec)}",
                )
            )
        else:
            j = i + 1
            gain = value_per_hour[j] - value_per_hour[i]
            need_next = ladder.replicas_for((demand + drain) * tokens[j]) or n
            cost = ladder.spend(max(need_next, min_replicas)) - ladder.spend(n)
            reasons.append(
                PlanReason(
                    knob=Knob.TOKEN_LIMIT,
                    reason="MarginalValue",
                    message=f"raising the limit to {int(grid[j])} adds ${gain:.2f}/h of value for ${cost:.2f}/h",
                )
            )
    # Slots on nodes that are paid anyway (minNodes, the rest of a node) cost nothing: fill them.
    # They are headroom for the next burst while new pods and nodes take a minute or more.
    while n < min(affordable, rmax) and ladder.spend(n + 1) <= ladder.spend(n) + _EPS:
        n += 1
    return _Target(n, limit, None, reasons)


def _held_message(why: str, replicas: int, spec: ModelBudgetSpec) -> str:
    if why == "MaxReplicas":
        return f"more than replicas.max={spec.replicas.max}"
    if why == "MaxNodes":
        return "more than the node pools hold at maxNodes"
    return f"{replicas} replicas cost more than the allowance"


def decide(obs: Observation, spec: ModelBudgetSpec, state: ControllerState, now: datetime) -> Plan:
    curve = resolve_curve(spec.curve)
    lo, hi = token_bounds(spec, curve)
    g = spec.replicas.gpus_per_replica
    # L* = v*b/c per pool: where a token's marginal value meets its marginal cost.
    grid = token_grid(
        lo,
        hi,
        tuple(spec.budget.value_of_point * curve.slope / cost_per_token(p, g) for p in spec.node_pools),
    )
    behavior = spec.behavior
    reasons: list[PlanReason] = []

    ledger = accrue(state.ledger, spend_of(obs.current_nodes, spec), now, spec.budget.ceiling.period)
    allowance = allowed_rate(spec.budget, ledger, now)
    ladder = CapacityLadder(spec)
    if ladder.base_spend > allowance.per_hour + _EPS:
        ladder = CapacityLadder(spec, honour_min_nodes=False)
        reasons.append(
            PlanReason(
                knob=Knob.NODES,
                reason="CeilingBelowMinimum",
                message=f"minNodes cost ${CapacityLadder(spec).base_spend:.2f}/h, over the {allowance.explain()}",
            )
        )
    affordable = min(spec.replicas.max, ladder.total_slots, ladder.max_affordable(allowance.per_hour))
    min_replicas = min(spec.replicas.min, affordable)
    if min_replicas < spec.replicas.min:
        reasons.append(
            PlanReason(
                knob=Knob.REPLICAS,
                reason="CeilingBelowMinimum",
                message=f"replicas.min={spec.replicas.min} costs more than the {allowance.explain()}",
            )
        )

    current = obs.current_replicas
    previous_limit = state.token_limit or obs.current_token_limit
    verdict = assess(obs, spec, now)
    profile = verdict.profile
    demand = waiting = 0.0
    admitted: float | None = None
    missing_since: datetime | None = None

    if verdict.ok:
        assert profile is not None and obs.demand.request_rate is not None
        demand, waiting = obs.demand.request_rate, obs.demand.requests_waiting or 0.0
        target = _economic_target(spec, curve, profile, demand, waiting, ladder, affordable, min_replicas, grid)
        reasons += target.reasons
        raw_replicas, limit, admitted = target.replicas, target.token_limit, target.admitted
        replicas = raw_replicas
        if replicas > current:
            cap = scale_up_cap(current, state.scale_ups, now, behavior.scale_up)
            if replicas > cap:
                reasons.append(
                    PlanReason(
                        knob=Knob.REPLICAS,
                        reason="ScaleUpLimit",
                        message=f"wants {replicas}, scale-up limited to {cap} per {behavior.scale_up.period_seconds}s",
                    )
                )
                replicas = cap
        elif replicas < current:
            held = stabilised_replicas(
                replicas,
                current,
                state.recommendations,
                now,
                behavior.scale_down.stabilization_window_seconds,
            )
            if held > replicas:
                reasons.append(
                    PlanReason(
                        knob=Knob.REPLICAS,
                        reason="ScaleDownStabilization",
                        message=f"wants {replicas}, holding {held} for the "
                        f"{behavior.scale_down.stabilization_window_seconds}s stabilisation window",
                    )
                )
                replicas = held
    else:
        missing_since = state.metrics_missing_since or now
        blind_for = (now - missing_since).total_seconds()
        replicas = raw_replicas = current
        limit = min(max(previous_limit or hi, lo), hi)
        fallback = behavior.fallback
        if blind_for >= fallback.after_seconds and fallback.action is FallbackAction.SCALE_TO:
            assert fallback.replicas is not None
            replicas = raw_replicas = min(current, fallback.replicas)
            reasons.append(
                PlanReason(
                    knob=Knob.REPLICAS,
                    reason="FallbackScaleTo",
                    message=f"metrics missing for {blind_for:.0f}s: fallback to {replicas} (never above current)",
                )
            )
        else:
            reasons.append(
                PlanReason(
                    knob=Knob.REPLICAS,
                    reason=verdict.reason,
                    message=f"holding {current} replicas and limit {limit}: {verdict.message}",
                )
            )

    # The ceiling holds whatever came before it.
    if replicas > affordable:
        why = "BudgetLimited" if affordable == ladder.max_affordable(allowance.per_hour) else "MaxReplicas"
        reasons.append(
            PlanReason(
                knob=Knob.REPLICAS,
                reason=why,
                message=f"cut from {replicas} to {affordable}: {_held_message(why, replicas, spec)}",
            )
        )
        replicas = affordable

    allocation = ladder.allocation(replicas)
    nodes = _stabilise_nodes(allocation.nodes, obs, spec, state, now, allowance, reasons)

    if verdict.ok:
        assert profile is not None
        limit = _fast_limit(
            limit,
            grid,
            profile,
            demand + waiting / behavior.queue_drain_seconds,
            ladder.throughput(min(obs.ready_replicas, replicas)),
            obs,
            replicas,
            reasons,
        )
        if previous_limit is not None and limit > previous_limit * spec.token_limits.max_step_up_factor:
            stepped = max(int(previous_limit * spec.token_limits.max_step_up_factor), lo)
            reasons.append(
                PlanReason(
                    knob=Knob.TOKEN_LIMIT,
                    reason="TokenStepUpLimit",
                    message=f"wants {limit}, rising from {previous_limit} to {stepped} this step",
                )
            )
            limit = stepped
    limit = min(max(limit, lo), hi)

    spend = spend_of(nodes, spec)
    performance = _expected_performance(
        curve, profile, limit, demand, admitted, ladder.throughput(replicas), verdict.ok
    )
    next_state = _next_state(
        state, ledger, now, current, replicas, raw_replicas, allocation.nodes, missing_since, limit, spec
    )
    return Plan(
        replicas=replicas,
        pools=[
            PoolAllocation(
                pool=p.name,
                nodes=nodes[p.name],
                replicas=allocation.replicas[p.name],
                spend_per_hour=nodes[p.name] * node_price(p),
            )
            for p in spec.node_pools
        ],
        token_limit=limit,
        admitted_requests_per_second=admitted,
        demand_requests_per_second=demand if verdict.ok else None,
        expected_spend_per_hour=spend,
        allowed_spend_per_hour=allowance.per_hour,
        expected_performance=performance,
        metrics_available=verdict.ok,
        reasons=reasons,
        decided_at=now,
        next_state=next_state,
    )


def _stabilise_nodes(
    wanted: dict[str, int],
    obs: Observation,
    spec: ModelBudgetSpec,
    state: ControllerState,
    now: datetime,
    allowance: Allowance,
    reasons: list[PlanReason],
) -> dict[str, int]:
    """Keep recently wanted nodes through the node window, as far as the allowance pays for them."""
    nodes = dict(wanted)
    window = spec.behavior.node_scale_down.stabilization_window_seconds
    for pool in spec.node_pools:
        current = obs.current_nodes.get(pool.name, 0)
        held = stabilised_nodes(pool.name, nodes[pool.name], current, state.recommendations, now, window)
        held = min(held, pool.max_nodes)
        if held > nodes[pool.name] and spend_of({**nodes, pool.name: held}, spec) <= allowance.per_hour + _EPS:
            reasons.append(
                PlanReason(
                    knob=Knob.NODES,
                    reason="NodeScaleDownStabilization",
                    message=f"pool {pool.name}: wants {nodes[pool.name]} nodes, holding {held} for {window}s",
                )
            )
            nodes[pool.name] = held
    return nodes


def _fast_limit(
    limit: int,
    grid: npt.NDArray[np.float64],
    profile: GenerationProfile,
    demand: float,
    serving_capacity: float,
    obs: Observation,
    replicas: int,
    reasons: list[PlanReason],
) -> int:
    """The largest limit, up to the target, that the replicas serving now can carry."""
    if demand * profile.mean_generated(limit) <= serving_capacity + _EPS:
        return limit
    fits = grid[(grid <= limit) & (demand * profile.mean_generated_many(grid) <= serving_capacity + _EPS)]
    lowered = int(fits[-1]) if fits.size else int(grid[0])
    reasons.append(
        PlanReason(
            knob=Knob.TOKEN_LIMIT,
            reason="CapacityCatchingUp",
            message=f"{obs.ready_replicas} of {replicas} replicas ready: limit {lowered} (not {limit}) until they are",
        )
    )
    return lowered


def _expected_performance(
    curve: LogCurve,
    profile: GenerationProfile | None,
    limit: int,
    demand: float,
    admitted: float | None,
    throughput: float,
    metrics_ok: bool,
) -> float:
    if profile is None or not metrics_ok:
        return min(max(curve.performance(limit), 0.0), 1.0)
    score = float(profile.mean_score_many(curve, np.array([float(limit)]))[0])
    if demand <= 0:
        return score
    served = demand if admitted is None else min(admitted, demand)
    served = min(served, throughput / max(profile.mean_generated(limit), 1.0))
    return score * served / demand


def _next_state(
    state: ControllerState,
    ledger: Ledger,
    now: datetime,
    current: int,
    replicas: int,
    raw_replicas: int,
    raw_nodes: dict[str, int],
    missing_since: datetime | None,
    limit: int,
    spec: ModelBudgetSpec,
) -> ControllerState:
    behavior = spec.behavior
    keep = timedelta(
        seconds=max(
            behavior.scale_down.stabilization_window_seconds,
            behavior.node_scale_down.stabilization_window_seconds,
        )
    )
    recs = [r for r in state.recommendations if now - r.at < keep]
    recs.append(Recommendation(at=now, replicas=raw_replicas, nodes=raw_nodes))
    period = timedelta(seconds=behavior.scale_up.period_seconds)
    ups = [e for e in state.scale_ups if now - e.at < period]
    if replicas > current:
        ups.append(ScaleUpEvent(at=now, added=replicas - current))
    return ControllerState(
        ledger=ledger,
        recommendations=recs,
        scale_ups=ups,
        metrics_missing_since=missing_since,
        token_limit=limit,
    )
