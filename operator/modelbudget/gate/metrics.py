"""The gate's Prometheus metrics (the contract the operator reads; docs/gate.md lists them).

Every series carries ``target`` (the Deployment the gate serves); ``namespace`` and ``pod``
come from the scrape. Served on the gate's own metrics port, never forwarded.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modelbudget.gate.limits import Limits

# vLLM's 1-2-5 token buckets (vllm:request_generation_tokens), so the two histograms line up.
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]
LATENCY_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class GateMetrics:
    def __init__(self, target: str) -> None:
        self.registry = CollectorRegistry()
        r, t = self.registry, ["target"]
        self.arrivals = Counter(
            "modelbudget_gate_arrivals", "Requests that reached the gate on the clamped paths.", t, registry=r
        ).labels(target)
        self.forwarded = Counter(
            "modelbudget_gate_forwarded", "Clamped-path requests forwarded to the model server.", t, registry=r
        ).labels(target)
        self.clamped = Counter(
            "modelbudget_gate_clamped", "Admitted requests whose token cap the gate lowered or imposed.", t, registry=r
        ).labels(target)
        self.uncapped = Counter(
            "modelbudget_gate_uncapped", "Clamped-path requests that asked for no token cap.", t, registry=r
        ).labels(target)
        self._rejected = Counter(
            "modelbudget_gate_rejected", "Requests the gate answered itself, by reason.", [*t, "reason"], registry=r
        )
        self._errors = Counter(
            "modelbudget_gate_errors", "Requests that failed after admission, by reason.", [*t, "reason"], registry=r
        )
        self.requested_max_tokens = Histogram(
            "modelbudget_gate_requested_max_tokens",
            "The token cap clients asked for (requests without one are counted in modelbudget_gate_uncapped_total).",
            t,
            buckets=TOKEN_BUCKETS,
            registry=r,
        ).labels(target)
        self.token_limit = Gauge(
            "modelbudget_gate_token_limit", "The per-request token limit applied now.", t, registry=r
        ).labels(target)
        self.admitted_rps = Gauge(
            "modelbudget_gate_admitted_rps", "This pod's admitted requests/s applied now (+Inf: no cap).", t, registry=r
        ).labels(target)
        self.config_updated = Gauge(
            "modelbudget_gate_config_updated_timestamp_seconds",
            "When the gate last accepted published limits (Unix time).",
            t,
            registry=r,
        ).labels(target)
        self.config_errors = Counter(
            "modelbudget_gate_config_errors", "Published limits the gate refused (unparsable).", t, registry=r
        ).labels(target)
        self.added_latency = Histogram(
            "modelbudget_gate_added_latency_seconds",
            "Time the gate adds before the response headers (parse, clamp, admission wait, header copy).",
            t,
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(target)
        self.target = target

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.target, reason).inc()

    def error(self, reason: str) -> None:
        self._errors.labels(self.target, reason).inc()

    def limits_applied(self, limits: Limits) -> None:
        self.token_limit.set(limits.max_tokens)
        self.admitted_rps.set(float("inf") if limits.admitted_rps is None else limits.admitted_rps)
        self.config_updated.set(time.time())
