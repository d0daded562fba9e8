"""``decide_variants``: one budget over several model variants, each a single-Deployment spec.

A workload may be served by several variants of a model (say a 70B and an 8B), each with its own
curve on one performance scale, its own pools, throughput, replica bounds and ``gpusPerReplica``:
each is a complete ``ResolvedSpec``.  They share one ceiling and one ledger.  Per decision this
chooses each variant's traffic share and plans each variant with the single-Deployment planner
(``core.planner.decide``, every stage and safety rule of it) at its share of the demand and its
part of the allowance:

1. **The books, once.**  The ledger accrues what all variants' nodes ran; the allowance is the
   shared budget's (``accrue``, ``allowed_rate``).
2. **Variants whose metrics cannot be trusted** are planned first: ``decide`` holds or falls back
   (never scales up), and their traffic share stays what was published for them -- never more.
   What they spend comes off the allowance the others share.
3. **The split.**  The demand the trusted variants observed, summed, is split between them on a
   grid of shares (``SHARE_STEPS``).  Each (variant, share) is planned at the whole allowance left;
   where a split's plans together cost more than that, the allowance is split too -- in proportion
   to what each plan wanted, or one variant's want first and the rest to the others -- and the
   variants planned again within their parts.  Each split is worth the sum of the variants'
   economic targets' net values (``valuePerPoint * 3600`` times the score of the requests served
   in time, less the spend: the single planner's own measure, at the replicas the target wants
   rather than those ready now); the best is kept.  The split published last is kept unless
   another is better by more than ``SPLIT_HOLD`` of the value: each change rewrites routes and
   moves replicas.
4. **The ceiling over the sum**, last: each plan is within its part and the parts sum to the
   allowance; should the plans together still cost more, every variant is planned again within a
   part in proportion to its plan's spend.

With one variant this is ``decide`` itself: its share is 100, its demand its own, its allowance the
whole one, and the same ledger.

Left out (simple and correct first): variants do not share nodes.  Each variant's replicas go on
its own pools' nodes, cheapest per token first, its nodes already paid for (``minNodes``) first;
two variants naming one pool are billed as if each had its own nodes there (an over-count: the
ceiling still holds), so a node half used by one variant is not filled by the other.  The forecast
is made from the whole demand's history (kept in each variant's state) and scaled by its share.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from modelbudget.api.reasons import Reason
from modelbudget.api.spec import Budget, PriceSource
from modelbudget.api.status import ControllerState, Ledger, PlanReason
from modelbudget.core.observation import ABSURD_REQUESTS_PER_SECOND, Observation, assess
from modelbudget.core.pacing import Allowance, accrue, allowed_rate
from modelbudget.core.planner import Decision, ResolvedSpec, Share, decide
from modelbudget.core.prices import assess_prices

# Shares tried per variant: 0, 10, ..., 100 percent for two variants; coarser with more (the
# number of splits grows as steps ** (variants - 1), and each is a plan per variant).
SHARE_STEPS = {1: 1, 2: 10, 3: 5}
SHARE_STEPS_MORE = 4
# A new split must beat the one published by this fraction of the value (or $0.01/h).
SPLIT_HOLD = 0.01
_EPS = 1e-6
_MESSAGE_MAX = 1024

_Replan = Callable[[str, float], Decision]  # a variant planned again within a part of the allowance
_Plan = Callable[[str, Observation, float, Share | None], Decision]


@dataclass(frozen=True)
class Variant:
    name: str
    resolved: ResolvedSpec


@dataclass(frozen=True)
class VariantsState:
    """What one decision hands the next: the shared ledger, each variant's planner state and the
    shares published (percent; None before the first decision)."""

    ledger: Ledger | None = None
    states: Mapping[str, ControllerState] = field(default_factory=dict)
    shares: Mapping[str, int] | None = None
    targets: Mapping[str, int] | None = None  # the split aimed at (shares follow as replicas get ready)
    challenged_since: datetime | None = None  # since when a better split than the one aimed at is found


@dataclass(frozen=True)
class SplitReason:
    """Why the split is what it is; ``variant`` names the variant it is about (None: all)."""

    variant: str | None
    reason: Reason
    message: str


@dataclass(frozen=True)
class VariantsDecision:
    decisions: Mapping[str, Decision]  # per variant, in the variants' order
    shares: Mapping[str, int]  # percent of the traffic per variant, summing to 100
    next_state: VariantsState
    ledger: Ledger
    allowance: Allowance
    running_spend: float  # $/h of all variants' nodes running now
    value_per_hour: float  # the split's net value as step 3 reckons it
    split_reasons: tuple[SplitReason, ...]

    @property
    def targets(self) -> Mapping[str, int]:
        """The split aimed at; ``shares`` follow it as the variants' replicas get ready."""
        assert self.next_state.targets is not None
        return self.next_state.targets

    @property
    def expected_spend_per_hour(self) -> float:
        return math.fsum(d.plan.expected_spend_per_hour for d in self.decisions.values())

    @property
    def plan_reasons(self) -> list[PlanReason]:
        """Every variant's plan reasons, each message naming its variant."""
        return [
            PlanReason(knob=r.knob, reason=r.reason, message=_named(name, r.message))
            for name, decision in self.decisions.items()
            for r in decision.plan.reasons
        ]

    def explain(self) -> list[str]:
        """The split's reasons and then every plan reason, each naming its variant."""
        return [f"{r.reason}: {_named(r.variant, r.message)}" for r in self.split_reasons] + [
            f"{r.knob}/{r.reason}: {r.message}" for r in self.plan_reasons
        ]


def _named(variant: str | None, message: str) -> str:
    text = message if variant is None else f"variant {variant}: {message}"
    return text[:_MESSAGE_MAX]


def shared_budget(variants: Sequence[Variant]) -> Budget:
    """The one budget: every variant's spec must carry the same."""
    budget = variants[0].resolved.spec.budget
    for v in variants[1:]:
        if v.resolved.spec.budget != budget:
            raise ValueError(f"variant {v.name} has a budget of its own; the variants share one")
    return budget


def decide_variants(
    variants: Sequence[Variant],
    observations: Mapping[str, Observation],
    state: VariantsState,
    now: datetime,
) -> VariantsDecision:
    if not variants:
        raise ValueError("no variants to plan")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    budget = shared_budget(variants)
    by_name = {v.name: v for v in variants}

    # 1. The books, once, over every variant's running nodes.
    running, at_spec = 0.0, True
    for v in variants:
        prices = assess_prices(observations[v.name].prices, observations[v.name].current_nodes, v.resolved.spec, now)
        running += prices.running_per_hour
        at_spec = at_spec and prices.source is PriceSource.SPEC
    ledger = accrue(state.ledger, running, now, budget.ceiling.period, at_spec)
    allowance = allowed_rate(budget, ledger, now)

    def plan(name: str, obs: Observation, per_hour: float, share: Share | None = None) -> Decision:
        part = replace(allowance, per_hour=max(per_hour, 0.0))
        own = state.states.get(name, ControllerState())
        return decide(obs, by_name[name].resolved, own, now, (ledger, part), share)

    previous = dict(state.shares) if state.shares is not None else even_shares(names)
    trusted = [n for n in names if assess(observations[n], by_name[n].resolved.spec, now).ok]
    untrusted = [n for n in names if n not in trusted]
    reasons: list[SplitReason] = []

    # 2. Variants whose metrics cannot be trusted: planned first, their share held.
    held: dict[str, Decision] = {n: plan(n, observations[n], allowance.per_hour) for n in untrusted}
    held = _within(held, allowance.per_hour, lambda n, a: plan(n, observations[n], a))
    shares = {n: previous.get(n, 0) for n in untrusted}
    for n in untrusted:
        message = f"metrics not trusted: its traffic share stays at the {shares[n]}% published, never more"
        reasons.append(SplitReason(n, held[n].verdict.reason, message))
    left = allowance.per_hour - math.fsum(d.plan.expected_spend_per_hour for d in held.values())
    room = 100 - sum(shares.values())

    # 3. The split between the trusted variants.
    value, chosen, planned, challenged = 0.0, dict(held), dict(observations), None
    shared: dict[str, Share | None] = {}
    target_shares = dict(shares)
    if trusted:
        drains = {n: by_name[n].resolved.spec.behavior.queue_drain_seconds for n in trusted}
        split = _Split(observations, trusted, drains, room, budget.value_of_point, plan)
        aimed = None if state.targets is None else {n: state.targets.get(n, 0) for n in trusted}
        window = max(by_name[n].resolved.spec.behavior.scale_down.stabilization_window_seconds for n in trusted)
        value, targets, plans, challenged = split.best(left, aimed, state.challenged_since, now, window, reasons)
        fractions = _carried(split, targets, plans, {n: by_name[n].resolved for n in trusted}, reasons)
        if fractions != targets:
            # Each variant sized for the larger of the two: the one handing traffic over keeps what
            # serves it until the other's replicas are ready to take it.
            sized = {n: max(fractions[n], targets[n]) for n in trusted}
            plans = split.plans_for(sized, left)
        else:
            sized = fractions
        planned.update({n: split.observation(n, sized[n]) for n in trusted})
        shared.update({n: split.share(sized[n]) for n in trusted})
        chosen.update(plans)
        shares.update(_percent(fractions, room))
        target_shares.update(_percent(targets, room))

    # 4. The ceiling over the sum, last.
    combined = _within(chosen, allowance.per_hour, lambda n, a: plan(n, planned[n], a, shared.get(n)))
    if combined is not chosen:
        total = math.fsum(d.plan.expected_spend_per_hour for d in chosen.values())
        message = (
            f"the plans together cost ${total:.2f}/h, over the {allowance.explain()}: "
            "each planned again within its part"
        )
        reasons.append(SplitReason(None, Reason.BUDGET_LIMITED, message))
    decisions = {n: combined[n] for n in names}
    return VariantsDecision(
        decisions=decisions,
        shares={n: shares[n] for n in names},
        next_state=VariantsState(
            ledger=ledger,
            states={n: d.next_state for n, d in decisions.items()},
            shares={n: shares[n] for n in names},
            targets={n: target_shares[n] for n in names},
            challenged_since=challenged,
        ),
        ledger=ledger,
        allowance=allowance,
        running_spend=running,
        value_per_hour=value,
        split_reasons=tuple(reasons),
    )


def even_shares(names: Sequence[str]) -> dict[str, int]:
    """Before any split is published: an even one (the router's own is not known); whole percents,
    the first names taking the spare points."""
    return _percent({n: 1.0 / len(names) for n in names}, 100)


def _percent(fractions: Mapping[str, float], total: int) -> dict[str, int]:
    """Whole percents summing exactly to ``total``: the largest remainders get the spare points."""
    exact = {n: f * total for n, f in fractions.items()}
    out = {n: math.floor(x + 1e-9) for n, x in exact.items()}
    spare = total - sum(out.values())
    for n in sorted(exact, key=lambda n: out[n] - exact[n])[: max(spare, 0)]:
        out[n] += 1
    return out


def _within(decisions: dict[str, Decision], allowance: float, again: _Replan) -> dict[str, Decision]:
    """The plans themselves when together they cost no more than ``allowance``; else each planned
    again within a part in proportion to what its plan cost (the parts sum to ``allowance``)."""
    spends = {n: d.plan.expected_spend_per_hour for n, d in decisions.items()}
    total = math.fsum(spends.values())
    if total <= allowance + _EPS:
        return decisions
    return {n: again(n, allowance * spends[n] / total) for n in decisions}


class _Split:
    """The search over the trusted variants' shares (``fractions``: of the traffic they share)."""

    def __init__(
        self,
        observations: Mapping[str, Observation],
        trusted: Sequence[str],
        drains: Mapping[str, float],
        room: int,
        value_of_point: float,
        plan: _Plan,
    ) -> None:
        self.observations, self.trusted, self.room = observations, list(trusted), room
        self.value_of_point, self.plan = value_of_point, plan
        # Requests waiting count as demand (drained within ``queueDrainSeconds``, as ``decide`` takes
        # them): after a cold start nothing has completed yet, and a split must still serve them.
        self.queues = {n: _queued(observations[n], drains[n]) for n in trusted}
        self.arriving = math.fsum(observations[n].demand.request_rate or 0.0 for n in trusted)
        self.demand = self.arriving + math.fsum(self.queues.values())
        # Requests reach the variants by weight, not by content: the generation lengths one variant
        # saw are what another would get.  A variant that served nothing borrows the busiest one's.
        seen = [n for n in trusted if _knows_lengths(observations[n])]
        self.reference = max(seen, key=lambda n: observations[n].demand.request_rate or 0.0) if seen else None
        self.cache: dict[tuple[str, float, float], Decision] = {}

    def observation(self, name: str, fraction: float) -> Observation:
        """The variant's observation with its share of the demand arriving (its own queue is its
        own: ``decide`` adds it).  One trusted variant has all of it: its observation as it is."""
        obs = self.observations[name]
        if len(self.trusted) == 1:
            return obs
        # Within what ``assess`` believes: a queue it takes (however long) must not make a rate it rejects.
        rate = min(max(self.demand * fraction - self.queues[name], 0.0), ABSURD_REQUESTS_PER_SECOND)
        demand = replace(obs.demand, request_rate=rate)
        ref = self.reference
        if ref is not None and ref != name and not _knows_lengths(obs):
            theirs = self.observations[ref].demand
            demand = replace(
                demand,
                generation=theirs.generation,
                generated_tokens_per_request=theirs.generated_tokens_per_request,
                prompt_tokens_per_request=theirs.prompt_tokens_per_request
                if demand.prompt_tokens_per_request is None
                else demand.prompt_tokens_per_request,
            )
        return replace(obs, demand=demand)

    def share(self, fraction: float) -> Share | None:
        """What the forecast reads: the whole demand's history (one trusted variant: its own)."""
        return None if len(self.trusted) == 1 else Share(self.arriving, fraction)

    def _decide(self, name: str, fraction: float, per_hour: float) -> Decision:
        key = (name, fraction, round(per_hour, 6))
        if key not in self.cache:
            self.cache[key] = self.plan(name, self.observation(name, fraction), per_hour, self.share(fraction))
        return self.cache[key]

    def _value(self, fractions: Mapping[str, float], plans: Mapping[str, Decision]) -> float:
        """The economic targets' net values: what the split is worth once the replicas it wants
        serve (a split is kept for many decisions; the catching up of one is not its worth).
        Where not even the smallest limit fits, the plan's own: the admitted requests' score."""
        per_request = self.value_of_point * 3600.0

        def net(name: str, d: Decision) -> float:
            if d.target_net_per_hour is not None:
                return d.target_net_per_hour
            served = per_request * self.demand * fractions[name] * d.plan.expected_performance
            return served - d.plan.expected_spend_per_hour

        return math.fsum(net(n, d) for n, d in plans.items())

    def _splits(self) -> Iterator[dict[str, float]]:
        n = len(self.trusted)
        steps = SHARE_STEPS.get(n, SHARE_STEPS_MORE)
        for parts in itertools.product(range(steps + 1), repeat=n - 1):
            last = steps - sum(parts)
            if last >= 0:
                yield dict(zip(self.trusted, [p / steps for p in (*parts, last)], strict=True))

    def plans_for(self, fractions: Mapping[str, float], left: float) -> dict[str, Decision]:
        return self._best_for(fractions, left)[1]

    def _best_for(self, fractions: Mapping[str, float], left: float) -> tuple[float, dict[str, Decision]]:
        """The best plans for one split within ``left`` $/h together."""
        wants = {n: self._decide(n, f, left) for n, f in fractions.items()}
        spend = {n: d.plan.expected_spend_per_hour for n, d in wants.items()}
        if math.fsum(spend.values()) <= left + _EPS:
            return self._value(fractions, wants), wants
        total = math.fsum(spend.values())
        parts = [{n: left * s / total for n, s in spend.items()}]  # in proportion to what each wanted
        for first in fractions:  # one variant's want first, the rest to the others in proportion
            mine = min(spend[first], left)
            others = total - spend[first]
            parts.append(
                {n: mine if n == first else (left - mine) * (spend[n] / others if others > 0 else 0.0) for n in spend}
            )
        best: tuple[float, dict[str, Decision]] | None = None
        for part in parts:
            plans = {n: self._decide(n, fractions[n], part[n]) for n in fractions}
            if math.fsum(d.plan.expected_spend_per_hour for d in plans.values()) > left + _EPS:
                continue
            value = self._value(fractions, plans)
            if best is None or value > best[0] + _EPS:
                best = (value, plans)
        if best is None:  # none within (no part should do that): the proportional parts, cut last
            plans = {n: self._decide(n, fractions[n], parts[0][n]) for n in fractions}
            return self._value(fractions, plans), plans
        return best

    def best(
        self,
        left: float,
        aimed: Mapping[str, int] | None,
        challenged_since: datetime | None,
        now: datetime,
        window: float,
        reasons: list[SplitReason],
    ) -> tuple[float, dict[str, float], dict[str, Decision], datetime | None]:
        """The best split, and since when a better one than the split aimed at has been found.

        The split aimed at is kept while it is within ``SPLIT_HOLD`` of the best, and while a better
        one has been better for less than ``window`` seconds (the scale-down stabilisation window):
        each move of the split moves replicas both ways, and one made on a few minutes of noise is
        paid in replicas started for nothing and requests queued on replicas that are not ready."""
        found: list[tuple[float, dict[str, float], dict[str, Decision]]] = []
        for fractions in self._splits():
            value, plans = self._best_for(fractions, left)
            found.append((value, fractions, plans))
        top = max(found, key=lambda f: f[0])
        same = [f for f in found if aimed is not None and _percent(f[1], self.room) == dict(aimed)]
        if same and same[0] is not top:
            kept = same[0]
            margin = max(SPLIT_HOLD * abs(top[0]), 0.01)
            if kept[0] >= top[0] - margin:
                message = (
                    f"keeping the split aimed at: ${kept[0]:.2f}/h of net value, within {SPLIT_HOLD:.0%} "
                    f"of the best (${top[0]:.2f}/h)"
                )
                reasons.append(SplitReason(None, Reason.MARGINAL_VALUE, message))
                return (*kept, None)
            since = challenged_since or now
            if kept[0] > 0 and (now - since).total_seconds() < window:
                message = (
                    f"keeping the split aimed at (${kept[0]:.2f}/h) for the {window:g}s stabilisation window: "
                    f"a better one (${top[0]:.2f}/h) since {since.isoformat()}"
                )
                reasons.append(SplitReason(None, Reason.SCALE_DOWN_STABILIZATION, message))
                return (*kept, since)
        if len(self.trusted) > 1:
            terms = ", ".join(
                f"{n} {_percent(top[1], self.room)[n]}% (limit {d.plan.token_limit}, {d.plan.replicas} replicas, "
                f"${d.plan.expected_spend_per_hour:.2f}/h)"
                for n, d in top[2].items()
            )
            message = (
                f"split of {self.demand:.3g} req/s for the best net value, ${top[0]:.2f}/h "
                f"of {len(found)} splits tried: {terms}"
            )
            reasons.append(SplitReason(None, Reason.MARGINAL_VALUE, message))
        return (*top, None)


def _carried(
    split: _Split,
    targets: Mapping[str, float],
    plans: Mapping[str, Decision],
    resolved: Mapping[str, ResolvedSpec],
    reasons: list[SplitReason],
) -> dict[str, float]:
    """The shares published now: the split aimed at, but no variant gets more traffic than its
    ready replicas carry at its target's limit -- traffic moves as fast as replicas come up, as
    the token limit drops to what the replicas serving now carry.  What they cannot carry stays
    with the variants whose ready replicas have room, as far as they have it, and the rest with
    those that have ready replicas at all."""
    if split.demand <= 0 or len(targets) == 1:
        return dict(targets)
    carry = {}
    for n, d in plans.items():
        profile = d.verdict.profile
        limit = d.target_limit or d.plan.token_limit
        per_request = max(profile.mean_generated(limit), 1.0) if profile is not None else 1.0
        serving = resolved[n].ladder.throughput(split.observations[n].ready_replicas)
        carry[n] = serving / per_request / split.demand
    out = {n: min(f, carry[n]) for n, f in targets.items()}
    short = 1.0 - math.fsum(out.values())
    if short <= _EPS:
        return dict(targets)
    room = {n: max(carry[n] - out[n], 0.0) for n in out}
    spare = math.fsum(room.values())
    moved = min(short, spare)
    for n in out:
        out[n] += moved * room[n] / spare if spare > 0 else 0.0
    # Beyond what the ready replicas carry: to those that have ready replicas, by what they carry
    # (a queue on replicas serving drains; one on a variant with none ready waits for a node).
    rest, carrying = short - moved, math.fsum(carry.values())
    for n in out:
        out[n] += rest * (carry[n] / carrying if carrying > 0 else targets[n])
    for n in out:
        if out[n] < targets[n] - 0.005:
            message = (
                f"aiming at {targets[n]:.0%} of the traffic, {out[n]:.0%} until its replicas are ready "
                f"({split.observations[n].ready_replicas} ready carry {carry[n]:.0%})"
            )
            reasons.append(SplitReason(n, Reason.CAPACITY_CATCHING_UP, message))
    return out


def _queued(obs: Observation, drain_seconds: float) -> float:
    """Requests/s of the queue drained in ``drain_seconds`` (what ``Context.demand`` adds)."""
    waiting = obs.demand.requests_waiting or 0.0
    return waiting / drain_seconds if math.isfinite(waiting) and waiting > 0 else 0.0


def _knows_lengths(obs: Observation) -> bool:
    seen = obs.demand
    return (seen.request_rate or 0.0) > 0 and (
        seen.generation is not None
        or (seen.generated_tokens_per_request is not None and math.isfinite(seen.generated_tokens_per_request))
    )
