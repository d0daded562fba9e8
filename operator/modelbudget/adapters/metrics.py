"""Demand metrics from Prometheus: the spec's queries, answered or explicitly unknown.

Whatever Prometheus says -- nothing, NaN, an error page, garbage -- becomes a ``DemandSample``
with ``None`` for what is unknown and ``error`` set when the essential figure (the request
rate) could not be read.  The core's ``assess`` then decides whether to trust it; this module
never raises on a bad answer and never scales anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from string import Template
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import prometheus_client
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from modelbudget.adapters.grouping import GroupAnswer, GroupShape, split
from modelbudget.api.spec import Metrics, Queries
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
    async def sample(
        self, metrics: Metrics, namespace: str, target: str, credentials: PrometheusCredentials
    ) -> DemandSample: ...


class QueryFailed(Exception):
    """One query could not be answered; the message is safe to show (no credentials)."""


def render_query(template: str, metrics: Metrics, namespace: str, target: str) -> str:
    """Substitute ``$selector`` and ``$window``, then ``$namespace`` and ``$target`` (which the
    selector may use)."""
    text = Template(template).safe_substitute(selector=metrics.selector, window=metrics.window)
    return Template(text).safe_substitute(namespace=namespace, target=target)


# Queries in flight at once to one Prometheus (each endpoint has this many threads of its own, so
# a hung Prometheus holds only its own ModelBudgets' queries), and the connections kept open to it.
MAX_PARALLEL_QUERIES = 16
MAX_TIMESTAMP = 253_402_300_800.0  # 10000-01-01T00:00:00Z, past datetime's range
FORGET_AFTER_TICKS = 10  # a group member unheard of for this many reuse periods leaves it
MAX_URL_QUERY = 4096  # characters of PromQL sent in a GET's URL; longer ones are POSTed
QUERIES = prometheus_client.Counter(
    "modelbudget_prometheus_queries_total", "PromQL queries sent, grouped ones counted once"
)


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


def _gates(result: Any) -> GateReport:
    try:
        return GateReport(applied_limits=parse_per_series(result))
    except QueryFailed as exc:
        return GateReport(error=str(exc))


# A query's answer: the raw ``data.result``, or why there is none.
Answer = Any | QueryFailed
# The spec's queries a secondary figure comes from (every query but the request rate and the gates'
# limits, which are reported on their own: MetricsUnreachable and TokenLimitEnforced).
SECONDARY = (
    "gate_arrival_rate",
    "truncated_request_rate",
    "prompt_tokens_rate",
    "generation_tokens_rate",
    "requests_waiting",
    "latency_p95",
    "time_to_first_token_p95",
    "time_per_output_token_p95",
    "generation_tokens_histogram",
)


def queries_for(metrics: Metrics, namespace: str, target: str) -> dict[str, str]:
    """Every query of the spec, rendered for one ModelBudget, by the ``Queries`` field it comes from."""
    return {
        name: render_query(template, metrics, namespace, target)
        for name, template in metrics.queries.model_dump().items()
    }


def _ask(run: QueryRunner, query: str) -> Answer:
    try:
        return run(query)
    except QueryFailed as exc:
        return exc


def sample_with(run: QueryRunner, metrics: Metrics, namespace: str, target: str) -> DemandSample:
    """The spec's queries asked one after another through ``run``, as a ``DemandSample``."""
    return sample_from({name: _ask(run, q) for name, q in queries_for(metrics, namespace, target).items()})


def _scalar(answer: Answer) -> tuple[float | None, float | None]:
    if isinstance(answer, QueryFailed):
        raise answer
    return parse_scalar(answer)


def sample_from(answers: Mapping[str, Answer]) -> DemandSample:
    """The answers to ``queries_for``'s queries as a ``DemandSample``.

    Demand is the gates' arrival rate where gate series exist (every request, served or not), else
    the server's completion rate. Per-request figures always divide server totals by the server's
    completion rate, so the two sources are never mixed in one ratio. A secondary query that fails
    leaves its figure unknown and says so in ``unread``; one that finds no series is just unknown.
    """
    try:
        rate, at_ts = _scalar(answers["request_rate"])
    except QueryFailed as exc:
        return DemandSample(error=f"request rate: {exc}")
    if at_ts is None:
        return DemandSample()  # no series at all: the core calls this MetricsMissing
    unread: list[str] = []
    figures: dict[str, float | None] = {}
    for name in SECONDARY[:-1]:
        try:
            figures[name], _ = _scalar(answers[name])
        except QueryFailed as exc:
            figures[name] = None
            unread.append(f"{Queries.model_fields[name].alias}: {exc}")
    histogram = answers["generation_tokens_histogram"]
    try:
        if isinstance(histogram, QueryFailed):
            raise histogram
        buckets = parse_buckets(histogram)
    except QueryFailed as exc:
        buckets = []
        unread.append(f"{Queries.model_fields['generation_tokens_histogram'].alias}: {exc}")
    limits = answers["gate_token_limits"]
    arrivals = figures["gate_arrival_rate"]
    truncated = _per_request(figures["truncated_request_rate"], rate) or 0.0
    return DemandSample(
        at=datetime.fromtimestamp(at_ts, UTC),
        request_rate=rate if arrivals is None else arrivals,
        demand_source=DemandSource.SERVER if arrivals is None else DemandSource.GATE,
        gates=GateReport(error=str(limits)) if isinstance(limits, QueryFailed) else _gates(limits),
        prompt_tokens_per_request=_per_request(figures["prompt_tokens_rate"], rate),
        generated_tokens_per_request=_per_request(figures["generation_tokens_rate"], rate),
        generation=_profile(buckets, truncated),
        requests_waiting=figures["requests_waiting"],
        latency_p95_seconds=figures["latency_p95"],
        time_to_first_token_p95_seconds=figures["time_to_first_token_p95"],
        time_per_output_token_p95_seconds=figures["time_per_output_token_p95"],
        unread=tuple(unread),
    )


def _why(exc: requests.RequestException, timeout: float) -> str:
    """What went wrong, without the URL: with retries off, requests reports a read timeout as a
    ConnectionError wrapping urllib3's MaxRetryError, so look at the urllib3 reason too."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(exc, requests.Timeout) or isinstance(reason, urllib3.exceptions.TimeoutError):
        return f"no answer within {timeout:g}s"
    return type(reason or exc).__name__


@dataclass(frozen=True)
class Endpoint:
    """Where queries go and as whom: ModelBudgets with the same endpoint share a connection pool
    and their queries' groups."""

    url: str
    credentials: PrometheusCredentials
    insecure_skip_verify: bool
    timeout: float

    @classmethod
    def of(cls, metrics: Metrics, credentials: PrometheusCredentials) -> Endpoint:
        url = metrics.prometheus_url.rstrip("/")
        return cls(url, credentials, metrics.insecure_skip_verify, metrics.timeout_seconds)

    def no_answer(self) -> QueryFailed:
        return QueryFailed(f"{redact_url(self.url)} unreachable: no answer within {self.timeout:g}s")


class PrometheusHttp:
    """Instant queries over one endpoint's HTTP API, each bounded by a whole-query deadline."""

    READ_SIZE = 65_536

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._where = redact_url(endpoint.url)
        session = requests.Session()
        session.verify = False if endpoint.insecure_skip_verify else (endpoint.credentials.ca_bundle_path or True)
        session.auth = endpoint.credentials.basic_auth
        if endpoint.credentials.bearer_token:
            session.headers["Authorization"] = f"Bearer {endpoint.credentials.bearer_token}"
        # No retries: the next reconcile is the retry, and a stuck query must not hold it up. As
        # many pooled connections as queries in flight, or each extra one is a new TCP (and TLS)
        # connection, dropped after one query.
        no_retry = Retry(total=0)
        session.mount(endpoint.url, HTTPAdapter(max_retries=no_retry, pool_maxsize=MAX_PARALLEL_QUERIES))
        self._session = session
        self._threads = ThreadPoolExecutor(MAX_PARALLEL_QUERIES, thread_name_prefix="promql")

    def submit(self, query: str) -> Future[Any]:
        """Run ``query`` on this endpoint's threads."""
        return self._threads.submit(self.query, query)

    def query(self, query: str) -> Any:
        """The ``data.result`` of one instant query; raises ``QueryFailed`` (never past the deadline
        by more than one read: each read returns what has arrived, and the clock is checked)."""
        timeout = self.endpoint.timeout
        deadline = time.monotonic() + timeout
        try:
            # A group query over many members can be long: past what proxies take in a URL, it
            # goes as a form (Prometheus takes both).
            form = {"query": query}
            short = len(query) <= MAX_URL_QUERY
            with self._session.request(
                "GET" if short else "POST",
                f"{self.endpoint.url}/api/v1/query",
                params=form if short else None,
                data=None if short else form,
                timeout=timeout,
                stream=True,
            ) as response:
                status = response.status_code
                try:
                    body = self._body(response, deadline)
                except urllib3.exceptions.TimeoutError as exc:
                    raise self.endpoint.no_answer() from exc
                except urllib3.exceptions.HTTPError as exc:  # a broken body
                    if status == 200:
                        raise QueryFailed(f"{self._where} sent a broken answer: {type(exc).__name__}") from exc
                    body = b""  # the status says what went wrong
        except requests.RequestException as exc:
            raise QueryFailed(f"{self._where} unreachable: {_why(exc, timeout)}") from exc
        if status != 200:
            raise QueryFailed(f"{self._where} answered {f'HTTP Status Code {status} ({body!r})'[:200]}")
        try:
            return json.loads(body)["data"]["result"]
        except ValueError as exc:
            raise QueryFailed(f"{self._where} sent a malformed answer: not JSON") from exc
        except (KeyError, TypeError) as exc:  # JSON without data.result
            raise QueryFailed(f"{self._where} sent a malformed answer: {type(exc).__name__}") from exc

    def _body(self, response: requests.Response, deadline: float) -> bytes:
        """The whole body, read as it arrives; past the deadline it is not waited for any more."""
        body = bytearray()
        while chunk := response.raw.read1(self.READ_SIZE, decode_content=True):
            body += chunk
            if time.monotonic() > deadline:
                raise self.endpoint.no_answer()  # a Prometheus that trickles bytes
        return bytes(body)


@dataclass(frozen=True)
class _Asked:
    """A query started: its (possibly shared) answer and how this asker's part is read from it."""

    endpoint: Endpoint
    answer: Future[Any]
    select: Callable[[Any], Any]

    def read(self) -> Answer:
        """The answer as it stands: one not in yet is ``no_answer`` (its deadline has passed)."""
        if not self.answer.done():
            return self.endpoint.no_answer()
        try:
            return self.select(self.answer.result())
        except QueryFailed as exc:
            return exc


def _landing(loop: asyncio.AbstractEventLoop, answer: Future[Any]) -> asyncio.Future[None]:
    """An asyncio future done when ``answer`` is. It never cancels ``answer`` (a group's answer is
    shared: one waiter giving up must not fail the others) and never holds its exception (the
    asker reads the answer itself), so nothing is logged as never retrieved."""
    landed: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not landed.done():
            landed.set_result(None)

    def done(_: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle)

    answer.add_done_callback(done)
    return landed


@dataclass
class _Flight:
    """One group query for these members, started at this time (members join until it is asked)."""

    answer: Future[Any]
    members: set[tuple[str, ...]]
    asked_at: float
    asked: bool = False
    took: float = 0.0  # seconds from asked to answered, once answered


@dataclass
class _Group:
    members: dict[tuple[str, ...], float] = field(default_factory=dict)  # member -> last asked for
    flight: _Flight | None = None  # the query started last (maybe still in flight)
    answered: _Flight | None = None  # the last query answered without error
    swept_at: float = -math.inf  # when members not heard of for long were last dropped


class PrometheusMetrics:
    """``MetricsSource`` over the Prometheus HTTP API.

    Queries of ModelBudgets on the same endpoint with the same shape (``grouping``) are asked as
    one group query, shared while it is in flight and reused for ``reuse_seconds`` after it was
    asked (the reconcile interval: then each group is asked once per tick, however many members
    it has). A member the last group query did not include asks a new one for everyone, after
    ``gather_seconds`` in which other newcomers join it (after a start, one query per template
    for many members, not one each). Each endpoint's queries run on a bounded pool of its own;
    each is answered or failed within ``timeoutSeconds``, and nobody holds a thread to wait.

    A group's answer is refreshed ahead of its expiry: a member served an answer that expires
    within about twice the time the last query took starts the next query and is answered from
    the current one. No answer is older than ``reuse_seconds``, and members do not wait for a
    slow group query (at N = 1000 one takes seconds) once per reuse period.
    """

    def __init__(
        self, reuse_seconds: float = 0.0, gather_seconds: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._reuse = reuse_seconds
        self._gather = gather_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._http: dict[Endpoint, PrometheusHttp] = {}
        self._groups: dict[tuple[Endpoint, GroupShape], _Group] = {}

    def _submit(self, endpoint: Endpoint, query: str) -> Future[Any]:
        with self._lock:
            http = self._http.get(endpoint)
            if http is None:
                http = self._http[endpoint] = PrometheusHttp(endpoint)
        QUERIES.inc()
        return http.submit(query)

    def _grouped(self, endpoint: Endpoint, shape: GroupShape, member: tuple[str, ...]) -> Future[Any]:
        now = self._clock()
        with self._lock:
            group = self._groups.setdefault((endpoint, shape), _Group())
            group.members[member] = now
            # Members not heard of for many reuse periods (deleted, moved) leave the group query;
            # "many": a saturated operator reconciles each one less often than every interval.
            # Swept once a reuse period, not on every call: a scan of a thousand members under
            # the lock on each of eleven queries per reconcile was most of a reconcile's wait.
            if now - group.swept_at >= self._reuse:
                group.swept_at = now
                gone = [m for m, seen in group.members.items() if now - seen > FORGET_AFTER_TICKS * self._reuse]
                for m in gone:
                    del group.members[m]
            fresh = group.answered
            if fresh is not None and member in fresh.members and now - fresh.asked_at <= self._reuse:
                flight, lead = group.flight, self._lead(fresh)
                # A refresh that failed is tried again a lead later, not by the next member at
                # once: at N = 1000 a group query that timed out was asked again by every
                # reconcile, each one loading Prometheus further (80 queries a tick, not 22).
                idle = flight is None or flight is fresh or (flight.answer.done() and now - flight.asked_at >= lead)
                ahead = None
                if idle and now - fresh.asked_at > self._reuse - lead:
                    ahead = group.flight = _Flight(Future(), set(group.members), now)
            else:
                fresh = None
        if fresh is not None:
            if ahead is not None:
                self._fly(endpoint, shape, group, ahead)
            return fresh.answer
        with self._lock:
            flight = group.flight
            if flight is not None and member in flight.members:
                if not flight.asked or not flight.answer.done() or now - flight.asked_at <= self._reuse:
                    return flight.answer
            elif flight is not None and not flight.asked:
                flight.members.add(member)  # still gathering: one query for every newcomer
                return flight.answer
            # Only a newcomer waits for company; a member set that is just due again asks at once.
            newcomer = flight is None or member not in flight.members
            group.flight = flight = _Flight(Future(), set(group.members), now)
        if newcomer and self._gather > 0:
            timer = threading.Timer(self._gather, self._fly, (endpoint, shape, group, flight))
            timer.daemon = True
            timer.start()
        else:
            self._fly(endpoint, shape, group, flight)
        return flight.answer

    def _lead(self, fresh: _Flight) -> float:
        """How long before its expiry a group's answer is refreshed: twice what the last query
        took, at least a quarter and at most half of the reuse period."""
        return min(max(2 * fresh.took, self._reuse / 4), self._reuse / 2)

    def _fly(self, endpoint: Endpoint, shape: GroupShape, group: _Group, flight: _Flight) -> None:
        """Ask a gathered flight's query; its future gets the group's answer."""
        with self._lock:
            flight.asked = True
            members = sorted(flight.members)
        asked = self._submit(endpoint, shape.query(members))

        def landed(done: Future[Any]) -> None:
            failed = done.exception()
            if failed is not None:
                flight.answer.set_exception(failed)
                return
            answer = GroupAnswer(shape, done.result())  # split by member once, outside the lock
            with self._lock:
                flight.took = self._clock() - flight.asked_at
                if group.answered is None or flight.asked_at >= group.answered.asked_at:
                    group.answered = flight
            flight.answer.set_result(answer)

        asked.add_done_callback(landed)

    def _ask(self, endpoint: Endpoint, query: str) -> _Asked:
        """Start one query now (or join its group's)."""
        grouped = split(query)
        if grouped is None:
            return _Asked(endpoint, self._submit(endpoint, query), lambda result: result)
        shape, member = grouped
        return _Asked(endpoint, self._grouped(endpoint, shape, member), lambda answered: answered.part(member))

    def runner(self, metrics: Metrics, credentials: PrometheusCredentials) -> QueryRunner:
        """Ungrouped instant queries against ``metrics.prometheusUrl`` on the same bounded pool and
        connections, each answered or failed within ``timeoutSeconds`` (``QueryFailed``)."""
        endpoint = Endpoint.of(metrics, credentials)

        def run(query: str) -> Any:
            asked = self._ask(endpoint, query)
            wait([asked.answer], timeout=endpoint.timeout)
            answer = asked.read()
            if isinstance(answer, QueryFailed):
                raise answer
            return answer

        return run

    async def sample(
        self, metrics: Metrics, namespace: str, target: str, credentials: PrometheusCredentials
    ) -> DemandSample:
        """The spec's queries, started at once and awaited without holding a thread: at N = 1,000
        a thread per waiting reconcile ran out while slow group queries were answered, and every
        other ModelBudget's reconcile queued behind them (tens of seconds)."""
        endpoint = Endpoint.of(metrics, credentials)
        asked = {name: self._ask(endpoint, q) for name, q in queries_for(metrics, namespace, target).items()}
        waiting = [a.answer for a in asked.values() if not a.answer.done()]
        if waiting:  # most answers are shared ones already in: no trip through the loop for those
            loop = asyncio.get_running_loop()
            await asyncio.wait([_landing(loop, answer) for answer in waiting], timeout=endpoint.timeout)
        return sample_from({name: a.read() for name, a in asked.items()})
