"""Malformed ModelBudgets against the real apiserver and a real operator: each is either rejected
by the CRD schema with a message that says what is wrong, or accepted and reported (a condition
and an Event saying what to fix); none stops the operator, and a healthy ModelBudget reconciled by
the same process keeps going. The same table through the reconciler: tests/unit/test_bad_input.py.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from support import MB, Env, budget, status_written_after, world

pytestmark = pytest.mark.e2e


def pool_entry(**changes: Any) -> dict[str, Any]:
    entry = copy.deepcopy(budget("x", "p", "http://x")["spec"]["nodePools"][0])
    entry.update(changes)
    return entry


# (case, spec changes, a fragment of the apiserver's 422 message)
REJECTED: list[tuple[str, dict[str, Any], str]] = [
    ("wrong type", {"replicas": {"min": "two", "max": 3}}, 'spec.replicas.min: Invalid value: "string"'),
    ("negative price", {"nodePools": [pool_entry(pricePerGpuHour=-2)]}, "pricePerGpuHour: Invalid value: -2"),
    ("min > max", {"replicas": {"min": 5, "max": 2}}, "replicas.min must not exceed replicas.max"),
    ("pool min > max", {"nodePools": [pool_entry(minNodes=9, maxNodes=1)]}, "minNodes must not exceed maxNodes"),
    (
        "empty pools",
        {"nodePools": []},
        "give at least one of nodePools or sharedPools",
    ),
    ("absurd ceiling", {"budget": {"ceiling": {"amount": 1e12}, "valuePerPoint": 0.01}}, "less than or equal to 1e+09"),
    ("huge replicas", {"replicas": {"min": 1, "max": 10**12}}, "spec.replicas.max: Invalid value"),
    ("bad url", {"metrics": {"prometheusUrl": "prometheus:9090"}}, "spec.metrics.prometheusUrl"),
    ("no target", {"targetRef": None}, "spec.targetRef: Required value"),
]


@pytest.mark.parametrize(("case", "changes", "fragment"), REJECTED, ids=[r[0] for r in REJECTED])
def test_the_schema_rejects_with_a_clear_message(
    modelbudget_crd: None,
    api_client: client.ApiClient,
    namespace: str,
    case: str,
    changes: dict[str, Any],
    fragment: str,
) -> None:
    body = budget("bad", "pool", "http://127.0.0.1:19090")
    for key, value in changes.items():
        if value is None:
            body["spec"].pop(key)
        else:
            body["spec"][key] = value
    with pytest.raises(ApiException) as rejected:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(*MB, namespace, "modelbudgets", body)
    assert rejected.value.status == 422, rejected.value.body
    message = json.loads(rejected.value.body)["message"]
    assert fragment in message, message


def test_unknown_fields_are_rejected_when_strict_and_pruned_otherwise(
    modelbudget_crd: None, api_client: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api_client)
    body = budget("unknown", "pool", "http://127.0.0.1:19090")
    body["spec"]["replicas"]["maxReplicas"] = 4  # a typo of "max"
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(*MB, namespace, "modelbudgets", body, field_validation="Strict")
    assert rejected.value.status == 400  # BadRequest, not Invalid: strict decoding fails first
    assert 'unknown field "spec.replicas.maxReplicas"' in json.loads(rejected.value.body)["message"]
    # Without Strict (the API default is Warn; kubectl defaults to Strict) it is dropped, not kept.
    created = custom.create_namespaced_custom_object(*MB, namespace, "modelbudgets", body)
    assert "maxReplicas" not in created["spec"]["replicas"]


@world(replicas=1, rps=4.0)
def test_accepted_but_broken_specs_are_reported_and_the_neighbour_keeps_reconciling(env: Env) -> None:
    env.apply_budget(budget("llm", env.pool, env.prometheus))
    env.start_operator("a")
    env.wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "the neighbour Ready")

    metrics = budget("x", "p", env.prometheus)["spec"]["metrics"]
    broken: dict[str, tuple[dict[str, Any], str, str, str]] = {
        # name: (spec changes, condition, reason, a fragment of its message); Recommend mode so
        # the broken ones never touch the neighbour's Deployment.
        "bad-promql": (
            {
                "metrics": {
                    **metrics,
                    "queries": {"requestRate": "sum(rate("},
                }
            },
            "MetricsAvailable",
            "MetricsUnreachable",
            "bad_data",
        ),
        "no-secret": (
            {
                "metrics": {
                    **metrics,
                    "auth": {"bearerTokenSecretRef": {"name": "prom-token", "key": "token"}},
                }
            },
            "MetricsAvailable",
            "MetricsUnreachable",
            f"Secret {env.ns}/prom-token: HTTP 404",
        ),
        "unfit-curve": (
            {
                "curve": {
                    "samples": [{"tokens": t, "performance": p} for t, p in ((64, 0.6), (256, 0.5), (1024, 0.4))],
                    "minTokens": 64,
                    "maxTokens": 4096,
                }
            },
            "Ready",
            "InvalidSpec",
            "curve.samples:",
        ),
        "no-target": ({"targetRef": {"name": "nope"}, "mode": "Enforce"}, "Ready", "TargetNotFound", "nope"),
    }
    event_reason = {"bad-promql": "MetricsUnavailable", "no-secret": "MetricsUnavailable"}
    applied = time.time()
    for name, (changes, *_) in broken.items():
        body = budget(name, env.pool, env.prometheus, mode="Recommend")
        body["spec"].update(changes)
        env.apply_budget(body)

    def cond(name: str, type_: str) -> dict[str, Any]:
        obj = env.custom.get_namespaced_custom_object(*MB, env.ns, "modelbudgets", name)
        return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})

    for name, (_, type_, reason, fragment) in broken.items():
        env.wait_for(lambda n=name, t=type_, r=reason: cond(n, t).get("reason") == r, 30, f"{name}: {type_}={reason}")
        assert fragment in cond(name, type_)["message"], (name, cond(name, type_))
        events = env.core.list_namespaced_event(env.ns, field_selector=f"involvedObject.name={name}").items
        wanted = event_reason.get(name, reason)
        assert any(e.reason == wanted and e.type == "Warning" for e in events), (name, [e.reason for e in events])
    # The neighbour kept reconciling all along, and still acts on demand.
    env.wait_for(lambda: status_written_after(env, applied), 30, "the neighbour's status refreshed")
    assert env.condition("Ready")["status"] == "True"
    env.demand(20)
    env.wait_for(lambda: env.replicas() > 2, 60, "the neighbour scaling up")
    assert all(o.proc.poll() is None for o in env.operators)
