"""Prometheus credentials from Secrets are sent, and never appear in the operator's log (at
--debug), the ModelBudget status, Events, or the operator's /metrics and liveness endpoints."""

from __future__ import annotations

import base64
import json
import urllib.request

import pytest
from support import MB, Env, FaultyPrometheus, budget, world

pytestmark = pytest.mark.e2e

TOKEN = "tok-e2e-5be1c0d9f7"
USER, PASSWORD = "reader", "pw-e2e-8c2d4e6a1f"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@world(replicas=1, rps=4.0)
def test_secrets_are_used_and_never_shown(env: Env) -> None:
    proxy = FaultyPrometheus(env.prometheus, require={f"Bearer {TOKEN}", f"Basic {BASIC}"})
    proxy.start()
    try:
        env.core.create_namespaced_secret(env.ns, {"metadata": {"name": "prom-token"}, "stringData": {"token": TOKEN}})
        env.core.create_namespaced_secret(
            env.ns, {"metadata": {"name": "prom-basic"}, "stringData": {"username": USER, "password": PASSWORD}}
        )
        bearer = budget("llm", env.pool, proxy.url)
        bearer["spec"]["metrics"]["auth"] = {"bearerTokenSecretRef": {"name": "prom-token", "key": "token"}}
        basic = budget("llm-basic", env.pool, proxy.url, mode="Recommend")
        basic["spec"]["metrics"]["auth"] = {"basicAuthSecretRef": "prom-basic"}
        env.apply_budget(bearer)
        env.apply_budget(basic)
        operator = env.start_operator("a", "--debug")
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "True", 60, "metrics with a token")
        env.wait_for(lambda: len(proxy.auth_seen) == 2, 30, "both kinds of credentials sent")
        # Failures are reported too: their messages must not carry the credentials either.
        proxy.set("error500")
        env.wait_for(lambda: env.condition("MetricsAvailable").get("status") == "False", 30, "a reported failure")
        proxy.set("forward")

        with urllib.request.urlopen(f"http://{operator.metrics_addr}/metrics", timeout=5) as r:
            exposed = r.read().decode()
        with urllib.request.urlopen(operator.liveness_url, timeout=5) as r:
            health = r.read().decode()
        objects = env.custom.list_namespaced_custom_object(*MB, env.ns, "modelbudgets")
        events = env.core.list_namespaced_event(env.ns).items
        shown = {
            "log": operator.log.read_text(),
            "status": json.dumps([o.get("status") for o in objects["items"]]),
            "events": json.dumps([(e.reason, e.message) for e in events]),
            "metrics": exposed,
            "liveness": health,
        }
        assert "modelbudget_reconcile_duration_seconds" in exposed and "MetricsUnavailable" in shown["events"]
        for where, text in shown.items():
            for secret in (TOKEN, PASSWORD, BASIC):
                assert secret not in text, f"a credential in the {where}"
    finally:
        proxy.stop()
