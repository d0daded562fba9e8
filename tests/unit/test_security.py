"""Secrets (Prometheus credentials) never reach a log line, the status, an Event or the operator's
own metrics, whatever Prometheus answers. The e2e half (a real operator's log, /metrics and
/healthz) is tests/e2e/test_security.py."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
import pytest

from modelbudget.adapters.metrics import PrometheusMetrics
from modelbudget.controller import telemetry
from modelbudget.controller.reconciler import Adapters, ObjectRef
from tests.builders import merge
from tests.unit.fakes import FakeCluster, example_reconciler
from tests.unit.test_controller_reconcile import T0, demo_spec

TOKEN = "tok-7f3a9c2e1b"
USER, PASSWORD = "prom-reader", "pw-51d0e8aa42"
URL_PASSWORD = "urlpw-9e8d7c"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRET_VALUES = (TOKEN, PASSWORD, URL_PASSWORD, BASIC)


@pytest.fixture
def prometheus() -> Iterator[tuple[str, list[str]]]:
    """A Prometheus that checks credentials and then answers with errors that echo the request:
    the worst case for leaks, since error bodies end up in condition messages."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            seen.append(auth)
            code = 200 if auth in (f"Bearer {TOKEN}", f"Basic {BASIC}") else 401
            body = json.dumps({"status": "error", "error": f"echo {self.path}", "data": {"result": []}}).encode()
            self.send_response(500 if code == 200 else code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "auth",
    [
        {"bearerTokenSecretRef": {"name": "prom-token", "key": "token"}},
        {"basicAuthSecretRef": "prom-basic"},
    ],
    ids=["bearer", "basic"],
)
def test_credentials_are_sent_and_never_reported(
    auth: dict[str, Any], prometheus: tuple[str, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    addr, seen = prometheus
    cluster = FakeCluster()
    cluster.pools.nodes = cluster.pools.sizes = {"gpu-pool": 1}
    cluster.secrets.data = {
        ("demo", "prom-token", "token"): TOKEN + "\n",
        ("demo", "prom-basic", "username"): USER,
        ("demo", "prom-basic", "password"): PASSWORD,
    }
    adapters = Adapters(
        metrics=PrometheusMetrics(),
        secrets=cluster.secrets,
        scaler=cluster.scaler,
        node_pools=cluster.pools,
        gpu_pools=cluster.gpu_pools,
        token_limits=cluster.tokens,
        conflicts=cluster.conflicts,
        prices=cluster.prices,
        capacity_buffers=cluster.buffers,
    )
    # Credentials in the URL too (basic case only: requests lets URL credentials replace a bearer
    # header, so the two are not combined).
    userinfo = f"{USER}:{URL_PASSWORD}@" if "basicAuthSecretRef" in auth else ""
    spec = merge(demo_spec(), {"metrics": {"prometheusUrl": f"http://{userinfo}{addr}", "auth": auth}})
    caplog.set_level(logging.DEBUG)  # urllib3 and requests log request lines at DEBUG
    out = asyncio.run(example_reconciler(adapters).reconcile(ObjectRef("demo", "llm", 1), spec, {}, None, T0))

    assert seen and all(a in (f"Bearer {TOKEN}", f"Basic {BASIC}") for a in seen)  # sent, and right
    metrics = next(c for c in out.status_patch["conditions"] if c["type"] == "MetricsAvailable")
    assert "HTTP Status Code 500" in metrics["message"]  # the failure is reported...
    reported = json.dumps(out.status_patch) + repr(out.events) + repr(out.problems) + caplog.text
    for secret in SECRET_VALUES:
        assert secret not in reported  # ...without what authenticated the request


def test_the_operator_metrics_carry_no_secrets_or_urls(prometheus: tuple[str, list[str]]) -> None:
    addr, _ = prometheus
    cluster = FakeCluster()
    cluster.pools.nodes = cluster.pools.sizes = {"gpu-pool": 1}
    cluster.secrets.data = {("demo", "prom-basic", "username"): USER, ("demo", "prom-basic", "password"): PASSWORD}
    spec = merge(
        demo_spec(),
        {
            "metrics": {
                "prometheusUrl": f"http://{USER}:{URL_PASSWORD}@{addr}",
                "auth": {"basicAuthSecretRef": "prom-basic"},
            }
        },
    )
    out = asyncio.run(example_reconciler(cluster.adapters).reconcile(ObjectRef("demo", "llm", 1), spec, {}, None, T0))
    done = out.reconciled
    assert done is not None
    telemetry.record("demo", "llm", done.resolved.spec, done.observation, done.decision, out.status.conditions, None)
    for reason in out.problems:
        telemetry.ERRORS.labels(reason).inc()
    exposed = prometheus_client.generate_latest().decode()
    assert 'modelbudget_replicas{name="llm",namespace="demo",state="planned"}' in exposed
    for secret in (*SECRET_VALUES, addr, USER):
        assert secret not in exposed
