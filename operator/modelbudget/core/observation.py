"""One observed snapshot, and the verdict on whether its metrics can be trusted.

Cluster facts (replica counts, nodes per pool, the published token limit) come from the
apiserver and are always present.  Demand metrics come from Prometheus and may be missing,
stale, NaN or absurd: the verdict turns each of those into an explicit "unknown" with a
reason, so the planner never scales up on data it should not believe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from modelbudget.api.reasons import Reason
from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.api.status import DemandSource
from modelbudget.core.generation import GenerationProfile
from modelbudget.core.prices import ObservedPrices

# Beyond these, a number is a broken query or exporter, not demand.
ABSURD_REQUESTS_PER_SECOND = 1e6
ABSURD_TOKENS_FACTOR = 100.0  # generated tokens per request vs the curve's maxTokens


@dataclass(frozen=True)
class GateReport:
    """What the gates say they apply now: one token limit per gate (empty: no gate reports)."""

    applied_limits: tuple[float, ...] = ()
    error: str | None = None  # the gates' query failed: unknown, not "no gate"


@dataclass(frozen=True)
class DemandSample:
    """What the metrics source saw: ``None`` means unknown, ``error`` says why nothing was seen."""

    at: datetime | None = None
    request_rate: float | None = None
    demand_source: DemandSource = DemandSource.SERVER
    gates: GateReport | None = None  # None: not asked (the metrics source failed)
    prompt_tokens_per_request: float | None = None
    generated_tokens_per_request: float | None = None
    generation: GenerationProfile | None = None
    requests_waiting: float | None = None
    latency_p95_seconds: float | None = None
    time_to_first_token_p95_seconds: float | None = None
    time_per_output_token_p95_seconds: float | None = None
    error: str | None = None
    unread: tuple[str, ...] = ()  # secondary queries that failed (not: found no series), and why


@dataclass(frozen=True)
class Observation:
    """Cluster facts (always known) and the demand sample (maybe not)."""

    current_replicas: int
    ready_replicas: int
    current_nodes: Mapping[str, int] = field(default_factory=dict)
    current_token_limit: int | None = None
    demand: DemandSample = field(default_factory=DemandSample)
    prices: ObservedPrices | None = None  # spend.source OpenCost only: None when not asked
    capacity_buffers: bool = False  # whether the cluster serves SIG Autoscaling's CapacityBuffer API


@dataclass(frozen=True)
class MetricsVerdict:
    ok: bool
    reason: Reason  # MetricsOK, MetricsUnreachable, MetricsStale, MetricsMissing or MetricsAbsurd
    message: str
    profile: GenerationProfile | None = None


def _bad(x: float | None) -> bool:
    return x is None or not math.isfinite(x)


def assess(obs: Observation, spec: ModelBudgetSpec, now: datetime) -> MetricsVerdict:
    seen = obs.demand
    if seen.error is not None:
        return MetricsVerdict(False, Reason.METRICS_UNREACHABLE, seen.error)
    if seen.at is None:
        return MetricsVerdict(False, Reason.METRICS_MISSING, "no metrics sample")
    age = (now - seen.at).total_seconds()
    if age > spec.metrics.max_staleness_seconds:
        return MetricsVerdict(
            False,
            Reason.METRICS_STALE,
            f"newest sample is {age:.0f}s old (maxStalenessSeconds={spec.metrics.max_staleness_seconds:g})",
        )
    rate = seen.request_rate
    if _bad(rate):
        return MetricsVerdict(False, Reason.METRICS_MISSING, "request rate query returned no finite value")
    assert rate is not None
    if rate < 0 or rate > ABSURD_REQUESTS_PER_SECOND:
        return MetricsVerdict(False, Reason.METRICS_ABSURD, f"request rate {rate:g}/s is not plausible")
    waiting = seen.requests_waiting
    if waiting is not None and (not math.isfinite(waiting) or waiting < 0):
        return MetricsVerdict(False, Reason.METRICS_ABSURD, f"waiting requests {waiting:g} is not plausible")
    most_plausible = ABSURD_TOKENS_FACTOR * spec.curve.max_tokens
    gen = seen.generated_tokens_per_request
    if gen is not None and math.isfinite(gen) and not 0 <= gen <= most_plausible:
        return MetricsVerdict(False, Reason.METRICS_ABSURD, f"{gen:g} generated tokens per request is not plausible")
    profile = seen.generation
    if profile is None and not _bad(gen):
        assert gen is not None
        profile = GenerationProfile.from_mean(gen, obs.current_token_limit)
    if profile is None:
        if rate > 0:
            return MetricsVerdict(
                False, Reason.METRICS_MISSING, "no generated-token figures for a non-zero request rate"
            )
        profile = GenerationProfile.from_mean(1.0, None)
    observed = f"{rate:.3g} req/s observed"
    if seen.unread:
        observed += f"; not read: {'; '.join(seen.unread)}"[:800]
    return MetricsVerdict(True, Reason.METRICS_OK, observed, profile)
