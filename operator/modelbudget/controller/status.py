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
from modelbudget.core.capacity import spend_of
from modelbudget.core.curve import LogCurve
from modelbudget.core.observation import MetricsVerdict, Observation
from modelbudget.core.pacing import projected_period_end

BUDGET_REASONS = ("BudgetLimited", "AdmissionCapped", "CeilingBelowMinimum")

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Wanted:
    """A condition as this reconcile sees it, before transition times are reconciled."""

    type: ConditionType
    status: Status
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Action:
    """A change the operator made to one knob."""

    knob: Knob
    target: str  # what was changed: the Deployment, a pool's name, the ConfigMap
    before: int | None
    after: int


@dataclass(frozen=True)
class EventNote:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Facts:
    """What one reconcile of a valid spec found and did."""

    spec: ModelBudgetSpec
    observation: Observation
    verdict: MetricsVerdict
    plan: Plan
    curve: LogCurve
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


def invalid_spec_conditions(message: str) -> list[Wanted]:
    return [
        Wanted(ConditionType.READY, "False", "InvalidSpec", message),
        Wanted(ConditionType.DEGRADED, "True", "InvalidSpec", message),
    ]


def _budget_condition(plan: Plan) -> Wanted:
    limited = next((r for r in plan.reasons if r.reason in BUDGET_REASONS), None)
    if limited is None:
        return Wanted(
            ConditionType.BUDGET_LIMITED,
            "False",
            "WithinBudget",
            f"planned ${plan.expected_spend_per_hour:.2f}/h of ${plan.allowed_spend_per_hour:.2f}/h",
        )
    return Wanted(ConditionType.BUDGET_LIMITED, "True", limited.reason, limited.message)


def _trouble(facts: Facts) -> tuple[str, str] | None:
    """Why the operator cannot do its job right now (the first reason wins), or ``None``."""
    if facts.target_missing is not None:
        return "TargetNotFound", facts.target_missing
    if facts.conflicts:
        return (
            "ConflictingAutoscaler",
            f"{', '.join(facts.conflicts)} also scales this Deployment; refusing to act until it is removed",
        )
    if facts.failures:
        return "ActuationFailed", "; ".join(facts.failures)
    if facts.plan.has_reason("FallbackScaleTo"):
        return "MetricsFallback", "metrics missing past behavior.fallback.afterSeconds: fallback applied"
    return None


def conditions_for(facts: Facts) -> list[Wanted]:
    verdict, plan = facts.verdict, facts.plan
    curve = facts.curve
    if curve.r_squared is None:
        fitted = Wanted(ConditionType.CURVE_FITTED, "True", "GivenInSpec", "intercept and slope from the spec")
    else:
        fitted = Wanted(ConditionType.CURVE_FITTED, "True", "Fitted", f"fitted from samples: R^2={curve.r_squared:.3f}")
    metrics = Wanted(
        ConditionType.METRICS_AVAILABLE, "True" if verdict.ok else "False", verdict.reason, verdict.message
    )
    trouble = _trouble(facts)
    degraded = (
        Wanted(ConditionType.DEGRADED, "True", *trouble)
        if trouble is not None
        else Wanted(ConditionType.DEGRADED, "False", "Healthy")
    )
    recommend = facts.spec.mode is Mode.RECOMMEND
    if trouble is not None and trouble[0] != "MetricsFallback":
        ready = Wanted(ConditionType.READY, "False", *trouble)
    elif not verdict.ok:
        ready = Wanted(
            ConditionType.READY,
            "False",
            "MetricsUnavailable",
            f"holding the current size, no scale-up: {verdict.message}",
        )
    elif recommend:
        ready = Wanted(ConditionType.READY, "True", "Recommending", "computing and reporting; changing nothing")
    else:
        ready = Wanted(ConditionType.READY, "True", "Enforcing", "")
    return [ready, metrics, fitted, _budget_condition(plan), degraded]


def build_status(previous: ModelBudgetStatus, facts: Facts, generation: int | None, now: datetime) -> ModelBudgetStatus:
    spec, obs, plan = facts.spec, facts.observation, facts.plan
    ledger = plan.next_state.ledger
    running = spend_of(obs.current_nodes, spec)
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
        )
    demand = DemandStatus(
        requests_per_second=_finite(obs.demand.request_rate),
        prompt_tokens_per_request=_finite(obs.demand.prompt_tokens_per_request),
        generated_tokens_per_request=_finite(obs.demand.generated_tokens_per_request),
        waiting_requests=_finite(obs.demand.requests_waiting),
        latency_p95_seconds=_finite(obs.demand.latency_p95_seconds),
        observed_at=obs.demand.at,
    )
    curve = facts.curve
    return ModelBudgetStatus(
        observed_generation=generation,
        conditions=merge_conditions(previous.conditions, conditions_for(facts), generation, now),
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
        controller_state=plan.next_state,
    )


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def status_document(status: ModelBudgetStatus) -> dict[str, Any]:
    """The status as it is stored: camelCase JSON, absent fields omitted."""
    doc: dict[str, Any] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return doc


# Parts of the status that move every tick without anything having changed: time passing,
# noise in the measured demand, messages that quote durations.  Left out of the fingerprint;
# the heartbeat write refreshes them.
_VOLATILE = {
    "plan": ("decidedAt", "demandRequestsPerSecond", "expectedPerformance"),
    "spend": ("periodToDate", "projectedPeriodEnd", "utilization"),
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
        view["plan"]["reasons"] = [(r.get("knob"), r.get("reason")) for r in view["plan"].get("reasons", [])]
    view["conditions"] = [{k: v for k, v in c.items() if k != "message"} for c in view.get("conditions", [])]
    state = doc.get("controllerState") or {}
    view["state"] = {k: state.get(k) for k in ("tokenLimit", "metricsMissingSince")}
    return json.dumps(_rounded(view), sort_keys=True)


def needs_write(old: Mapping[str, Any], new: Mapping[str, Any], now: datetime, heartbeat: timedelta) -> bool:
    if fingerprint(old) != fingerprint(new):
        return True
    last = (old.get("plan") or {}).get("decidedAt")
    if last is None:
        return True
    return now - datetime.fromisoformat(last) >= heartbeat


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


_FLIP_EVENTS: dict[tuple[ConditionType, Status], tuple[Literal["Normal", "Warning"], str | None]] = {
    # (condition, new status) -> (event type, event reason; None: the condition's own reason)
    (ConditionType.METRICS_AVAILABLE, "False"): ("Warning", "MetricsUnavailable"),
    (ConditionType.METRICS_AVAILABLE, "True"): ("Normal", "MetricsRecovered"),
    (ConditionType.BUDGET_LIMITED, "True"): ("Normal", "BudgetLimited"),
    (ConditionType.DEGRADED, "True"): ("Warning", None),
}


def events_for(
    previous: Sequence[Condition],
    current: Sequence[Condition],
    actions: Sequence[Action],
) -> list[EventNote]:
    """Events for what changed: conditions that flipped or changed reason, and actions taken."""
    old = {c.type: c for c in previous}
    notes = []
    for cond in current:
        before = old.get(cond.type)
        if before is not None and before.status == cond.status and before.reason == cond.reason:
            continue
        if before is None and cond.type == ConditionType.METRICS_AVAILABLE and cond.status == "True":
            continue  # the first observation working is not news
        rule = _FLIP_EVENTS.get((ConditionType(cond.type), cond.status))
        if rule is not None:
            kind, reason = rule
            notes.append(EventNote(kind, reason or cond.reason, cond.message or cond.reason))
    for a in actions:
        reason, what = {
            Knob.REPLICAS: ("Rescaled", f"Deployment {a.target} replicas"),
            Knob.NODES: ("NodePoolResized", f"node pool {a.target} nodes"),
            Knob.TOKEN_LIMIT: ("TokenLimitChanged", f"token limit ({a.target})"),
        }.get(a.knob, (a.knob.value, a.target))
        was = "unset" if a.before is None else a.before
        notes.append(EventNote("Normal", reason, f"{what}: {was} -> {a.after}"))
    return notes
