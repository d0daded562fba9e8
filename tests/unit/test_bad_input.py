"""Bad input through the reconciler with fakes: malformed specs, answers and stored state are
reported (a condition and an Event that say what to fix), never a crash, never a change in the
cluster, and never a hold-up for a healthy ModelBudget reconciled by the same process.

Also: Prometheus answers fuzzed (hypothesis) down to the HTTP body, 409 conflicts on every write,
and a hung Prometheus that must not starve the neighbours' apiserver calls or the lease.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock

import pytest
import requests
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from modelbudget.adapters.errors import Conflict
from modelbudget.adapters.metrics import MAX_PARALLEL_QUERIES, PrometheusCredentials, PrometheusMetrics, sample_with
from modelbudget.api.spec import Metrics
from modelbudget.controller.leader import LeaderElector
from modelbudget.controller.reconciler import ObjectRef, Reconciler, previous_status
from modelbudget.core.observation import DemandSample
from tests.builders import merge
from tests.unit.fakes import FakeCluster, FakeLeaseStore, demand, example_reconciler
from tests.unit.test_controller_reconcile import T0, Harness, demo_spec

POOL = demo_spec()["nodePools"][0]
REF_GOOD = ObjectRef("good", "llm", 1)

# (case, patch merged into a valid spec, a fragment of the message that says what to fix)
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("wrong type", {"replicas": {"min": "two", "max": 3}}, "replicas.min: Input should be a valid integer"),
    ("string ceiling", {"budget": {"ceiling": {"amount": "lots"}}}, "budget.ceiling.amount"),
    ("negative price", {"nodePools": [{**POOL, "pricePerGpuHour": -2}]}, "pricePerGpuHour: Input should be greater"),
    ("min > max", {"replicas": {"min": 5, "max": 2}}, "replicas.min must not exceed replicas.max"),
    ("pool min > max", {"nodePools": [{**POOL, "minNodes": 9, "maxNodes": 1}]}, "minNodes must not exceed maxNodes"),
    ("empty pools", {"nodePools": []}, "give at least one of nodePools or sharedPools"),
    ("absurd ceiling", {"budget": {"ceiling": {"amount": 1e12}}}, "amount: Input should be less than or equal to 1"),
    ("unknown field", {"surprise": True}, "surprise: Extra inputs are not permitted"),
    ("huge replicas", {"replicas": {"min": 1, "max": 10**12}}, "replicas.max: Input should be less than or equal"),
    ("NaN price", {"nodePools": [{**POOL, "pricePerGpuHour": float("nan")}]}, "pricePerGpuHour"),
    ("no curve", {"curve": None}, "curve: Input should be a valid dictionary"),
    ("bad window", {"metrics": {"window": "5 minutes"}}, "metrics.window: String should match pattern"),
    (
        "unfittable samples",
        {
            "curve": {
                "intercept": None,
                "slope": None,
                "samples": [{"tokens": t, "performance": p} for t, p in ((64, 0.6), (256, 0.5), (1024, 0.4))],
            }
        },
        "curve.samples:",
    ),
]


def spec_with(patch: dict[str, Any]) -> dict[str, Any]:
    spec = merge(demo_spec(), patch)
    for key, value in patch.items():
        if value is None:
            spec[key] = None
    # merge() keeps None for the curve's own fields; a spec from the apiserver has them absent.
    if isinstance(spec.get("curve"), dict):
        spec["curve"] = {k: v for k, v in spec["curve"].items() if v is not None}
    return spec


@dataclass
class ByNamespace:
    """A metrics source answering per namespace: the neighbour and the broken one share a process."""

    answers: dict[str, DemandSample | Exception] = field(default_factory=dict)

    async def sample(
        self, metrics: Metrics, namespace: str, target: str, credentials: PrometheusCredentials
    ) -> DemandSample:
        answer = self.answers[namespace]
        if isinstance(answer, Exception):
            raise answer
        return answer


def two_tenants(bad: DemandSample | Exception) -> tuple[FakeCluster, ByNamespace]:
    c = FakeCluster()
    c.pools.nodes = c.pools.sizes = {"gpu-pool": 1}
    c.tokens.limit = 8192
    source = ByNamespace({"good": demand(T0, rps=20), "bad": bad})
    c.metrics = source  # type: ignore[assignment]
    return c, source


async def reconcile_both(r: Reconciler, bad_spec: dict[str, Any]) -> tuple[Any, Any]:
    good = r.reconcile(ObjectRef("good", "llm", 1), demo_spec(), {}, None, T0)
    bad = r.reconcile(ObjectRef("bad", "llm", 1), bad_spec, {}, None, T0)
    results = await asyncio.gather(good, bad, return_exceptions=True)
    return results[0], results[1]


@pytest.mark.parametrize(("case", "patch", "fragment"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_spec_is_reported_and_the_neighbour_keeps_working(
    case: str, patch: dict[str, Any], fragment: str
) -> None:
    cluster, _ = two_tenants(demand(T0, rps=20))
    good, bad = asyncio.run(reconcile_both(example_reconciler(cluster.adapters), spec_with(patch)))
    assert not isinstance(bad, BaseException), bad
    ready = next(c for c in bad.status_patch["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert fragment in ready["message"], ready["message"]
    assert [(e.type, e.reason) for e in bad.events] == [("Warning", "InvalidSpec")]
    assert fragment in bad.events[0].message
    assert bad.actions == [] and bad.problems == ["InvalidSpec"]
    # The healthy neighbour, reconciled concurrently by the same Reconciler, acted as usual.
    assert not isinstance(good, BaseException), good
    assert good.actions and cluster.scaler.sets == [5]


ACCEPTED_BUT_BROKEN = [
    (
        "PromQL error",
        DemandSample(
            error='request rate: http://prom:9090 answered HTTP Status Code 400 (b\'{"errorType":"bad_data"}\')'
        ),
        "MetricsUnreachable",
        "bad_data",
    ),
    ("metrics adapter bug", RuntimeError("boom"), "MetricsUnreachable", "metrics source failed: RuntimeError"),
    ("absurd rate", DemandSample(at=T0, request_rate=1e12), "MetricsAbsurd", "not plausible"),
    ("negative rate", DemandSample(at=T0, request_rate=-3.0), "MetricsAbsurd", "not plausible"),
    ("empty answer", DemandSample(), "MetricsMissing", "no metrics sample"),
]


@pytest.mark.parametrize(
    ("case", "answer", "reason", "fragment"), ACCEPTED_BUT_BROKEN, ids=[a[0] for a in ACCEPTED_BUT_BROKEN]
)
def test_bad_metrics_are_reported_never_scaled_on_and_isolated(
    case: str, answer: DemandSample | Exception, reason: str, fragment: str
) -> None:
    cluster, _ = two_tenants(answer)
    r = example_reconciler(cluster.adapters)
    bad = asyncio.run(r.reconcile(ObjectRef("bad", "llm", 1), demo_spec(), {}, None, T0))
    assert cluster.scaler.sets == [] and cluster.pools.resizes == []  # blind: no scale-up
    conditions = {c["type"]: c for c in bad.status_patch["conditions"]}
    assert conditions["MetricsAvailable"]["reason"] == reason
    assert fragment in conditions["MetricsAvailable"]["message"]
    assert conditions["Ready"]["reason"] == "MetricsUnavailable"
    assert [e.reason for e in bad.events if e.type == "Warning"] == ["MetricsUnavailable"]
    assert fragment in next(e.message for e in bad.events if e.reason == "MetricsUnavailable")
    good = asyncio.run(r.reconcile(ObjectRef("good", "llm", 1), demo_spec(), {}, None, T0))
    assert cluster.scaler.sets == [5] and good.problems == []


def test_a_missing_secret_names_the_secret_to_create() -> None:
    cluster, _ = two_tenants(demand(T0, rps=20))
    spec = merge(demo_spec(), {"metrics": {"auth": {"basicAuthSecretRef": "prom-auth"}}})
    out = asyncio.run(example_reconciler(cluster.adapters).reconcile(ObjectRef("bad", "llm", 1), spec, {}, None, T0))
    metrics = next(c for c in out.status_patch["conditions"] if c["type"] == "MetricsAvailable")
    assert metrics["reason"] == "MetricsUnreachable"
    assert "Secret bad/prom-auth has no key 'username'" in metrics["message"]
    assert cluster.writes() == 0


@pytest.mark.parametrize(
    "stored",
    [
        {"controllerState": {"ledger": {"spent": "a lot"}}},
        {"conditions": "all good"},
        {"plan": {"replicas": -1}, "observedGeneration": "x"},
    ],
)
def test_a_corrupt_stored_status_is_started_afresh(stored: dict[str, Any]) -> None:
    cluster, _ = two_tenants(demand(T0, rps=20))
    out = asyncio.run(
        example_reconciler(cluster.adapters).reconcile(ObjectRef("good", "llm", 1), demo_spec(), stored, None, T0)
    )
    assert (
        out.status_patch is not None
        and out.reconciled is not None
        and out.reconciled.decision.next_state.ledger is not None
    )
    assert cluster.scaler.sets == [5]


LEDGER = {"periodStart": "2026-11-23T12:00:00Z", "spent": 3.5, "accruedAt": "2026-11-23T12:00:00Z", "ratePerHour": 8.0}


@pytest.mark.parametrize(
    "stored",
    [
        # written by a newer operator: fields this version does not know, at every level
        {"controllerState": {"ledger": {**LEDGER, "currency": "USD"}, "newThing": 1}, "futureField": {"a": 1}},
        # another section broken beyond repair: the ledger is still kept
        {"controllerState": {"ledger": LEDGER}, "conditions": "all good"},
    ],
)
def test_the_ledger_survives_a_status_from_another_version(stored: dict[str, Any]) -> None:
    before, _ = previous_status(stored)
    assert before.controller_state.ledger is not None and before.controller_state.ledger.spent == 3.5


# --- Prometheus answers, fuzzed --------------------------------------------------------------

METRICS = Metrics.model_validate({"prometheusUrl": "http://prom:9090"})
numbers = hs.sampled_from(["NaN", "+Inf", "-Inf", "1e400", "-1", "0", "3.5", "1767614400", "x", ""]) | hs.floats()
json_leaf = hs.none() | hs.booleans() | hs.integers() | hs.floats() | hs.text(max_size=5) | numbers
json_any = hs.recursive(
    json_leaf,
    lambda c: hs.lists(c, max_size=3) | hs.dictionaries(hs.sampled_from(["metric", "value", "le"]), c, max_size=3),
    max_leaves=8,
)
series = hs.fixed_dictionaries(
    {},
    optional={
        "metric": hs.dictionaries(hs.sampled_from(["le", "pod"]), json_leaf, max_size=2) | json_any,
        "value": hs.tuples(numbers | json_leaf, numbers | json_leaf).map(list) | json_any,
    },
)
answers = hs.lists(series, max_size=4) | json_any


@settings(max_examples=400, deadline=None)
@given(rate=answers, rest=hs.lists(answers, min_size=10, max_size=10))  # one answer per query after the rate
def test_any_query_answer_becomes_a_sample_never_an_exception(rate: Any, rest: list[Any]) -> None:
    replies = iter([rate, *rest])
    s = sample_with(lambda q: next(replies), METRICS, "demo", "demo-llm")
    assert s.error is not None or s.request_rate is None or s.at is not None
    for value in (s.prompt_tokens_per_request, s.generated_tokens_per_request, s.requests_waiting):
        assert value is None or value == value  # never NaN: unknown is None


def canned(status: int, body: bytes) -> Any:
    """A stand-in for ``HTTPAdapter.send`` that answers every request with one HTTP response."""

    def send(adapter: Any, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        response = requests.Response()
        response.status_code, response.request = status, request
        response.raw = urllib3.HTTPResponse(body=io.BytesIO(body), status=status, preload_content=False)
        response.url = request.url or ""
        return response

    return send


bodies = (
    hs.binary(max_size=64)
    | json_any.map(lambda v: json.dumps(v).encode())
    | hs.builds(
        lambda r: json.dumps({"status": "success", "data": {"resultType": "vector", "result": r}}).encode(), answers
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=hs.sampled_from([200, 200, 200, 204, 400, 401, 422, 500, 503]), body=bodies)
def test_any_http_answer_from_prometheus_becomes_a_sample(status: int, body: bytes) -> None:
    # At the transport, under the adapter's own session.
    with mock.patch.object(requests.adapters.HTTPAdapter, "send", canned(status, body)):
        s = asyncio.run(
            PrometheusMetrics().sample(METRICS, "demo", "demo-llm", PrometheusCredentials(bearer_token="t0ken"))
        )
    if status != 200:
        assert s.error is not None and f"HTTP Status Code {status}" in s.error
    assert s.error is None or ("t0ken" not in s.error and "unreachable" not in s.error)


# --- 409 conflicts on every write ------------------------------------------------------------


def conflict() -> Conflict:
    return Conflict("someone else wrote it first: HTTP 409 Conflict")


def test_conflicts_on_writes_are_reported_retried_and_applied_once() -> None:
    cluster = FakeCluster()
    cluster.pools.nodes = cluster.pools.sizes = {"gpu-pool": 1}
    cluster.tokens.limit = 8192
    cluster.metrics.next = demand(T0, rps=20)
    h = Harness(cluster, demo_spec())
    with (
        mock.patch.object(cluster.scaler, "set_replicas", side_effect=conflict()),
        mock.patch.object(cluster.pools, "resize", side_effect=conflict()),
    ):
        out = h.tick(T0)
    assert out.actions and all(a.knob.value == "TokenLimit" for a in out.actions)
    assert h.condition("Degraded")["reason"] == "ActuationFailed"
    assert "HTTP 409 Conflict" in h.condition("Degraded")["message"]
    assert [e.reason for e in out.events if e.type == "Warning"] == ["ActuationFailed"]
    # The conflict clears: the next tick applies each change once, the one after applies none.
    for t in (15, 16):
        cluster.metrics.next = demand(T0 + timedelta(seconds=t), rps=20)
        h.tick(T0 + timedelta(seconds=t))
    assert cluster.scaler.sets == [5] and len(cluster.pools.resizes) == 1
    assert h.condition("Degraded")["status"] == "False"


# --- a hung Prometheus must not starve anyone else ---------------------------------------------


@dataclass
class HungFor:
    """Metrics that hang (like a Prometheus that accepts and never answers) for some namespaces."""

    hung: set[str]
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def sample(
        self, metrics: Metrics, namespace: str, target: str, credentials: PrometheusCredentials
    ) -> DemandSample:
        if namespace in self.hung:
            await asyncio.wait_for(self.release.wait(), 30)
            return DemandSample(error="request rate: unreachable: ReadTimeout")
        return demand(T0, rps=20)


def test_hung_prometheus_calls_do_not_stall_a_neighbour() -> None:
    cluster, _ = two_tenants(demand(T0, rps=20))
    # More ModelBudgets on a hung Prometheus than asyncio's default executor has threads (6 on 2
    # cores): were their waits on it, the neighbour's apiserver calls would wait 30 s.
    hung = HungFor({f"hung-{i}" for i in range(4 * MAX_PARALLEL_QUERIES)})
    cluster.metrics = hung  # type: ignore[assignment]
    r = example_reconciler(cluster.adapters)

    async def scenario() -> float:
        stuck = [
            asyncio.create_task(r.reconcile(ObjectRef(ns, "llm", 1), demo_spec(), {}, None, T0)) for ns in hung.hung
        ]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        good = await asyncio.wait_for(r.reconcile(REF_GOOD, demo_spec(), {}, None, T0), timeout=10)
        took = time.monotonic() - started
        hung.release.set()
        await asyncio.gather(*stuck)
        assert good.actions
        return took

    assert asyncio.run(scenario()) < 2


def test_the_lease_is_renewed_while_every_default_thread_is_busy() -> None:
    store = FakeLeaseStore()
    elector = LeaderElector(store, "me", lease_duration=3, renew_deadline=2, retry_period=0.1)
    release = threading.Event()

    async def scenario() -> bool:
        # Reconciles stuck in apiserver or Prometheus calls hold every default-executor thread.
        blockers = [asyncio.create_task(asyncio.to_thread(release.wait, 30)) for _ in range(32)]
        election = asyncio.create_task(elector.run())
        await asyncio.sleep(3)  # longer than renew_deadline
        leading = elector.is_leader
        release.set()
        election.cancel()
        await asyncio.gather(*blockers, election, return_exceptions=True)
        return leading

    assert asyncio.run(scenario())
    assert store.version > 10  # renewed all along, not just acquired once


def test_concurrent_queries_to_one_prometheus_reuse_their_connections(caplog: pytest.LogCaptureFixture) -> None:
    """More queries at once than the adapter runs in parallel: none may find the connection pool
    full (urllib3 then opens a connection per query and drops it, as bench/scale.py showed)."""

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like Prometheus

        def do_GET(self) -> None:
            time.sleep(0.05)  # long enough for all queries to be in flight together
            body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        m = Metrics.model_validate({"prometheusUrl": f"http://127.0.0.1:{server.server_address[1]}"})
        source = PrometheusMetrics()

        async def many() -> list[DemandSample]:
            asks = (source.sample(m, "demo", "demo-llm", PrometheusCredentials()) for _ in range(64))
            return list(await asyncio.gather(*asks))

        samples = asyncio.run(many())
    finally:
        server.shutdown()
        server.server_close()
    assert all(s.error is None for s in samples)
    assert "Connection pool is full" not in caplog.text
