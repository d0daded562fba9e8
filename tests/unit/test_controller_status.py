"""The pure status logic: condition transitions, when to write, merge patches, which events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from modelbudget.api import ControllerState
from modelbudget.api.reasons import Reason
from modelbudget.api.status import Condition, ConditionType, Knob, ModelBudgetStatus, Plan, PlanReason
from modelbudget.controller import status as st
from tests.builders import NOW, decide_for, make_spec, observe
from tests.unit.fakes import as_the_apiserver_stores_it

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def cond(type_: ConditionType, status: st.Status, reason: str, at: datetime = T0) -> Condition:
    return Condition(type=type_, status=status, reason=reason, message="", last_transition_time=at)


def test_transition_time_moves_only_when_the_status_flips() -> None:
    before = [cond(ConditionType.METRICS_AVAILABLE, "True", "MetricsOK")]
    later = T0 + timedelta(minutes=5)
    same = st.merge_conditions(
        before, [st.Wanted(ConditionType.METRICS_AVAILABLE, "True", "MetricsOK", "new")], 3, later
    )
    assert same[0].last_transition_time == T0
    assert same[0].message == "new" and same[0].observed_generation == 3
    flipped = st.merge_conditions(
        before, [st.Wanted(ConditionType.METRICS_AVAILABLE, "False", "MetricsStale")], 3, later
    )
    assert flipped[0].last_transition_time == later


def test_reason_change_without_flip_keeps_the_transition_time() -> None:
    before = [cond(ConditionType.METRICS_AVAILABLE, "False", "MetricsStale")]
    after = st.merge_conditions(
        before,
        [st.Wanted(ConditionType.METRICS_AVAILABLE, "False", "MetricsUnreachable")],
        1,
        T0 + timedelta(minutes=1),
    )
    assert after[0].reason == "MetricsUnreachable"
    assert after[0].last_transition_time == T0


def test_conditions_not_mentioned_are_kept_and_order_is_stable() -> None:
    before = [cond(ConditionType.DEGRADED, "False", "Healthy"), cond(ConditionType.METRICS_AVAILABLE, "True", "OK")]
    after = st.refused_status(ModelBudgetStatus(conditions=before), Reason.INVALID_SPEC, "bad", 2, T0).conditions
    assert [c.type for c in after] == ["Ready", "MetricsAvailable", "Degraded"]
    assert after[0].reason == "InvalidSpec" and after[2].status == "True"


def doc(replicas: int, decided: datetime, spent: float = 1.0, rps: float = 3.0) -> dict:
    return {
        "plan": {
            "replicas": replicas,
            "decidedAt": decided.isoformat(),
            "demandRequestsPerSecond": rps,
            "reasons": [{"knob": "Replicas", "reason": "BudgetLimited", "message": f"{rps} req/s"}],
        },
        "spend": {"currentPerHour": 8.0, "periodToDate": spent},
        "demand": {"requestsPerSecond": rps},
        "controllerState": {"ledger": {"spent": spent}, "tokenLimit": 512},
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Enforcing",
                "message": f"{rps}",
                "lastTransitionTime": T0.isoformat(),
            }
        ],
    }


def test_time_passing_and_demand_noise_are_not_worth_a_write() -> None:
    old = doc(3, T0)
    new = doc(3, T0 + timedelta(seconds=15), spent=1.2, rps=3.3)
    assert not st.needs_write(old, new, T0 + timedelta(seconds=15), timedelta(seconds=60))


def test_an_unchanged_plan_whose_explanation_flips_is_not_worth_a_write() -> None:
    """Which constraint stops the limit one grid step higher flips with measurement noise while
    the plan stays; bench/scale.py saw it rewrite 117 statuses a tick at N = 1,000."""
    old, new = doc(3, T0), doc(3, T0 + timedelta(seconds=15))
    new["plan"]["reasons"] = [{"knob": "TokenLimit", "reason": "LatencyBound", "message": "a limit of 1024 needs 2"}]
    assert not st.needs_write(old, new, T0 + timedelta(seconds=15), timedelta(seconds=60))
    assert st.needs_write(old, new, T0 + timedelta(seconds=61), timedelta(seconds=60))  # the heartbeat carries it


def test_whole_numbers_read_back_as_ints_are_not_a_change() -> None:
    new = doc(3, T0)
    assert not st.needs_write(as_the_apiserver_stores_it(new), new, T0 + timedelta(seconds=15), timedelta(seconds=60))


def test_a_changed_knob_is_written_at_once() -> None:
    assert st.needs_write(doc(3, T0), doc(4, T0), T0 + timedelta(seconds=15), timedelta(seconds=60))


def test_the_heartbeat_refreshes_an_unchanged_status() -> None:
    assert st.needs_write(doc(3, T0), doc(3, T0), T0 + timedelta(seconds=61), timedelta(seconds=60))


def test_first_status_is_always_written() -> None:
    assert st.needs_write({}, doc(3, T0), T0, timedelta(seconds=60))


def test_a_status_written_but_not_yet_seen_is_not_written_again() -> None:
    """At N = 1000 the watch event of a status write can come after the next tick (bench/scale.py
    measured about 11 repeated writes a tick): the object still has the version we wrote over."""
    first = doc(3, T0)
    written = st.Written(over_version="41", doc=first)
    seen = st.status_seen({}, "41", written)  # the body has not caught up: still no status
    assert seen == first
    assert not st.needs_write(seen, doc(3, T0), T0 + timedelta(seconds=6), timedelta(seconds=60))
    # Once the body moved on (our write landed, or someone else wrote), the body is the truth: a
    # concurrent writer's change is compared with, and overwritten if it differs from the plan.
    other = doc(7, T0)
    assert st.status_seen(other, "42", written) == other
    assert st.needs_write(
        st.status_seen(other, "42", written), first, T0 + timedelta(seconds=15), timedelta(seconds=60)
    )
    assert st.status_seen(other, "42", None) == other
    assert st.status_seen(other, None, written) == other  # no version: never trust memory over the object
    # So the copy is kept only while the object is the one it was written over.
    assert st.ahead_of_watch(written, "41") is written
    assert st.ahead_of_watch(written, "42") is None
    assert st.ahead_of_watch(written, None) is None


def test_merge_patch_removes_what_is_gone_and_skips_what_is_equal() -> None:
    old = {"plan": {"replicas": 3, "admittedRequestsPerSecond": 2.0}, "spend": {"a": 1}, "curve": {"x": 1}}
    new = {"plan": {"replicas": 4}, "spend": {"a": 1}}
    assert st.merge_patch(old, new) == {"plan": {"replicas": 4, "admittedRequestsPerSecond": None}, "curve": None}


def test_events_fire_on_flips_and_actions_only() -> None:
    before = [
        cond(ConditionType.METRICS_AVAILABLE, "True", "MetricsOK"),
        cond(ConditionType.DEGRADED, "False", "Healthy"),
    ]
    after = [
        cond(ConditionType.METRICS_AVAILABLE, "False", "MetricsUnreachable"),
        cond(ConditionType.DEGRADED, "True", "ConflictingAutoscaler"),
    ]
    notes = st.events_for(before, after, [st.KnobChange(Knob.REPLICAS, "demo-llm", 1, 3)])
    assert [(n.type, n.reason) for n in notes] == [
        ("Warning", "MetricsUnavailable"),
        ("Warning", "ConflictingAutoscaler"),
        ("Normal", "Rescaled"),
    ]
    assert "1 -> 3" in notes[2].message
    assert st.events_for(after, after, []) == []


def test_first_successful_metrics_are_not_news_but_recovery_is() -> None:
    ok = [cond(ConditionType.METRICS_AVAILABLE, "True", "MetricsOK")]
    assert st.events_for([], ok, []) == []
    down = [cond(ConditionType.METRICS_AVAILABLE, "False", "MetricsStale")]
    assert [n.reason for n in st.events_for(down, ok, [])] == ["MetricsRecovered"]


def plan_with(*reasons: Reason) -> Plan:
    return Plan(
        replicas=1,
        pools=[],
        token_limit=64,
        expected_spend_per_hour=1.0,
        allowed_spend_per_hour=2.0,
        expected_performance=0.5,
        metrics_available=True,
        reasons=[PlanReason(knob=Knob.REPLICAS, reason=r, message=r.value) for r in reasons],
        decided_at=T0,
    )


def test_the_most_severe_budget_reason_names_the_budget_condition() -> None:
    # Shedding requests is worse news than trimming replicas, whatever order the stages gave them in.
    wanted = st.budget_condition(plan_with(Reason.BUDGET_LIMITED, Reason.ADMISSION_CAPPED))
    assert (wanted.status, wanted.reason) == ("True", Reason.ADMISSION_CAPPED)
    wanted = st.budget_condition(plan_with(Reason.SCALE_UP_LIMIT))
    assert (wanted.status, wanted.reason) == ("False", Reason.WITHIN_BUDGET)


def test_troubles_come_in_their_declared_precedence_and_feed_conditions_and_metrics() -> None:
    decision = decide_for(observe(rps=None), make_spec(), ControllerState(), NOW)
    facts = st.Facts(
        spec=make_spec(),
        observation=observe(rps=None),
        decision=decision,
        conflicts=["HorizontalPodAutoscaler/llm"],
        target_missing="Deployment demo/llm not found",
        failures=["scaling Deployment demo/llm: HTTP 500 Internal Server Error"],
    )
    assert [r for r, _ in st.troubles(facts)] == [
        Reason.TARGET_NOT_FOUND,
        Reason.CONFLICTING_AUTOSCALER,
        Reason.ACTUATION_FAILED,
    ]
    degraded = next(w for w in st.conditions_for(facts) if w.type is ConditionType.DEGRADED)
    assert degraded.reason is Reason.TARGET_NOT_FOUND
    assert st.problems(facts) == [
        Reason.TARGET_NOT_FOUND,
        Reason.CONFLICTING_AUTOSCALER,
        Reason.ACTUATION_FAILED,
        Reason.METRICS_UNAVAILABLE,
    ]
