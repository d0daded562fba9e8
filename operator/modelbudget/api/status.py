"""The ModelBudget status, the plan the core returns, and the controller state it carries.

The plan and the controller state are part of the status on purpose: state that must survive
an operator restart (the spend ledger, scale-down recommendations, scale-up history, how long
metrics have been missing) lives in the object, never only in memory.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field

from modelbudget.api.reasons import Reason
from modelbudget.api.spec import ApiModel, Name, PriceSource


class StatusModel(ApiModel):
    """Status is written by the operator, maybe by another version of it: fields this version does
    not know are ignored, not fatal, so an upgrade or a rollback never loses the ledger."""

    model_config = ConfigDict(**{**ApiModel.model_config, "extra": "ignore"})


class ConditionType(StrEnum):
    READY = "Ready"
    METRICS_AVAILABLE = "MetricsAvailable"
    CURVE_FITTED = "CurveFitted"
    BUDGET_LIMITED = "BudgetLimited"
    TOKEN_LIMIT_ENFORCED = "TokenLimitEnforced"
    PRICES_OBSERVED = "PricesObserved"
    DEGRADED = "Degraded"


class Condition(StatusModel):
    type: str = Field(max_length=64)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=64, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=4096)
    observed_generation: int | None = None
    last_transition_time: datetime


class Knob(StrEnum):
    REPLICAS = "Replicas"
    NODES = "Nodes"
    TOKEN_LIMIT = "TokenLimit"
    ADMITTED_RATE = "AdmittedRate"
    CAPACITY_BUFFER = "CapacityBuffer"


class PlanReason(StatusModel):
    """A bound that held a knob back, or a rule that chose its value; ``reason`` is stable."""

    knob: Knob
    reason: Reason
    message: str = Field(max_length=1024)


class PoolAllocation(StatusModel):
    pool: str
    nodes: int
    replicas: int
    spend_per_hour: float


class Ledger(StatusModel):
    """Spend integrated from what was actually running, for the current budget period."""

    period_start: datetime
    spent: float = Field(ge=0, description="Dollars spent since periodStart.")
    accrued_at: datetime = Field(description="Time up to which spend has been integrated.")
    rate_per_hour: float = Field(ge=0, description="Spend rate of the nodes running at accruedAt.")
    spent_at_spec_prices: float = Field(
        default=0.0,
        ge=0,
        description="The part of spent billed at the spec's prices (all of it with spend.source Spec; "
        "with OpenCost, the time its prices were missing or stale).",
    )


class Recommendation(StatusModel):
    at: datetime
    replicas: int
    nodes: dict[str, int] = Field(default_factory=dict)


class ScaleUpEvent(StatusModel):
    at: datetime
    added: int


class DemandHistory(StatusModel):
    """The peak request rate per bucket, oldest first: what the demand forecast is made from."""

    start: datetime = Field(description="Start of the first bucket.")
    bucket_seconds: int = Field(ge=1, le=3600)
    peaks: list[float] = Field(default_factory=list, max_length=1024, description="Peak requests/s per bucket.")


class ControllerState(StatusModel):
    ledger: Ledger | None = None
    recommendations: list[Recommendation] = Field(default_factory=list, max_length=2048)
    scale_ups: list[ScaleUpEvent] = Field(default_factory=list, max_length=2048)
    metrics_missing_since: datetime | None = None
    token_limit: int | None = None
    limit_unenforced_since: datetime | None = None
    demand_history: DemandHistory | None = None


class DemandForecast(StatusModel):
    """Demand expected over the time new capacity takes to arrive, and the peak sized for."""

    model: str
    horizon_seconds: float
    quantile: float
    expected_requests_per_second: float = Field(description="Mean demand expected over the horizon.")
    upper_requests_per_second: float = Field(description="The quantile of the demand peak within the horizon.")


class Plan(StatusModel):
    """What ``decide`` wants: every knob, what it costs, what it buys, and why."""

    replicas: int
    buffer_replicas: int = Field(
        default=0,
        ge=0,
        description="Placeholder pods, sized like the target's, that the ModelBudget's CapacityBuffer asks the "
        "cluster autoscaler for: the forecast's headroom (behavior.forecast.headroom). Their nodes are in pools.",
    )
    pools: list[PoolAllocation]
    token_limit: int
    admitted_requests_per_second: float | None = Field(
        default=None, description="Admission cap when even the smallest token limit does not fit; none = all."
    )
    demand_requests_per_second: float | None = None
    expected_spend_per_hour: float
    allowed_spend_per_hour: float
    expected_performance: float = Field(description="Mean score per request, dropped requests counting 0.")
    metrics_available: bool
    forecast: DemandForecast | None = Field(
        default=None, description="The demand forecast the plan used; none without enough recent, trusted history."
    )
    reasons: list[PlanReason] = Field(default_factory=list)
    decided_at: datetime

    def nodes_by_pool(self) -> dict[str, int]:
        return {a.pool: a.nodes for a in self.pools}

    def has_reason(self, reason: Reason) -> bool:
        return any(r.reason is reason for r in self.reasons)


class PoolClaim(StatusModel):
    """One ModelBudget's ask of a shared pool, published in its status for the pool reconciler."""

    pool: Name
    gpus: int = Field(ge=0, description="GPUs its planned replicas need on the pool.")
    gpus_per_replica: int = Field(ge=1, description="Grants are whole replicas.")
    payable_per_hour: float = Field(ge=0, description="The most its allowance pays for its share of the pool.")


class PoolPrice(StatusModel):
    pool: str
    nodes: int = Field(description="Nodes running now.")
    spec_per_node_hour: float = Field(description="gpusPerNode x pricePerGpuHour.")
    observed_per_node_hour: float | None = Field(
        default=None, description="Mean of OpenCost's node_total_hourly_cost over the running nodes."
    )
    observed_per_gpu_hour: float | None = Field(
        default=None, description="Mean of OpenCost's node_gpu_hourly_cost over the running nodes."
    )


class SpendStatus(StatusModel):
    current_per_hour: float = Field(description="Spend rate of the nodes running now.")
    allowed_per_hour: float = Field(description="The rate the ceiling (and pacing) allows now.")
    ceiling: str = Field(description="The ceiling as stated, e.g. '40 USD/Hour'.")
    period_start: datetime
    period_to_date: float
    projected_period_end: float = Field(description="Period-to-date plus the current rate until the period ends.")
    utilization: float = Field(description="current / allowed.")
    source: PriceSource = Field(default=PriceSource.SPEC, description="Whose prices billed the latest accrual.")
    period_to_date_at_spec_prices: float = Field(
        default=0.0, description="The part of periodToDate billed at the spec's prices."
    )
    pools: list[PoolPrice] | None = Field(
        default=None, description="spend.source OpenCost: each pool's observed node price next to the spec's."
    )


class DemandSource(StrEnum):
    GATE = "Gate"  # arrivals counted by the gates: every request, served or not
    SERVER = "Server"  # completions counted by the model server (requestRate): lags a surge


class DemandStatus(StatusModel):
    source: DemandSource | None = Field(default=None, description="Where the request rate was read.")
    requests_per_second: float | None = None
    prompt_tokens_per_request: float | None = None
    generated_tokens_per_request: float | None = None
    waiting_requests: float | None = None
    latency_p95_seconds: float | None = None
    time_to_first_token_p95_seconds: float | None = None
    time_per_output_token_p95_seconds: float | None = None
    observed_at: datetime | None = None


class CurveStatus(StatusModel):
    intercept: float
    slope: float
    min_tokens: int
    max_tokens: int
    r_squared: float | None = None
    source: Literal["Spec", "Fitted"]


class VariantStatus(StatusModel):
    """One variant's traffic: the share it was given next to the share it actually served."""

    name: str
    weight: int | None = Field(default=None, description="Percent of the traffic published for it.")
    served_share: float | None = Field(
        default=None,
        description="Percent of the requests it actually served, from its observed request rate "
        "(unknown while any variant's rate is missing or nothing is served).",
    )


class ModelBudgetStatus(StatusModel):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    spend: SpendStatus | None = None
    demand: DemandStatus | None = None
    plan: Plan | None = None
    curve: CurveStatus | None = None
    controller_state: ControllerState = Field(default_factory=ControllerState)
    pool_claims: list[PoolClaim] = Field(
        default_factory=list,
        max_length=16,
        description="What this ModelBudget asks of each shared pool (GpuPool); the pool reconciler reads it.",
    )
    variants: list[VariantStatus] = Field(
        default_factory=list, max_length=16, description="With variants: each one's weight and served share."
    )
