"""The operator's own Prometheus metrics (prometheus_client), served on ``--metrics-addr``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.api.status import Plan
from modelbudget.core.observation import Observation

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
REPLICAS = Gauge("modelbudget_replicas", "Replicas of the serving Deployment.", [*_MB, "state"])
NODES = Gauge("modelbudget_nodes", "Nodes per GPU pool.", [*_MB, "pool", "state"])
TOKEN_LIMIT = Gauge("modelbudget_token_limit", "Per-request token limit planned.", _MB)
DEMAND = Gauge("modelbudget_demand_requests_per_second", "Request rate observed (NaN while metrics are missing).", _MB)
ADMITTED = Gauge(
    "modelbudget_admitted_requests_per_second", "Admission cap of the plan (+Inf when every request is admitted).", _MB
)
DECISIONS = Counter(
    "modelbudget_decisions_total", "Plan reasons, one count per reconcile that gave them.", [*_MB, "knob", "reason"]
)
LEADER = Gauge("modelbudget_leader", "1 while this process holds the leader lease.")


def serve(addr: str) -> None:
    """Start the metrics endpoint (``host:port``) in a background thread."""
    host, _, port = addr.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")


def record(namespace: str, name: str, spec: ModelBudgetSpec, obs: Observation, plan: Plan, spend: float) -> None:
    SPEND.labels(namespace, name).set(spend)
    ALLOWED.labels(namespace, name).set(plan.allowed_spend_per_hour)
    CEILING.labels(namespace, name, spec.budget.ceiling.period.value).set(spec.budget.ceiling.amount)
    REPLICAS.labels(namespace, name, "current").set(obs.current_replicas)
    REPLICAS.labels(namespace, name, "ready").set(obs.ready_replicas)
    REPLICAS.labels(namespace, name, "planned").set(plan.replicas)
    for alloc in plan.pools:
        NODES.labels(namespace, name, alloc.pool, "current").set(obs.current_nodes.get(alloc.pool, 0))
        NODES.labels(namespace, name, alloc.pool, "planned").set(alloc.nodes)
    TOKEN_LIMIT.labels(namespace, name).set(plan.token_limit)
    demand = plan.demand_requests_per_second
    DEMAND.labels(namespace, name).set(float("nan") if demand is None else demand)
    admitted = plan.admitted_requests_per_second
    ADMITTED.labels(namespace, name).set(float("inf") if admitted is None else admitted)
    for reason in plan.reasons:
        DECISIONS.labels(namespace, name, reason.knob.value, reason.reason).inc()
