"""Status, conditions and events, computed from one reconcile's facts: pure, no kopf, no I/O.

Three rules shape this module:

* a condition's ``lastTransitionTime`` moves only when its status flips;
* the status is written only when something an owner would act on changed (``fingerprint``),
  or when the last write is ``heartbeat`` old (so period-to-date spend stays fresh);
* events are emitted on changes (a flip, a new reason, an action taken), never every tick.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from modelbudget.api.reasons import BUDGET_LIMITING, TROUBLES, Reason
from modelbudget.api.spec import Mode, ModelBudgetSpec
from modelbudget.api.status import (
    Condition,
    ConditionType,
    CurveStatus,
    DemandStatus,
    Knob,
    ModelBudgetStatus,
    Plan,
    SpendStatus,
)
from modelbudget.core.observation import Observation
from modelbudget.core.pacing import projected_period_end
from modelbudget.core.planner import Decision

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Wanted:
    """A condition as this reconcile sees it, before transition times are reconciled."""

    type: ConditionType
    status: Status
    reason: Reason
    message: str = ""


@dataclass(frozen=True)
class KnobChange:
    """A change the operator made to one knob."""

    knob: Knob
    target: str  # what was changed: the Deployment, a pool's name, the ConfigMap, the CapacityBuffer
    before: float | None  # None: unset
    after: float | None


@dataclass(frozen=True)
class EventNote:
    type: Literal["Normal", "Warning"]
    reason: Reason
    message: str


@dataclass(frozen=True)
class Facts:
    """What one reconcile of a valid spec found and did."""

    spec: ModelBudgetSpec
    observation: Observation
    decision: Decision
    conflicts: Sequence[str] = ()
    target_missing: str | None = None
    failures: Sequence[str] = ()  # actuation errors, already free of secrets


def merge_conditions(
    previous: Sequence[Condition], wanted: Sequence[Wanted], generation: int | None, now: datetime
) -> list[Condition]:
    """The new conditions, keeping ``lastTransitionTime`` where the status did not flip.

    Conditions not in ``wanted`` are kept as they were (an invalid spec only touches Ready and
    Degraded; the last known metrics verdict stays visible).
    """
    old = {c.type: c for c in previous}
    merged: dict[str, Condition] = dict(old)
    for w in wanted:
        before = old.get(w.type)
        since = before.last_transition_time if before is not None and before.status == w.status else now
        merged[w.type] = Condition(
            type=w.type,
            status=w.status,
            reason=w.reason,
            message=w.message[:4096],
            observed_generation=generation,
            last_transition_time=since,
        )
    order = [t.value for t in ConditionType]
    return sorted(merged.values(), key=lambda c: order.index(c.type) if c.type in order else len(order))


def condition_status(conditions: Sequence[Condition], kind: ConditionType) -> Status | None:
    return next((c.status for c in conditions if c.type == kind), None)


def refused_status(
    previous: ModelBudgetStatus, reason: Reason, message: str, generation: int | None, now: datetime
) -> ModelBudgetStatus:
    """A ModelBudget the operator will not act on (an invalid spec, a pool it may not use) touches
    only Ready and Degraded; the last plan and the ledger stay visible."""
    wanted = [
        Wanted(ConditionType.READY, "False", reason, message),
        Wanted(ConditionType.DEGRADED, "True", reason, message),
    ]
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "conditions": merge_conditions(previous.conditions, wanted, generation, now),
        }
    )


def budget_condition(plan: Plan) -> Wanted:
    given = {r.reason: r for r in plan.reasons}
    limited = next((given[r] for r in BUDGET_LIMITING if r in given), None)
    if limited is None:
        return Wanted(
            ConditionType.BUDGET_LIMITED,
            "False",
            Reason.WITHIN_BUDGET,
            f"planned ${plan.expected_spend_per_hour:.2f}/h of ${plan.allowed_spend_per_hour:.2f}/h",
        )
    return Wanted(ConditionType.BUDGET_LIMITED, "True", limited.reason, limited.message)


def troubles(facts: Facts) -> list[tuple[Reason, str]]:
    """Why the operator cannot do its job right now, in the precedence of ``api.reasons.TROUBLES``."""
    found: dict[Reason, str] = {}
    if facts.target_missing is not None:
        found[Reason.TARGET_NOT_FOUND] = facts.target_missing
    if facts.conflicts:
        found[Reason.CONFLICTING_AUTOSCALER] = (
            f"{', '.join(facts.conflicts)} also scales this Deployment; refusing to act until it is removed"
        )
    if facts.failures:
        found[Reason.ACTUATION_FAILED] = "; ".join(facts.failures)
    if facts.decision.plan.has_reason(Reason.FALLBACK_SCALE_TO):
        found[Reason.METRICS_FALLBACK] = "metrics missing past behavior.fallback.afterSeconds: fallback applied"
    return [(r, found[r]) for r in TROUBLES if r in found]


def problems(facts: Facts) -> list[Reason]:
    """What went wrong this tick, for the operator's error counter."""
    found: list[Reason] = [r for r, _ in troubles(facts) if r is not Reason.METRICS_FALLBACK]
    if not facts.decision.verdict.ok:
        found.append(Reason.METRICS_UNAVAILABLE)
    elif facts.observation.demand.unread:
        found.append(Reason.METRICS_PARTIAL)
    return found


def conditions_for(facts: Facts, previous: Sequence[Condition] = ()) -> list[Wanted]:
    """The conditions this reconcile sees; ``previous`` are the stored ones."""
    verdict, plan, curve = facts.decision.verdict, facts.decision.plan, facts.decision.curve
    if curve.r_squared is None:
        fitted = Wanted(ConditionType.CURVE_FITTED, "True", Reason.GIVEN_IN_SPEC, "intercept and slope from the spec")
    else:
        fitted = Wanted(
            ConditionType.CURVE_FITTED, "True", Reason.FITTED, f"fitted from samples: R^2={curve.r_squared:.3f}"
        )
    metrics = Wanted(
        ConditionType.METRICS_AVAILABLE, "True" if verdict.ok else "False", verdict.reason, verdict.message
    )
    trouble = next(iter(troubles(facts)), None)
    degraded = (
        Wanted(ConditionType.DEGRADED, "True", *trouble)
        if trouble is not None
        else Wanted(ConditionType.DEGRADED, "False", Reason.HEALTHY)
    )
    if trouble is not None and trouble[0] is not Reason.METRICS_FALLBACK:
        ready = Wanted(ConditionType.READY, "False", *trouble)
    elif not verdict.ok:
        message = f"holding the current size, no scale-up: {verdict.message}"
        ready = Wanted(ConditionType.READY, "False", Reason.METRICS_UNAVAILABLE, message)
    elif facts.spec.mode is Mode.RECOMMEND:
        ready = Wanted(ConditionType.READY, "True", Reason.RECOMMENDING, "computing and reporting; changing nothing")
    else:
        ready = Wanted(ConditionType.READY, "True", Reason.ENFORCING, "")
    wanted = [ready, metrics, fitted, budget_condition(plan), enforcement_condition(facts, previous), degraded]
    return [*wanted, prices] if (prices := prices_condition(facts)) is not None else wanted


def prices_condition(facts: Facts) -> Wanted | None:
    """Whether observed prices bill the ledger (``spend.source: OpenCost`` only; None otherwise)."""
    verdict = facts.decision.prices
    if verdict.reason is None:
        return None
    status: Status = "False" if verdict.reason is Reason.PRICES_FROM_SPEC else "True"
    return Wanted(ConditionType.PRICES_OBSERVED, status, verdict.reason, verdict.message)


def enforcement_condition(facts: Facts, previous: Sequence[Condition]) -> Wanted:
    """Whether the gates apply the published limit. While they pick up a new one (Propagating) the
    status stays what it was, so a limit change is not a flap; Unknown when they cannot be asked."""
    e, before = facts.decision.enforcement, condition_status(previous, ConditionType.TOKEN_LIMIT_ENFORCED)
    status: Status
    if e.reason is Reason.ENFORCED:
        status = "True"
    elif e.reason in (Reason.STALE, Reason.NO_GATE):
        status = "False"
    elif e.reason is Reason.PROPAGATING and before is not None:
        status = before
    else:
        status = "Unknown"
    return Wanted(ConditionType.TOKEN_LIMIT_ENFORCED, status, e.reason, e.message)


def build_status(previous: ModelBudgetStatus, facts: Facts, generation: int | None, now: datetime) -> ModelBudgetStatus:
    spec, obs, decision = facts.spec, facts.observation, facts.decision
    plan, ledger, running = decision.plan, decision.next_state.ledger, decision.running_spend
    ceiling = spec.budget.ceiling
    spend = None
    if ledger is not None:
        spend = SpendStatus(
            current_per_hour=running,
            allowed_per_hour=plan.allowed_spend_per_hour,
            ceiling=f"{ceiling.amount:g} {ceiling.currency}/{ceiling.period.value}",
            period_start=ledger.period_start,
            period_to_date=ledger.spent,
            projected_period_end=projected_period_end(ledger, running, ceiling.period, now),
            utilization=running / plan.allowed_spend_per_hour if plan.allowed_spend_per_hour > 0 else 0.0,
            source=decision.prices.source,
            period_to_date_at_spec_prices=ledger.spent_at_spec_prices,
            pools=list(decision.prices.pools) or None,
        )
    demand = DemandStatus(
        source=obs.demand.demand_source if obs.demand.at is not None else None,
        requests_per_second=_finite(obs.demand.request_rate),
        prompt_tokens_per_request=_finite(obs.demand.prompt_tokens_per_request),
        generated_tokens_per_request=_finite(obs.demand.generated_tokens_per_request),
        waiting_requests=_finite(obs.demand.requests_waiting),
        latency_p95_seconds=_finite(obs.demand.latency_p95_seconds),
        time_to_first_token_p95_seconds=_finite(obs.demand.time_to_first_token_p95_seconds),
        time_per_output_token_p95_seconds=_finite(obs.demand.time_per_output_token_p95_seconds),
        observed_at=obs.demand.at,
    )
    curve = decision.curve
    conditions = merge_conditions(previous.conditions, conditions_for(facts, previous.conditions), generation, now)
    if decision.prices.reason is None:  # spend.source Spec: no condition about observed prices
        conditions = [c for c in conditions if c.type != ConditionType.PRICES_OBSERVED]
    return ModelBudgetStatus(
        observed_generation=generation,
        conditions=conditions,
        spend=spend,
        demand=demand,
        plan=plan,
        curve=CurveStatus(
            intercept=curve.intercept,
            slope=curve.slope,
            min_tokens=curve.min_tokens,
            max_tokens=curve.max_tokens,
            r_squared=curve.r_squared,
            source="Spec" if curve.r_squared is None else "Fitted",
        ),
        controller_state=decision.next_state,
    )


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def status_document(status: ModelBudgetStatus) -> dict[str, Any]:
    """The status as it is stored: camelCase JSON, absent fields omitted."""
    doc: dict[str, Any] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return doc


# Parts of the status that move every tick without anything having changed: time passing,
# noise in the measured demand (and the forecast made from it), messages that quote durations.
# Left out of the fingerprint; the heartbeat write refreshes them.  The ledger needs no write to
# stay safe: it resumes from the last one written and bills the time since (core/pacing.py).
_VOLATILE = {
    "plan": ("decidedAt", "demandRequestsPerSecond", "expectedPerformance", "forecast"),
    "spend": ("periodToDate", "projectedPeriodEnd", "utilization", "periodToDateAtSpecPrices"),
}


def _rounded(value: Any) -> Any:
    # Ints too: the apiserver stores 8.0 as 8, and the next read must still compare equal.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(f"{value:.3g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def fingerprint(doc: Mapping[str, Any]) -> str:
    """What an owner would act on, as a comparable string."""
    view = {k: v for k, v in doc.items() if k not in ("demand", "controllerState")}
    for section, keys in _VOLATILE.items():
        if isinstance(view.get(section), dict):
            view[section] = {k: v for k, v in view[section].items() if k not in keys}
    if isinstance(view.get("plan"), dict):
        # The reasons explain the plan; the plan's own fields say what is acted on. With the plan
        # unchanged, which constraint stops the limit one step higher (MarginalValue, MaxTokens,
        # LatencyBound) flips with the noise in measured prompt lengths and latencies: at N = 1,000
        # on one model's series that rewrote a fifth of the statuses every tick. They are written
        # with the plan's next change, a condition's, or the heartbeat.
        view["plan"] = {k: v for k, v in view["plan"].items() if k != "reasons"}
    view["conditions"] = [{k: v for k, v in c.items() if k != "message"} for c in view.get("conditions", [])]
    state = doc.get("controllerState") or {}
    view["state"] = {k: state.get(k) for k in ("tokenLimit", "metricsMissingSince")}
    return json.dumps(_rounded(view), sort_keys=True)


def status_patch(
    old_doc: Mapping[str, Any], new: ModelBudgetStatus, now: datetime, heartbeat: timedelta
) -> dict[str, Any] | None:
    """The merge patch that writes ``new``, or ``None`` when nothing worth a write changed."""
    new_doc = status_document(new)
    if not needs_write(old_doc, new_doc, now, heartbeat):
        return None
    return merge_patch(old_doc, new_doc) or None


def needs_write(old: Mapping[str, Any], new: Mapping[str, Any], now: datetime, heartbeat: timedelta) -> bool:
    if fingerprint(old) != fingerprint(new):
        return True
    last = (old.get("plan") or {}).get("decidedAt")
    if last is None:
        return True
    return now - datetime.fromisoformat(last) >= heartbeat


@dataclass(frozen=True)
class Written:
    """The status document last written, and the object's resourceVersion it was written over."""

    over_version: str | None
    doc: Mapping[str, Any]


def status_seen(body_status: Mapping[str, Any], version: str | None, written: Written | None) -> Mapping[str, Any]:
    """The status to compare a new one with.  Under load the watch event of our own last write can
    arrive after the next tick: the object then still has the resourceVersion it had when we wrote,
    and its status is older than what we wrote.  Compared with that stale status, every slow tick
    would write the same status again."""
    ahead = ahead_of_watch(written, version)
    return body_status if ahead is None else ahead.doc


def ahead_of_watch(written: Written | None, version: str | None) -> Written | None:
    """Our last write while the object the watch shows is still the one it was written over, else
    None: once the watch has shown a newer object (the write, or anything after it), that copy of
    the status is never read again, and a thousand ModelBudgets' copies are not kept for nothing."""
    if written is not None and version is not None and written.over_version == version:
        return written
    return None


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning ``old`` into ``new`` (removed keys become ``None``)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    return patch


_FLIP_EVENTS: dict[tuple[ConditionType, Status], tuple[Literal["Normal", "Warning"], Reason | None]] = {
    # (condition, new status) -> (event type, event reason; None: the condition's own reason)
    (ConditionType.METRICS_AVAILABLE, "False"): ("Warning", Reason.METRICS_UNAVAILABLE),
    (ConditionType.METRICS_AVAILABLE, "True"): ("Normal", Reason.METRICS_RECOVERED),
    (ConditionType.BUDGET_LIMITED, "True"): ("Normal", Reason.BUDGET_LIMITED),
    (ConditionType.TOKEN_LIMIT_ENFORCED, "False"): ("Warning", None),
    (ConditionType.TOKEN_LIMIT_ENFORCED, "True"): ("Normal", Reason.ENFORCED),
    (ConditionType.DEGRADED, "True"): ("Warning", None),
    (ConditionType.PRICES_OBSERVED, "False"): ("Warning", None),
    (ConditionType.PRICES_OBSERVED, "True"): ("Normal", None),
}
# Reasons whose Event is a Warning whatever the condition's status: the condition still holds, but
# something needs an owner's eye.
_WARNING_REASONS = frozenset({Reason.PRICE_MISMATCH})


def events_for(
    previous: Sequence[Condition],
    current: Sequence[Condition],
    actions: Sequence[KnobChange],
) -> list[EventNote]:
    """Events for what changed: conditions that flipped or changed reason, and actions taken."""
    old = {c.type: c for c in previous}
    notes = []
    for cond in current:
        before = old.get(cond.type)
        if before is not None and before.status == cond.status and before.reason == cond.reason:
            continue
        if before is None and cond.reason in (Reason.METRICS_OK, Reason.PRICES_FROM_OPEN_COST):
            continue  # the first observation working is not news
        rule = _FLIP_EVENTS.get((ConditionType(cond.type), cond.status))
        if rule is not None:
            kind, reason = rule
            kind = "Warning" if cond.reason in _WARNING_REASONS else kind
            notes.append(EventNote(kind, reason or Reason(cond.reason), cond.message or cond.reason))
    for a in actions:
        reason, what = {
            Knob.REPLICAS: (Reason.RESCALED, f"Deployment {a.target} replicas"),
            Knob.NODES: (Reason.NODE_POOL_RESIZED, f"node pool {a.target} nodes"),
            Knob.TOKEN_LIMIT: (Reason.TOKEN_LIMIT_CHANGED, f"token limit ({a.target})"),
            Knob.ADMITTED_RATE: (Reason.ADMISSION_CHANGED, f"admitted req/s per pod ({a.target})"),
            Knob.CAPACITY_BUFFER: (Reason.CAPACITY_BUFFER_RESIZED, f"CapacityBuffer {a.target} replicas"),
        }[a.knob]
        was = "unset" if a.before is None else f"{a.before:g}"
        now = "unset" if a.after is None else f"{a.after:g}"
        notes.append(EventNote("Normal", reason, f"{what}: {was} -> {now}"))
    return notes
