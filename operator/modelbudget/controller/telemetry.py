"""The operator's own Prometheus metrics (prometheus_client), served on ``--metrics-addr``."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from modelbudget.api.pool import GpuPoolStatus
from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.api.status import Condition
from modelbudget.core.observation import Observation
from modelbudget.core.planner import Decision

_MB = ("namespace", "name")

RECONCILE_SECONDS = Histogram(
    "modelbudget_reconcile_duration_seconds",
    "Time one reconcile took (observe, decide, act, status).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = Counter("modelbudget_reconcile_errors_total", "Reconciles that hit a problem, by reason.", ["reason"])
SPEND = Gauge("modelbudget_spend_dollars_per_hour", "Spend rate of the nodes running now.", _MB)
ALLOWED = Gauge("modelbudget_allowed_dollars_per_hour", "Spend rate the ceiling (and pacing) allows now.", _MB)
CEILING = Gauge("modelbudget_ceiling_dollars", "The ceiling for one budget period.", [*_MB, "period"])
REPLICAS = Gauge(
    "modelbudget_replicas",
    "Replicas of the serving Deployment (buffer: the CapacityBuffer's placeholders).",
    [*_MB, "state"],
)
NODES = Gauge("modelbudget_nodes", "Nodes per GPU pool.", [*_MB, "pool", "state"])
TOKEN_LIMIT = Gauge("modelbudget_token_limit", "Per-request token limit planned.", _MB)
DEMAND = Gauge("modelbudget_demand_requests_per_second", "Request rate observed (NaN while metrics are missing).", _MB)
ADMITTED = Gauge(
    "modelbudget_admitted_requests_per_second", "Admission cap of the plan (+Inf when every request is admitted).", _MB
)
DECISIONS = Counter(
    "modelbudget_decisions_total", "Plan reasons, one count per reconcile that gave them.", [*_MB, "knob", "reason"]
)
PERIOD_TO_DATE = Gauge("modelbudget_period_to_date_dollars", "Dollars spent so far in the budget period.", _MB)
PROJECTED = Gauge(
    "modelbudget_projected_period_end_dollars", "Period-to-date plus the current rate until the period ends.", _MB
)
CONDITION = Gauge(
    "modelbudget_condition",
    "1 for the current status of each condition (True, False or Unknown), 0 for the others.",
    [*_MB, "type", "status"],
)
LEADER = Gauge("modelbudget_leader", "1 while this process holds the leader lease.")
POOL_NODES = Gauge("modelbudget_pool_nodes", "Nodes a shared GpuPool is sized to.", ["pool"])
POOL_BILL = Gauge("modelbudget_pool_bill_dollars_per_hour", "A shared GpuPool's bill: nodes x GPUs x price.", ["pool"])
POOL_SHARE = Gauge(
    "modelbudget_pool_share_dollars_per_hour",
    "Each ModelBudget's share of a shared GpuPool's bill (the shares add up to the bill).",
    ["pool", *_MB],
)
POOL_GRANTED = Gauge("modelbudget_pool_granted_gpus", "GPUs a shared GpuPool grants each ModelBudget.", ["pool", *_MB])

# Every family with a series per ModelBudget: a deleted ModelBudget's series go with it.
_PER_MODELBUDGET = (
    SPEND,
    ALLOWED,
    CEILING,
    REPLICAS,
    NODES,
    TOKEN_LIMIT,
    DEMAND,
    ADMITTED,
    DECISIONS,
    PERIOD_TO_DATE,
    PROJECTED,
    CONDITION,
)


def serve(addr: str) -> None:
    """Start the metrics endpoint (``host:port``) in a background thread."""
    host, _, port = addr.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")


def record(
    namespace: str,
    name: str,
    spec: ModelBudgetSpec,
    obs: Observation,
    decision: Decision,
    conditions: Sequence[Condition],
    projected_period_end: float | None,
) -> None:
    """Project one reconcile onto the gauges: nothing here is computed anew."""
    plan = decision.plan
    SPEND.labels(namespace, name).set(decision.running_spend)
    ALLOWED.labels(namespace, name).set(plan.allowed_spend_per_hour)
    CEILING.labels(namespace, name, spec.budget.ceiling.period.value).set(spec.budget.ceiling.amount)
    ledger = decision.next_state.ledger
    if ledger is not None:
        PERIOD_TO_DATE.labels(namespace, name).set(ledger.spent)
    if projected_period_end is not None:
        PROJECTED.labels(namespace, name).set(projected_period_end)
    REPLICAS.labels(namespace, name, "current").set(obs.current_replicas)
    REPLICAS.labels(namespace, name, "ready").set(obs.ready_replicas)
    REPLICAS.labels(namespace, name, "planned").set(plan.replicas)
    REPLICAS.labels(namespace, name, "buffer").set(plan.buffer_replicas)  # the CapacityBuffer's placeholders
    for alloc in plan.pools:
        NODES.labels(namespace, name, alloc.pool, "current").set(obs.current_nodes.get(alloc.pool, 0))
        NODES.labels(namespace, name, alloc.pool, "planned").set(alloc.nodes)
    TOKEN_LIMIT.labels(namespace, name).set(plan.token_limit)
    demand = plan.demand_requests_per_second
    DEMAND.labels(namespace, name).set(float("nan") if demand is None else demand)
    admitted = plan.admitted_requests_per_second
    ADMITTED.labels(namespace, name).set(float("inf") if admitted is None else admitted)
    for reason in plan.reasons:
        DECISIONS.labels(namespace, name, reason.knob.value, reason.reason.value).inc()
    record_conditions(namespace, name, conditions)


def record_conditions(namespace: str, name: str, conditions: Sequence[Condition]) -> None:
    for cond in conditions:
        for status in ("True", "False", "Unknown"):
            CONDITION.labels(namespace, name, cond.type, status).set(1 if cond.status == status else 0)


def forget(namespace: str, name: str) -> None:
    """Drop every series of a deleted ModelBudget."""
    for family in _PER_MODELBUDGET:
        family.remove_by_labels({"namespace": namespace, "name": name})


def record_pool(pool: str, status: GpuPoolStatus) -> None:
    """Project one pool settlement onto the gauges; claimants that left take their series along."""
    for family in (POOL_SHARE, POOL_GRANTED):
        family.remove_by_labels({"pool": pool})
    if status.nodes is not None:
        POOL_NODES.labels(pool).set(status.nodes)
    if status.bill_per_hour is not None:
        POOL_BILL.labels(pool).set(status.bill_per_hour)
    for grant in status.grants:
        POOL_SHARE.labels(pool, grant.namespace, grant.name).set(grant.share_per_hour)
        POOL_GRANTED.labels(pool, grant.namespace, grant.name).set(grant.granted_gpus)
