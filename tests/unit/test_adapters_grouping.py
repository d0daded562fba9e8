"""Batched observation: one query per template and Prometheus for many ModelBudgets, fanned out,
and every query bounded by a whole-query deadline."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelbudget.adapters.grouping import GroupAnswer, split
from modelbudget.adapters.metrics import (
    FORGET_AFTER_TICKS,
    MAX_PARALLEL_QUERIES,
    Endpoint,
    PrometheusCredentials,
    PrometheusHttp,
    PrometheusMetrics,
    queries_for,
)
from modelbudget.api.spec import Metrics
from modelbudget.core.observation import DemandSample

TS = 1_767_614_400.0
SELECTOR = 'namespace="$namespace",model_name="$target"'


def member_metrics(url: str = "http://prom:9090", **extra: Any) -> Metrics:
    return Metrics.model_validate({"prometheusUrl": url, "selector": SELECTOR, **extra})


def test_every_default_query_is_grouped_by_its_equality_labels() -> None:
    for query in queries_for(member_metrics(), "team-a", "llm-1").values():
        found = split(query)
        assert found is not None, query
        shape, member = found
        assert "team-a" in member
        # The group asked for this member alone is the member's own query, grouped by its labels.
        assert shape.query([member]).replace(", ".join(shape.labels) + ", ", "").count("{") == 1


@pytest.mark.parametrize(
    ("query", "grouped"),
    [
        (
            'sum(rate(x_total{namespace="a",model_name="m"}[2m]))',
            'sum by (namespace, model_name) (rate(x_total{namespace=~"a|b",model_name="m"}[2m]))',
        ),
        (
            'histogram_quantile(0.95, sum by (le) (rate(h_bucket{namespace="a",code!="500"}[30s])))',
            'histogram_quantile(0.95, sum by (le, namespace) (rate(h_bucket{code!="500",namespace=~"a|b"}[30s])))',
        ),
        ('limit{namespace="a",target="t"}', 'limit{namespace=~"a|b",target="t"}'),
    ],
)
def test_group_query_asks_for_every_member(query: str, grouped: str) -> None:
    found = split(query)
    assert found is not None
    shape, member = found
    other = tuple("b" if v == "a" else v for v in member)
    assert shape.query([member, other]) == grouped


def test_dots_in_values_are_literal_in_the_group_regex() -> None:
    found = split('sum(x{model_name="llama-3.1"})')
    assert found is not None
    assert found[0].query([("llama-3.1",), ("qwen",)]) == 'sum by (model_name) (x{model_name=~"llama-3\\\\.1|qwen"})'


@pytest.mark.parametrize(
    "query",
    [
        'sum(rate(a{namespace="x"}[2m])) / sum(rate(b{namespace="x"}[2m]))',  # two selectors
        'sum(rate(a{namespace=~"x.*"}[2m]))',  # nothing to group by
        'sum by (pod) (rate(a{namespace="x"}[2m]))',  # an aggregation of its own
        'max(a{namespace="x"})',  # not a sum: max by is not the member's max
        'sum(a{namespace="x",namespace="y"})',  # one label matched twice
        'sum(a{namespace="x y"})',  # a value that is not plain
        'sum(rate(a{namespace="x"}[2m] offset 5m))',
        "sum(a)",
    ],
)
def test_shapes_that_cannot_be_grouped_are_asked_alone(query: str) -> None:
    assert split(query) is None


def test_select_keeps_only_the_members_series() -> None:
    found = split('sum(x{namespace="a"})')
    assert found is not None
    shape, member = found
    answer = [
        {"metric": {"namespace": "a"}, "value": [TS, "1"]},
        {"metric": {"namespace": "b"}, "value": [TS, "2"]},
        {"metric": {"namespace": "c", "pod": "x"}, "value": [TS, "3"]},
    ]
    assert shape.select(answer, member) == answer[:1]
    garbage = [{"metric": {}, "value": [TS, "1e15"]}, {"value": [TS, "3"]}, {"metric": {"namespace": "b"}}, "x"]
    assert shape.select(garbage, member) == garbage  # for the parser to reject, not "no series"
    assert shape.select("garbage", member) == "garbage"  # for the parser to reject


_LABEL_VALUE = st.sampled_from(["a", "b", "m", 1, None])
_ITEM = st.one_of(
    st.fixed_dictionaries(
        {"metric": st.dictionaries(st.sampled_from(["namespace", "model_name", "pod"]), _LABEL_VALUE)},
        optional={"value": st.just([TS, "1"])},
    ),
    st.just("x"),
    st.just({"value": [TS, "2"]}),
)


@given(answer=st.one_of(st.lists(_ITEM, max_size=8), st.just("garbage")), member=st.sampled_from(["a", "b", "d"]))
def test_an_answer_split_once_gives_each_member_what_select_gives(answer: Any, member: str) -> None:
    found = split(f'sum(rate(x{{namespace="{member}",model_name="m"}}[2m]))')
    assert found is not None
    shape, values = found
    split_once = GroupAnswer(shape, answer)
    for other in (values, ("a", "m"), ("b", "m"), ("zz", "m")):
        scanned = shape.select(answer, other)
        assert split_once.part(other) == (
            [shape.own(item) for item in scanned] if isinstance(answer, list) else scanned
        )


@pytest.mark.parametrize(
    ("query", "series", "own"),
    [
        # Under an aggregation the member's own query carries none of the group's labels ...
        ('sum(rate(x{namespace="a",model_name="m"}[2m]))', {"namespace": "a", "model_name": "m"}, {}),
        (
            'sum by (le) (rate(h_bucket{namespace="a",model_name="m"}[2m]))',
            {"le": "500", "namespace": "a", "model_name": "m"},
            {"le": "500"},
        ),
        # ... and a bare selector all of its series' labels.
        ('limit{namespace="a",pod_role="gate"}', {"namespace": "a", "pod_role": "gate", "pod": "p1"}, None),
    ],
)
def test_a_member_reads_its_series_as_its_own_query_would_answer_them(
    query: str, series: dict[str, str], own: dict[str, str] | None
) -> None:
    found = split(query)
    assert found is not None
    shape, member = found
    other = {**series, **dict.fromkeys(shape.labels, "b")}
    answer = [{"metric": series, "value": [TS, "1"]}, {"metric": other, "value": [TS, "2"]}]
    assert GroupAnswer(shape, answer).part(member) == [{"metric": series if own is None else own, "value": [TS, "1"]}]


def sample_now(source: PrometheusMetrics, m: Metrics, namespace: str) -> DemandSample:
    """One ModelBudget's sample, as a reconcile awaits it (on a loop of the calling thread)."""
    return asyncio.run(source.sample(m, namespace, "llm", PrometheusCredentials()))


class FakePrometheus:
    """A real HTTP server answering every query with one series per namespace in ``rates``
    (labelled as every default query groups them), recording the queries."""

    def __init__(self, rates: dict[str, float], status: int = 200) -> None:
        self.rates, self.status = rates, status
        self.queries: list[str] = []
        self.methods: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                form = self.rfile.read(int(self.headers["Content-Length"])).decode()
                self.answer(urllib.parse.parse_qs(form)["query"][0])

            def do_GET(self) -> None:
                self.answer(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["query"][0])

            def answer(self, query: str) -> None:
                fake.queries.append(query)
                fake.methods.append(self.command)
                series = [
                    {
                        "metric": {"namespace": ns, "model_name": "llm", "target": "llm", "le": "+Inf"},
                        "value": [time.time(), str(rate)],
                    }
                    for ns, rate in fake.rates.items()
                ]
                body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": series}}).encode()
                self.send_response(fake.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus({"a": 1.0, "b": 2.0, "c": 3.0})
    yield fake
    fake.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_members_share_one_query_per_template_per_tick(prometheus: FakePrometheus) -> None:
    clock = Clock()
    source = PrometheusMetrics(reuse_seconds=15, clock=clock)
    m = member_metrics(prometheus.url)
    templates = len(queries_for(m, "a", "llm"))

    def tick() -> dict[str, float | None]:
        return {ns: sample_now(source, m, ns).request_rate for ns in "abc"}

    # The first tick meets the members one by one: each newcomer asks again, for everyone so far.
    assert tick() == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert len(prometheus.queries) == 3 * templates
    # Within the interval every member is answered from the group's query: nothing is asked.
    clock.now += 5
    assert tick() == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert len(prometheus.queries) == 3 * templates
    # The next tick: one query per template, for all three.
    clock.now += 15
    assert tick() == {"a": 1.0, "b": 2.0, "c": 3.0}
    last = prometheus.queries[3 * templates :]
    assert len(last) == templates and all('namespace=~"a|b|c"' in q for q in last)


def test_an_answer_about_to_expire_is_refreshed_while_members_are_answered_from_it(
    prometheus: FakePrometheus,
) -> None:
    clock = Clock()
    source = PrometheusMetrics(reuse_seconds=15, clock=clock)
    m = member_metrics(prometheus.url)
    templates = len(queries_for(m, "a", "llm"))

    def rate(ns: str) -> float | None:
        return sample_now(source, m, ns).request_rate

    assert rate("a") == 1.0
    prometheus.rates["a"] = 10.0
    # 12 s on, the answer expires within the refresh lead (a quarter of the 15 s reuse): the member
    # is answered at once from it (no wait for Prometheus), and the next query starts behind it.
    clock.now += 12
    assert rate("a") == 1.0
    deadline = time.monotonic() + 5
    while rate("a") != 10.0 and time.monotonic() < deadline:  # the old answer until the new one lands
        time.sleep(0.01)
    assert rate("a") == 10.0
    assert len(prometheus.queries) == 2 * templates  # one refresh, however often it was read meanwhile
    # Past the first answer's expiry, the refreshed one serves: nothing is asked, nothing waits.
    clock.now += 5
    assert rate("a") == 10.0
    assert len(prometheus.queries) == 2 * templates


def test_a_refresh_that_failed_is_not_asked_again_by_every_member(prometheus: FakePrometheus) -> None:
    clock = Clock()
    source = PrometheusMetrics(reuse_seconds=15, clock=clock)
    m = member_metrics(prometheus.url)
    templates = len(queries_for(m, "a", "llm"))
    assert sample_now(source, m, "a").request_rate == 1.0
    prometheus.status = 500
    clock.now += 12  # within the refresh lead: this read starts a refresh, which fails
    assert sample_now(source, m, "a").request_rate == 1.0
    deadline = time.monotonic() + 5
    while len(prometheus.queries) < 2 * templates and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the failures land
    # The member goes on reading the answer it has; the failed refresh is not asked again at once.
    for _ in range(5):
        assert sample_now(source, m, "a").request_rate == 1.0
    assert len(prometheus.queries) == 2 * templates
    prometheus.status = 200
    clock.now += 4  # past the first answer's expiry, the failure serves for its tick, as any does
    assert sample_now(source, m, "a").error is not None
    assert len(prometheus.queries) == 2 * templates
    clock.now += 12  # the failed refresh's tick is over: asked again
    assert sample_now(source, m, "a").request_rate == 1.0
    assert len(prometheus.queries) == 3 * templates


def test_a_member_not_heard_of_for_long_leaves_the_group_query(prometheus: FakePrometheus) -> None:
    clock = Clock()
    source = PrometheusMetrics(reuse_seconds=15, clock=clock)
    m = member_metrics(prometheus.url)
    for ns in "abc":
        sample_now(source, m, ns)
    assert 'namespace=~"a|b|c"' in prometheus.queries[-1]
    # c is deleted: a and b go on ticking; once c has been silent for FORGET_AFTER_TICKS reuse
    # periods, the group query asks for a and b only.
    for _ in range(FORGET_AFTER_TICKS + 2):
        clock.now += 15
        for ns in "ab":
            sample_now(source, m, ns)
    assert 'namespace=~"a|b"' in prometheus.queries[-1]


def test_a_failing_group_query_fails_every_member_once_per_tick() -> None:
    fake = FakePrometheus({"a": 1.0}, status=500)
    try:
        clock = Clock()
        source = PrometheusMetrics(reuse_seconds=15, clock=clock)
        m = member_metrics(fake.url)
        for ns in "abc":
            sample_now(source, m, ns)
        asked = len(fake.queries)
        clock.now += 1
        errors = [sample_now(source, m, ns).error for ns in "abc"]
    finally:
        fake.close()
    assert all(e is not None and "HTTP Status Code 500" in e for e in errors)
    assert len(fake.queries) == asked


def test_newcomers_gather_into_one_query(prometheus: FakePrometheus) -> None:
    source = PrometheusMetrics(reuse_seconds=15, gather_seconds=0.5)
    m = member_metrics(prometheus.url)
    with ThreadPoolExecutor(3) as pool:
        rates = list(pool.map(lambda ns: sample_now(source, m, ns).request_rate, "abc"))
    assert rates == [1.0, 2.0, 3.0]
    assert len(prometheus.queries) == len(queries_for(m, "a", "llm"))
    assert all('namespace=~"a|b|c"' in q for q in prometheus.queries)


def test_a_member_the_group_does_not_know_yet_asks_at_once(prometheus: FakePrometheus) -> None:
    clock = Clock()
    source = PrometheusMetrics(reuse_seconds=15, clock=clock)
    m = member_metrics(prometheus.url)
    sample_now(source, m, "a")
    asked = len(prometheus.queries)
    assert sample_now(source, m, "c").request_rate == 3.0
    assert len(prometheus.queries) == 2 * asked and 'namespace=~"a|c"' in prometheus.queries[-1]


def test_a_long_group_query_is_posted(prometheus: FakePrometheus) -> None:
    found = split('sum(rate(vllm:request_success_total{namespace="a"}[2m]))')
    assert found is not None
    members = [(f"team-{i:04d}-inference",) for i in range(300)] + [("a",)]
    query = found[0].query(members)
    endpoint = Endpoint(prometheus.url, PrometheusCredentials(), False, 5.0)
    answer = PrometheusHttp(endpoint).query(query)
    assert prometheus.methods == ["POST"] and prometheus.queries == [query]
    assert found[0].select(answer, ("a",))[0]["value"][1] == "1.0"


def trickling_server(stop: threading.Event) -> int:
    """Answers every request with headers at once, then one byte of body every 0.1 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()
        listener.close()

    def trickle(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for byte in body:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.1)

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


def test_a_trickling_prometheus_does_not_hold_a_query_past_its_timeout() -> None:
    stop = threading.Event()
    port = trickling_server(stop)
    try:
        m = member_metrics(f"http://127.0.0.1:{port}", timeoutSeconds=1)
        started = time.monotonic()
        s = sample_now(PrometheusMetrics(), m, "a")
        took = time.monotonic() - started
    finally:
        stop.set()
    # The body would take ~6 s at this pace; every read is quick, so only a deadline stops it.
    assert s.error is not None and "no answer within 1s" in s.error
    assert took < 1.5  # timeoutSeconds is the functional bound; 0.5 s for the threads to wake


def test_a_hung_prometheus_holds_neither_threads_nor_another_prometheus_up(prometheus: FakePrometheus) -> None:
    """Forty ModelBudgets on a Prometheus that answers nothing in time, with queries that cannot be
    grouped (more than its threads can run at once), and one on a healthy Prometheus: the healthy
    one is answered, and the forty fail at their own deadline, each waiting without a thread."""
    stop = threading.Event()
    port = trickling_server(stop)
    source = PrometheusMetrics(reuse_seconds=15)
    hung = Metrics.model_validate(
        {"prometheusUrl": f"http://127.0.0.1:{port}", "selector": 'namespace=~"$namespace"', "timeoutSeconds": 2}
    )
    healthy = member_metrics(prometheus.url)

    async def scenario() -> tuple[list[DemandSample], DemandSample, int]:
        before = threading.active_count()
        stuck = [
            asyncio.create_task(source.sample(hung, f"team-{i}", "llm", PrometheusCredentials())) for i in range(40)
        ]
        await asyncio.sleep(0.2)  # every hung query asked: far more than one Prometheus' threads
        threads = threading.active_count() - before
        good = await source.sample(healthy, "a", "llm", PrometheusCredentials())
        return list(await asyncio.gather(*stuck)), good, threads

    try:
        stuck, good, threads = asyncio.run(scenario())
    finally:
        stop.set()
    assert good.error is None and good.request_rate == 1.0
    assert all(s.error is not None and "no answer within 2s" in s.error for s in stuck)
    # 40 x 11 queries in the air, yet no more threads than the hung Prometheus' bounded pool and
    # the test server's handler per connection (a thread per waiting ModelBudget would add 40).
    assert threads <= 2 * MAX_PARALLEL_QUERIES + 2
