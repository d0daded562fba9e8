"""Every reason the operator gives, declared once: the plan's reasons, the conditions' reasons and
the Events' reasons are the same stable CamelCase words, so status, Events, ``/metrics`` and the
docs (docs/troubleshooting.md) can never drift apart.

The few rules that read reasons -- which plan reasons make the budget condition True, which
troubles degrade the operator and in what order -- are declared here next to the words.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # --- Why a knob has the value it has (plan reasons) ---
    MAX_REPLICAS = "MaxReplicas"
    MIN_REPLICAS = "MinReplicas"
    MAX_NODES = "MaxNodes"
    MAX_TOKENS = "MaxTokens"
    BUDGET_LIMITED = "BudgetLimited"
    ADMISSION_CAPPED = "AdmissionCapped"
    CEILING_BELOW_MINIMUM = "CeilingBelowMinimum"
    MARGINAL_VALUE = "MarginalValue"
    SCALE_UP_LIMIT = "ScaleUpLimit"
    SCALE_DOWN_STABILIZATION = "ScaleDownStabilization"
    NODE_SCALE_DOWN_STABILIZATION = "NodeScaleDownStabilization"
    CAPACITY_CATCHING_UP = "CapacityCatchingUp"
    TOKEN_STEP_UP_LIMIT = "TokenStepUpLimit"
    TOKEN_LIMIT_HELD = "TokenLimitHeld"
    LIMIT_NOT_ENFORCED = "LimitNotEnforced"
    FALLBACK_SCALE_TO = "FallbackScaleTo"
    FORECAST_SCALE_UP = "ForecastScaleUp"
    FORECAST_HOLD = "ForecastHold"
    FORECAST_BUFFER = "ForecastBuffer"
    CAPACITY_BUFFER_NOT_SERVED = "CapacityBufferNotServed"
    LATENCY_BOUND = "LatencyBound"

    # --- The metrics verdict (MetricsAvailable; also why replicas are held) ---
    METRICS_OK = "MetricsOK"
    METRICS_UNREACHABLE = "MetricsUnreachable"
    METRICS_STALE = "MetricsStale"
    METRICS_MISSING = "MetricsMissing"
    METRICS_ABSURD = "MetricsAbsurd"

    # --- Whether the gates apply the published limit (TokenLimitEnforced) ---
    ENFORCED = "Enforced"
    PROPAGATING = "Propagating"
    STALE = "Stale"
    NO_GATE = "NoGate"
    GATES_UNKNOWN = "GatesUnknown"

    # --- Which prices bill the ledger (PricesObserved, spend.source OpenCost) ---
    PRICES_FROM_OPEN_COST = "PricesFromOpenCost"
    PRICE_MISMATCH = "PriceMismatch"
    PRICES_FROM_SPEC = "PricesFromSpec"

    # --- Conditions ---
    ENFORCING = "Enforcing"
    RECOMMENDING = "Recommending"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    WITHIN_BUDGET = "WithinBudget"
    GIVEN_IN_SPEC = "GivenInSpec"
    FITTED = "Fitted"
    HEALTHY = "Healthy"
    INVALID_SPEC = "InvalidSpec"
    POOL_NOT_ALLOWED = "PoolNotAllowed"
    TARGET_NOT_FOUND = "TargetNotFound"
    CONFLICTING_AUTOSCALER = "ConflictingAutoscaler"
    ACTUATION_FAILED = "ActuationFailed"
    METRICS_FALLBACK = "MetricsFallback"
    METRICS_PARTIAL = "MetricsPartial"  # the rate was read, a secondary query failed

    # --- Events for actions and recoveries ---
    METRICS_RECOVERED = "MetricsRecovered"
    RESCALED = "Rescaled"
    NODE_POOL_RESIZED = "NodePoolResized"
    POOL_SPLIT = "PoolSplit"
    TOKEN_LIMIT_CHANGED = "TokenLimitChanged"
    ADMISSION_CHANGED = "AdmissionChanged"
    CAPACITY_BUFFER_RESIZED = "CapacityBufferResized"


# Plan reasons that make the BudgetLimited condition True, most severe first: the first one the
# plan gives is the condition's reason.
BUDGET_LIMITING = (Reason.CEILING_BELOW_MINIMUM, Reason.ADMISSION_CAPPED, Reason.BUDGET_LIMITED)

# Why the operator cannot do its job, most urgent first: the first that applies is the reason of
# Degraded (and of Ready=False, except for a fallback, which is the operator doing its job).
TROUBLES = (
    Reason.INVALID_SPEC,
    Reason.POOL_NOT_ALLOWED,
    Reason.TARGET_NOT_FOUND,
    Reason.CONFLICTING_AUTOSCALER,
    Reason.ACTUATION_FAILED,
    Reason.METRICS_FALLBACK,
)
