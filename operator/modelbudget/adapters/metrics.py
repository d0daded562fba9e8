"""Demand metrics from Prometheus: the spec's queries, answered or explicitly unknown.

Whatever Prometheus says -- nothing, NaN, an error page, garbage -- becomes a ``DemandSample``
with ``None`` for what is unknown and ``error`` set when the essential figure (the request
rate) could not be read.  The core's ``assess`` then decides whether to trust it; this module
never raises on a bad answer and never scales anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from string import Template
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from modelbudget.api.spec import Metrics
from modelbudget.api.status import DemandSource
from modelbudget.core.generation import GenerationProfile
from modelbudget.core.observation import DemandSample, GateReport


@dataclass(frozen=True)
class PrometheusCredentials:
    """Resolved from Secrets by the caller; ``repr`` hides them so they never reach a log."""

    bearer_token: str | None = field(default=None, repr=False)
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    ca_bundle_path: str | None = None


class MetricsSource(Protocol):
    def sample(
        self, metrics: Metrics, namespace: str, target: str, credentials: PrometheusCredentials
    ) -> DemandSample: ...


class QueryFailed(Exception):
    """One query could not be answered; the message is safe to show (no credentials)."""


def render_query(template: str, metrics: Metrics, namespace: str, target: str) -> str:
    """Substitute ``$selector`` and ``$window``, then ``$namespace`` and ``$target`` (which the
    selector may use)."""
    text = Template(template).safe_substitute(selector=metrics.selector, window=metrics.window)
    return Template(text).safe_substitute(namespace=namespace, target=target)


# Queries in flight at once per process (the controller runs them on this many threads), and so
# the connections kept open to each Prometheus.
MAX_PARALLEL_QUERIES = 16
MAX_TIMESTAMP = 253_402_300_800.0  # 10000-01-01T00:00:00Z, past datetime's range


def _number(raw: Any) -> float | None:
    """A Prometheus sample value (a string) as a float; NaN and garbage are unknown (None)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _sample_pair(item: Any) -> tuple[float, float | None]:
    if not isinstance(item, Mapping) or not isinstance(item.get("value"), Sequence) or len(item["value"]) != 2:
        raise QueryFailed(f"unexpected series in the answer: {str(item)[:120]}")
    ts = _number(item["value"][0])
    if ts is None:
        raise QueryFailed("sample without a timestamp")
    if not 0 <= ts < MAX_TIMESTAMP:  # datetime cannot hold it: a broken answer, not a time
        raise QueryFailed(f"sample timestamp {ts:g} out of range")
    return ts, _number(item["value"][1])


def parse_scalar(result: Any) -> tuple[float | None, float | None]:
    """``(value, timestamp)`` of an instant-vector answer: series are summed; empty is unknown.

    A NaN in any series makes the sum unknown: half a rate is worse than none.
    """
    if not isinstance(result, list):
        raise QueryFailed(f"expected a vector, got {type(result).__name__}")
    if not result:
        return None, None
    pairs = [_sample_pair(item) for item in result]
    values = [v for _, v in pairs]
    newest = max(ts for ts, _ in pairs)
    if any(v is None for v in values):
        return None, newest
    return sum(v for v in values if v is not None), newest


def parse_buckets(result: Any) -> list[tuple[float, float]]:
    """Cumulative ``(le, value)`` pairs of a ``sum by (le)`` histogram answer; NaN buckets dropped."""
    if not isinstance(result, list):
        raise QueryFailed(f"expected a vector, got {type(result).__name__}")
    buckets = []
    for item in result:
        _, value = _sample_pair(item)
        labels = item.get("metric")
        le = _number(labels.get("le")) if isinstance(labels, Mapping) else None
        if le is not None and value is not None:
            buckets.append((le, value))
    return sorted(buckets)


def _per_request(total_rate: float | None, request_rate: float | None) -> float | None:
    if total_rate is None or request_rate is None or request_rate <= 0:
        return None
    return total_rate / request_rate


def _profile(buckets: list[tuple[float, float]], truncated_fraction: float) -> GenerationProfile | None:
    if not buckets or buckets[-1][1] <= 0:
        return None  # no requests finished in the window: nothing to learn from
    try:
        return GenerationProfile.from_histogram(buckets, truncated_fraction)
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class QueryRunner(Protocol):
    """One PromQL instant query -> the raw ``data.result``; raises ``QueryFailed``."""

    def __call__(self, query: str) -> Any: ...


def parse_per_series(result: Any) -> tuple[float, ...]:
    """The values of an instant vector, one per series (NaN and garbage values left out)."""
    if not isinstance(result, list):
        raise QueryFailed(f"expected a vector, got {type(result).__name__}")
    return tuple(v for _, v in (_sample_pair(item) for item in result) if v is not None)


def _gates(run: QueryRunner, query: str) -> GateReport:
    try:
        return GateReport(applied_limits=parse_per_series(run(query)))
    except QueryFailed as exc:
        return GateReport(error=str(exc))


def sample_with(run: QueryRunner, metrics: Metrics, namespace: str, target: str) -> DemandSample:
    """Run the spec's queries through ``run`` and turn the answers into a ``DemandSample``.

    Demand is the gates' arrival rate where gate series exist (every request, served or not), else
    the server's completion rate. Per-request figures always divide server totals by the server's
    completion rate, so the two sources are never mixed in one ratio.
    """
    q = metrics.queries

    def scalar(template: str) -> tuple[float | None, float | None]:
        return parse_scalar(run(render_query(template, metrics, namespace, target)))

    try:
        rate, at_ts = scalar(q.request_rate)
    except QueryFailed as exc:
        return DemandSample(error=f"request rate: {exc}")
    if at_ts is None:
        return DemandSample()  # no series at all: the core calls this MetricsMissing
    try:
        arrivals, _ = scalar(q.gate_arrival_rate)
    except QueryFailed:
        arrivals = None  # no gate answer: the server's rate is the demand
    sample = DemandSample(
        at=datetime.fromtimestamp(at_ts, UTC),
        request_rate=rate if arrivals is None else arrivals,
        demand_source=DemandSource.SERVER if arrivals is None else DemandSource.GATE,
        gates=_gates(run, render_query(q.gate_token_limits, metrics, namespace, target)),
    )
    optional: dict[str, float | None] = {}
    for name, template in (
        ("truncated", q.truncated_request_rate),
        ("prompt", q.prompt_tokens_rate),
        ("generated", q.generation_tokens_rate),
        ("waiting", q.requests_waiting),
        ("latency", q.latency_p95),
        ("ttft", q.time_to_first_token_p95),
        ("tpot", q.time_per_output_token_p95),
    ):
        try:
            optional[name], _ = scalar(template)
        except QueryFailed:
            optional[name] = None  # a secondary figure missing is survivable; the rate is not
    try:
        buckets = parse_buckets(run(render_query(q.generation_tokens_histogram, metrics, namespace, target)))
    except QueryFailed:
        buckets = []
    truncated = _per_request(optional["truncated"], rate) or 0.0
    return replace(
        sample,
        prompt_tokens_per_request=_per_request(optional["prompt"], rate),
        generated_tokens_per_request=_per_request(optional["generated"], rate),
        generation=_profile(buckets, truncated),
        requests_waiting=optional["waiting"],
        latency_p95_seconds=optional["latency"],
        time_to_first_token_p95_seconds=optional["ttft"],
        time_per_output_token_p95_seconds=optional["tpot"],
    )


def _why(exc: requests.RequestException, timeout: float) -> str:
    """What went wrong, without the URL: with retries off, requests reports a read timeout as a
    ConnectionError wrapping urllib3's MaxRetryError, so look at the urllib3 reason too."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(exc, requests.Timeout) or isinstance(reason, urllib3.exceptions.TimeoutError):
        return f"no answer within {timeout:g}s"
    return type(reason or exc).__name__


class PrometheusMetrics:
    """``MetricsSource`` over the Prometheus HTTP API (prometheus-api-client), one client per URL+auth."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, PrometheusCredentials, bool, float], PrometheusConnect] = {}

    def _client(self, metrics: Metrics, credentials: PrometheusCredentials) -> PrometheusConnect:
        key = (metrics.prometheus_url, credentials, metrics.insecure_skip_verify, metrics.timeout_seconds)
        client = self._clients.get(key)
        if client is None:
            session = requests.Session()
            session.verify = False if metrics.insecure_skip_verify else (credentials.ca_bundle_path or True)
            headers = {"Authorization": f"Bearer {credentials.bearer_token}"} if credentials.bearer_token else None
            url = metrics.prometheus_url.rstrip("/")
            no_retry = Retry(total=0)  # the next reconcile is the retry; a stuck one must not hold it up
            client = PrometheusConnect(
                url=url,
                headers=headers,
                auth=credentials.basic_auth,
                session=session,
                retry=no_retry,
                timeout=metrics.timeout_seconds,
            )
            # PrometheusConnect mounts an adapter with requests' default 10 pooled connections; with
            # more concurrent queries (one Prometheus shared by many ModelBudgets) every extra one
            # would be a new TCP (and TLS) connection, dropped after one query.
            session.mount(url, HTTPAdapter(max_retries=no_retry, pool_maxsize=MAX_PARALLEL_QUERIES))
            self._clients[key] = client
        return client

    def runner(self, metrics: Metrics, credentials: PrometheusCredentials) -> QueryRunner:
        """Instant queries against ``metrics.prometheusUrl``; every failure is a ``QueryFailed``."""
        client = self._client(metrics, credentials)
        where = redact_url(metrics.prometheus_url)

        def run(query: str) -> Any:
            try:
                return client.custom_query(query)
            except PrometheusApiClientException as exc:
                raise QueryFailed(f"{where} answered {str(exc)[:200]}") from exc
            except requests.exceptions.InvalidJSONError as exc:  # a RequestException, but it did answer
                raise QueryFailed(f"{where} sent a malformed answer: not JSON") from exc
            except requests.RequestException as exc:
                raise QueryFailed(f"{where} unreachable: {_why(exc, metrics.timeout_seconds)}") from exc
            except (ValueError, KeyError, TypeError) as exc:  # JSON without data.result
                raise QueryFailed(f"{where} sent a malformed answer: {type(exc).__name__}") from exc

        return run

    def sample(self, metrics: Metrics, namespace: str, target: str, credentials: PrometheusCredentials) -> DemandSample:
        return sample_with(self.runner(metrics, credentials), metrics, namespace, target)
