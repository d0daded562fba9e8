"""The operator's own Prometheus metrics (prometheus_client), served on ``--metrics-addr``."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelbudget.api.pool import GpuPoolStatus
from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.api.status import Condition
from modelbudget.core.observation import Observation
from modelbudget.core.planner import Decision

_MB = ("namespace", "name")


class PerModelBudget(Collector):
    """The families with series per ModelBudget, kept as plain numbers and exposed when scraped.

    A ``Gauge`` child per series costs about a kilobyte (its lock, its value holder, its place in
    the family): 31 series per ModelBudget were about 30 MiB at N = 1,000. Here a ModelBudget's
    series are one dict of numbers, written under one lock; a deleted ModelBudget's go at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # name -> (kind, help, extra labels)
        # (namespace, name) -> (family, extra label values) -> value
        self._values: dict[tuple[str, str], dict[tuple[str, tuple[str, ...]], float]] = {}

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Family:
        self._families[name] = ("gauge", documentation, tuple(labels))
        return Family(self, name)

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Family:
        """A counter family; ``name`` without ``_total`` (the exposition adds it)."""
        self._families[name] = ("counter", documentation, tuple(labels))
        return Family(self, name)

    def set(self, owner: tuple[str, str], family: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._values.setdefault(owner, {})[(family, labels)] = value

    def inc(self, owner: tuple[str, str], family: str, labels: tuple[str, ...]) -> None:
        with self._lock:
            series = self._values.setdefault(owner, {})
            series[(family, labels)] = series.get((family, labels), 0.0) + 1.0

    def forget(self, owner: tuple[str, str]) -> None:
        with self._lock:
            self._values.pop(owner, None)

    def _empty(self) -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        made: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, (kind, documentation, extra) in self._families.items():
            of = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            made[name] = of(name, documentation, labels=[*_MB, *extra])
        return made

    def describe(self) -> Iterator[Metric]:
        return iter(self._empty().values())

    def collect(self) -> Iterator[Metric]:
        families = self._empty()
        with self._lock:
            values = [(owner, list(series.items())) for owner, series in self._values.items()]
        for owner, series in values:
            for (family, labels), value in series:
                families[family].add_metric([*owner, *labels], value)
        return iter(families.values())


class Family:
    """One family of ``PerModelBudget``: its series are set per ModelBudget, with the family's
    extra label values after the ModelBudget's namespace and name."""

    def __init__(self, store: PerModelBudget, name: str) -> None:
        self._store, self.name = store, name

    def set(self, namespace: str, name: str, value: float, *labels: str) -> None:
        self._store.set((namespace, name), self.name, labels, value)

    def inc(self, namespace: str, name: str, *labels: str) -> None:
        self._store.inc((namespace, name), self.name, labels)


RECONCILE_SECONDS = Histogram(
    "modelbudget_reconcile_duration_seconds",
    "Time one reconcile took (observe, decide, act, status).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = Counter("modelbudget_reconcile_errors_total", "Reconciles that hit a problem, by reason.", ["reason"])
PER_MODELBUDGET = PerModelBudget()
SPEND = PER_MODELBUDGET.gauge("modelbudget_spend_dollars_per_hour", "Spend rate of the nodes running now.")
ALLOWED = PER_MODELBUDGET.gauge(
    "modelbudget_allowed_dollars_per_hour", "Spend rate the ceiling (and pacing) allows now."
)
CEILING = PER_MODELBUDGET.gauge("modelbudget_ceiling_dollars", "The ceiling for one budget period.", ["period"])
REPLICAS = PER_MODELBUDGET.gauge(
    "modelbudget_replicas", "Replicas of the serving Deployment (buffer: the CapacityBuffer's placeholders).", ["state"]
)
NODES = PER_MODELBUDGET.gauge("modelbudget_nodes", "Nodes per GPU pool.", ["pool", "state"])
TOKEN_LIMIT = PER_MODELBUDGET.gauge("modelbudget_token_limit", "Per-request token limit planned.")
DEMAND = PER_MODELBUDGET.gauge(
    "modelbudget_demand_requests_per_second", "Request rate observed (NaN while metrics are missing)."
)
ADMITTED = PER_MODELBUDGET.gauge(
    "modelbudget_admitted_requests_per_second", "Admission cap of the plan (+Inf when every request is admitted)."
)
DECISIONS = PER_MODELBUDGET.counter(
    "modelbudget_decisions", "Plan reasons, one count per reconcile that gave them.", ["knob", "reason"]
)
PERIOD_TO_DATE = PER_MODELBUDGET.gauge(
    "modelbudget_period_to_date_dollars", "Dollars spent so far in the budget period."
)
PROJECTED = PER_MODELBUDGET.gauge(
    "modelbudget_projected_period_end_dollars", "Period-to-date plus the current rate until the period ends."
)
CONDITION = PER_MODELBUDGET.gauge(
    "modelbudget_condition",
    "1 for the current status of each condition (True, False or Unknown), 0 for the others.",
    ["type", "status"],
)
REGISTRY.register(PER_MODELBUDGET)
LEADER = Gauge("modelbudget_leader", "1 while this process holds the leader lease.")
POOL_NODES = Gauge("modelbudget_pool_nodes", "Nodes a shared GpuPool is sized to.", ["pool"])
POOL_BILL = Gauge("modelbudget_pool_bill_dollars_per_hour", "A shared GpuPool's bill: nodes x GPUs x price.", ["pool"])
POOL_SHARE = Gauge(
    "modelbudget_pool_share_dollars_per_hour",
    "Each ModelBudget's share of a shared GpuPool's bill (the shares add up to the bill).",
    ["pool", *_MB],
)
POOL_GRANTED = Gauge("modelbudget_pool_granted_gpus", "GPUs a shared GpuPool grants each ModelBudget.", ["pool", *_MB])


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
    SPEND.set(namespace, name, decision.running_spend)
    ALLOWED.set(namespace, name, plan.allowed_spend_per_hour)
    CEILING.set(namespace, name, spec.budget.ceiling.amount, spec.budget.ceiling.period.value)
    ledger = decision.next_state.ledger
    if ledger is not None:
        PERIOD_TO_DATE.set(namespace, name, ledger.spent)
    if projected_period_end is not None:
        PROJECTED.set(namespace, name, projected_period_end)
    REPLICAS.set(namespace, name, obs.current_replicas, "current")
    REPLICAS.set(namespace, name, obs.ready_replicas, "ready")
    REPLICAS.set(namespace, name, plan.replicas, "planned")
    REPLICAS.set(namespace, name, plan.buffer_replicas, "buffer")  # the CapacityBuffer's placeholders
    for alloc in plan.pools:
        NODES.set(namespace, name, obs.current_nodes.get(alloc.pool, 0), alloc.pool, "current")
        NODES.set(namespace, name, alloc.nodes, alloc.pool, "planned")
    TOKEN_LIMIT.set(namespace, name, plan.token_limit)
    demand = plan.demand_requests_per_second
    DEMAND.set(namespace, name, float("nan") if demand is None else demand)
    admitted = plan.admitted_requests_per_second
    ADMITTED.set(namespace, name, float("inf") if admitted is None else admitted)
    for reason in plan.reasons:
        DECISIONS.inc(namespace, name, reason.knob.value, reason.reason.value)
    record_conditions(namespace, name, conditions)


def record_conditions(namespace: str, name: str, conditions: Sequence[Condition]) -> None:
    for cond in conditions:
        for status in ("True", "False", "Unknown"):
            CONDITION.set(namespace, name, 1 if cond.status == status else 0, cond.type, status)


def forget(namespace: str, name: str) -> None:
    """Drop every series of a deleted ModelBudget."""
    PER_MODELBUDGET.forget((namespace, name))


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
