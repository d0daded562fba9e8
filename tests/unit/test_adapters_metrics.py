"""Prometheus answers of every kind become explicit unknowns, never exceptions or scale-ups."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import kmock
import numpy as np
import pytest

from modelbudget.adapters.metrics import (
    PrometheusCredentials,
    PrometheusMetrics,
    QueryFailed,
    parse_buckets,
    parse_scalar,
    redact_url,
    render_query,
    sample_with,
)
from modelbudget.api.spec import Metrics
from modelbudget.api.status import DemandSource
from modelbudget.core.observation import GateReport

TS = 1_767_614_400.0  # 2026-01-05T12:00:00Z


def vec(*values: str, **labels: str) -> list[dict[str, Any]]:
    return [{"metric": dict(labels), "value": [TS, v]} for v in values]


def metrics(url: str = "http://prom:9090", **extra: Any) -> Metrics:
    return Metrics.model_validate({"prometheusUrl": url, **extra})


def test_queries_get_selector_window_and_namespace() -> None:
    m = metrics(window="30s")
    q = render_query(m.queries.request_rate, m, "demo", "demo-llm")
    assert q == 'sum(rate(vllm:request_success_total{namespace="demo"}[30s]))'


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ([], (None, None)),
        (vec("3.5"), (3.5, TS)),
        (vec("1", "2"), (3.0, TS)),
        (vec("NaN"), (None, TS)),
        (vec("1", "NaN"), (None, TS)),
        (vec("+Inf"), (math.inf, TS)),  # kept: the core's verdict calls it absurd
        (vec("not-a-number"), (None, TS)),
    ],
)
def test_parse_scalar(answer: Any, expected: tuple[float | None, float | None]) -> None:
    assert parse_scalar(answer) == expected


@pytest.mark.parametrize("garbage", [{"resultType": "matrix"}, "<html>", [{"metric": {}}], [{"value": ["x", "1"]}]])
def test_parse_scalar_rejects_garbage(garbage: Any) -> None:
    with pytest.raises(QueryFailed):
        parse_scalar(garbage)


def test_parse_buckets_sorts_and_drops_nan() -> None:
    answer = [
        {"metric": {"le": "+Inf"}, "value": [TS, "10"]},
        {"metric": {"le": "100"}, "value": [TS, "6"]},
        {"metric": {"le": "50"}, "value": [TS, "NaN"]},
        {"metric": {}, "value": [TS, "1"]},
    ]
    assert parse_buckets(answer) == [(100.0, 6.0), (math.inf, 10.0)]


class Canned:
    """A query runner answering by the first key contained in the query."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    def __call__(self, query: str) -> Any:
        self.queries.append(query)
        for key, answer in self.answers.items():
            if key in query:
                if isinstance(answer, Exception):
                    raise answer
                return answer
        return []


def test_sample_turns_rates_into_per_request_figures() -> None:
    run = Canned(
        {
            'finished_reason="length"': vec("1"),
            "request_success_total": vec("4"),
            "prompt_tokens_total": vec("800"),
            "generation_tokens_total": vec("1600"),
            "request_generation_tokens_bucket": [
                {"metric": {"le": le}, "value": [TS, c]} for le, c in (("200", "1"), ("500", "3"), ("+Inf", "4"))
            ],
            "num_requests_waiting": vec("2"),
        }
    )
    s = sample_with(run, metrics(), "demo", "demo-llm")
    assert s.error is None and s.request_rate == 4.0
    assert s.prompt_tokens_per_request == 200.0 and s.generated_tokens_per_request == 400.0
    assert s.requests_waiting == 2.0
    assert s.generation is not None and float(np.mean(s.generation.wanted > 1e9)) == pytest.approx(0.25, abs=0.02)
    assert s.at is not None and s.at.timestamp() == TS


def test_the_slo_latencies_are_read_from_vllms_histograms() -> None:
    run = Canned(
        {
            "request_success_total": vec("4"),
            "time_to_first_token_seconds_bucket": vec("0.8"),
            "time_per_output_token_seconds_bucket": vec("0.045"),
            "e2e_request_latency_seconds_bucket": vec("12"),
        }
    )
    s = sample_with(run, metrics(), "demo", "demo-llm")
    assert (s.latency_p95_seconds, s.time_to_first_token_p95_seconds, s.time_per_output_token_p95_seconds) == (
        12.0,
        0.8,
        0.045,
    )
    assert any(q.startswith("histogram_quantile(0.95") and "time_to_first_token" in q for q in run.queries)
    # Without those series (an older server) they are unknown, not an error.
    bare = sample_with(Canned({"request_success_total": vec("4")}), metrics(), "demo", "demo-llm")
    assert bare.error is None and bare.time_per_output_token_p95_seconds is None


def test_demand_comes_from_the_gates_when_they_report_and_per_request_figures_from_the_server() -> None:
    server_only = {"request_success_total": vec("4"), "generation_tokens_total": vec("1600")}
    s = sample_with(Canned(server_only), metrics(), "demo", "demo-llm")
    assert (s.demand_source, s.request_rate) == (DemandSource.SERVER, 4.0)
    assert s.gates == GateReport(())  # asked, and no gate answered
    gated = Canned(
        {
            "modelbudget_gate_arrivals_total": vec("6"),  # 2 req/s more arrive than complete: a queue builds
            "modelbudget_gate_token_limit": [vec("512")[0], vec("512")[0], vec("1024")[0]],
            **server_only,
        }
    )
    s = sample_with(gated, metrics(), "demo", "demo-llm")
    assert (s.demand_source, s.request_rate) == (DemandSource.GATE, 6.0)
    assert s.generated_tokens_per_request == 400.0  # server tokens over server completions, never mixed
    assert s.gates is not None and sorted(s.gates.applied_limits) == [512.0, 512.0, 1024.0]
    assert any('target="demo-llm"' in q and 'namespace="demo"' in q for q in gated.queries)


def test_a_failing_gate_query_is_unknown_not_no_gate() -> None:
    run = Canned({"modelbudget_gate_token_limit": QueryFailed("bad_data"), "request_success_total": vec("4")})
    s = sample_with(run, metrics(), "demo", "demo-llm")
    assert s.gates == GateReport(error="bad_data")


def test_no_series_is_missing_not_an_error() -> None:
    s = sample_with(Canned({}), metrics(), "demo", "demo-llm")
    assert s.error is None and s.at is None and s.request_rate is None


def test_a_failing_rate_query_is_an_error_and_a_failing_secondary_one_is_unknown() -> None:
    s = sample_with(Canned({"request_success_total": QueryFailed("down")}), metrics(), "demo", "demo-llm")
    assert s.error == "request rate: down"
    s = sample_with(
        Canned({"prompt_tokens": QueryFailed("x"), "request_success_total": vec("1")}), metrics(), "demo", "demo-llm"
    )
    assert s.error is None and s.prompt_tokens_per_request is None
    assert s.unread == ("promptTokensRate: x",)  # reported, not silently unknown


def test_only_failed_secondary_queries_are_unread_not_empty_ones() -> None:
    s = sample_with(
        Canned({"modelbudget_gate_arrivals_total": QueryFailed("bad_data"), "request_success_total": vec("1")}),
        metrics(),
        "demo",
        "demo-llm",
    )
    assert s.demand_source is DemandSource.SERVER and s.unread == ("gateArrivalRate: bad_data",)
    assert sample_with(Canned({"request_success_total": vec("1")}), metrics(), "demo", "demo-llm").unread == ()


def test_zero_demand_has_no_per_request_figures() -> None:
    s = sample_with(
        Canned({"request_success_total": vec("0"), "generation_tokens_total": vec("0")}), metrics(), "demo", "demo-llm"
    )
    assert s.request_rate == 0.0 and s.generated_tokens_per_request is None and s.generation is None


def test_urls_lose_their_credentials_in_messages() -> None:
    assert redact_url("https://user:pw@prom.example:9090/x?token=1") == "https://prom.example:9090/x"


# A grouped query's answer carries the grouping labels: the series of namespace "demo".
OK = {
    "status": "success",
    "data": {"resultType": "vector", "result": [{"metric": {"namespace": "demo"}, "value": [TS, "2.5"]}]},
}


@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.RawHandler)
async def test_prometheus_client_sends_auth_and_parses(kmock: kmock.RawHandler) -> None:
    kmock["get /api/v1/query"] << OK
    creds = PrometheusCredentials(bearer_token="t0ken")
    s = await PrometheusMetrics().sample(metrics(str(kmock.url)), "demo", "demo-llm", creds)
    assert s.error is None and s.request_rate == 2.5
    sent = kmock["get /api/v1/query"]
    assert all(r.headers["Authorization"] == "Bearer t0ken" for r in sent)
    queries = [r.params["query"] for r in sent]
    assert 'sum by (namespace) (rate(vllm:request_success_total{namespace="demo"}[2m]))' in queries


@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.RawHandler)
@pytest.mark.parametrize("reply", [b"<html>oops</html>", {"status": "success"}, {"data": {"result": "x"}}])
async def test_prometheus_garbage_is_an_error(kmock: kmock.RawHandler, reply: Any) -> None:
    kmock["get /api/v1/query"] << reply
    s = await PrometheusMetrics().sample(metrics(str(kmock.url)), "demo", "demo-llm", PrometheusCredentials())
    assert s.error is not None and s.request_rate is None


@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.RawHandler)
async def test_prometheus_http_error_is_an_error(kmock: kmock.RawHandler) -> None:
    kmock["get /api/v1/query"] << 503 << b"overloaded"
    s = await PrometheusMetrics().sample(metrics(str(kmock.url)), "demo", "demo-llm", PrometheusCredentials())
    assert s.error is not None and "503" in s.error


def test_unreachable_prometheus_is_an_error_without_credentials() -> None:
    m = metrics("http://user:hunter2@127.0.0.1:9", timeoutSeconds=1)
    s = asyncio.run(
        PrometheusMetrics().sample(m, "demo", "demo-llm", PrometheusCredentials(basic_auth=("user", "hunter2")))
    )
    assert s.error is not None and "unreachable" in s.error and "hunter2" not in s.error
