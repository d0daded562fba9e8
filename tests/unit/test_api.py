"""The API models, the generated CRD and the examples agree with each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from modelbudget.api import ModelBudget, ModelBudgetSpec
from modelbudget.api.crd import CRD_FILE, POOL_CRD_FILE, render_crd
from modelbudget.api.pool import GpuPoolSpec
from tests.builders import spec_dict
from tests.celcheck import cel_violations

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / CRD_FILE).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def openapi_errors(schema: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    # The CRD uses OpenAPI 3.0 (draft-4 style boolean exclusive bounds); x-kubernetes-* is ignored.
    return [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]


def test_crd_is_up_to_date():
    assert (ROOT / "crds" / CRD_FILE).read_text() == render_crd(), "run `modelbudget crd --out-dir crds`"


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


def pool_crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / POOL_CRD_FILE).read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_for_models_schema_and_cel(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] == "GpuPool":
            GpuPoolSpec.model_validate(doc["spec"])
            schema = pool_crd_schema()
        else:
            ModelBudget.model_validate(doc)
            schema = crd_schema()
        assert openapi_errors(schema, doc) == []
        assert cel_violations(schema["properties"]["spec"], doc["spec"]) == []


BAD = [
    ("replicas min > max", {"replicas": {"min": 5, "max": 2}}, "replicas.min must not exceed replicas.max"),
    (
        "token range",
        {"curve": {"minTokens": 900, "maxTokens": 100}},
        "curve.minTokens must be less than curve.maxTokens",
    ),
    (
        "both value knobs",
        {"budget": {"ceiling": {"amount": 5}, "valuePerPoint": 1, "minGainPerDollar": 2}},
        "budget needs exactly one of valuePerPoint or minGainPerDollar",
    ),
    (
        "pool min > max",
        {"nodePools": [{**spec_dict()["nodePools"][0], "minNodes": 5, "maxNodes": 1}]},
        "nodePools[].minNodes must not exceed maxNodes",
    ),
    (
        "replica does not fit node",
        {"replicas": {"max": 4, "gpusPerReplica": 8}},
        "every node pool needs gpusPerNode >= replicas.gpusPerReplica",
    ),
    ("duplicate pools", {"nodePools": [spec_dict()["nodePools"][0]] * 2}, "nodePools[].name must be unique"),
    (
        "namespace of a cluster-scoped provider",
        {
            "nodePools": [
                {**spec_dict()["nodePools"][0], "providerRef": {"kind": "NodePool", "name": "p", "namespace": "x"}}
            ]
        },
        "providerRef.namespace is only for a MachineDeployment",
    ),
    ("no pools", {"nodePools": []}, "give at least one of nodePools or sharedPools"),
    (
        "shared pool named twice",
        {"sharedPools": [{"pool": "shared", "tokensPerSecondPerReplica": 500}] * 2},
        "sharedPools[].pool must be unique and differ from every nodePools[].name",
    ),
    (
        "shared pool named like an inline pool",
        {"sharedPools": [{"pool": "pool-a", "tokensPerSecondPerReplica": 500}]},
        "sharedPools[].pool must be unique and differ from every nodePools[].name",
    ),
    (
        "fallback without replicas",
        {"behavior": {"fallback": {"action": "ScaleTo"}}},
        "behavior.fallback.replicas is required when action is ScaleTo",
    ),
    (
        "curve with params and samples",
        {"curve": {"samples": [{"tokens": 1, "performance": 0}] * 3}},
        "curve needs either intercept and slope, or samples to fit (not both)",
    ),
    (
        "weights key is the token limit's key",
        {"tokenLimits": {"publish": {"configMap": {"weightsKey": "max_tokens"}}}},
        "tokenLimits.publish.configMap.weightsKey must differ from key and from admitted_rps_per_pod",
    ),
    (
        "weights key is the admission key",
        {"tokenLimits": {"publish": {"configMap": {"key": "limit", "weightsKey": "admitted_rps_per_pod"}}}},
        "tokenLimits.publish.configMap.weightsKey must differ from key and from admitted_rps_per_pod",
    ),
]


@pytest.mark.parametrize(("case", "patch", "message"), BAD, ids=[b[0] for b in BAD])
def test_cross_field_rule_rejects_in_model_and_in_cel(case, patch, message):
    doc = spec_dict(**patch)
    with pytest.raises(ValidationError) as err:
        ModelBudgetSpec.model_validate(doc)
    assert message in str(err.value)
    assert any(message in m for _, m in cel_violations(crd_schema()["properties"]["spec"], doc))


FIELD_ERRORS = [
    ("route without a name", {"routing": {"httpRouteRef": {}}}, "Field required"),
    (
        "negative price",
        {"nodePools": [{**spec_dict()["nodePools"][0], "pricePerGpuHour": -1}]},
        "greater than 0",
    ),
    ("zero ceiling", {"budget": {"ceiling": {"amount": 0}, "valuePerPoint": 1}}, "greater than 0"),
    ("unknown field", {"surprise": 1}, "Extra inputs are not permitted"),
    ("wrong type", {"replicas": {"min": "two", "max": 3}}, "valid integer"),
    ("bad period", {"budget": {"ceiling": {"amount": 5, "period": "Week"}, "valuePerPoint": 1}}, "Hour"),
    ("bad url", {"metrics": {"prometheusUrl": "prometheus:9090"}}, "should match pattern"),
]


@pytest.mark.parametrize(("case", "patch", "fragment"), FIELD_ERRORS, ids=[f[0] for f in FIELD_ERRORS])
def test_field_errors_in_model_and_schema(case, patch, fragment):
    doc = spec_dict(**patch)
    with pytest.raises(ValidationError) as err:
        ModelBudgetSpec.model_validate(doc)
    assert fragment in str(err.value)
    manifest = {"apiVersion": "modelbudget.dev/v1alpha1", "kind": "ModelBudget", "metadata": {}, "spec": doc}
    if case != "unknown field":  # the apiserver prunes or (kubectl --validate=strict) rejects unknown fields
        assert openapi_errors(crd_schema(), manifest), case


def test_round_trip_by_alias():
    spec = ModelBudgetSpec.model_validate(spec_dict())
    again = ModelBudgetSpec.model_validate(spec.model_dump(by_alias=True, exclude_none=True))
    assert again == spec


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    path=st.sampled_from(["replicas", "curve", "budget", "nodePools", "metrics", "behavior", "tokenLimits"]),
    value=json_values,
)
def test_parsing_garbage_gives_validation_errors_only(path, value):
    doc = spec_dict()
    doc[path] = value
    try:
        ModelBudgetSpec.model_validate(doc)
    except ValidationError as exc:
        assert exc.errors()


def test_a_spec_may_draw_only_from_shared_pools() -> None:
    doc = spec_dict(sharedPools=[{"pool": "shared", "tokensPerSecondPerReplica": 500}])
    del doc["nodePools"]
    spec = ModelBudgetSpec.model_validate(doc)
    assert spec.node_pools == [] and spec.shared_pools[0].pool == "shared"
    assert cel_violations(crd_schema()["properties"]["spec"], doc) == []


GPU_POOL = {
    "providerRef": {"kind": "KwokNodePool", "name": "shared"},
    "gpuType": "nvidia-l4",
    "pricePerGpuHour": 2.0,
    "gpusPerNode": 4,
    "maxNodes": 4,
    "allowedNamespaces": {"namespaces": ["team-a"]},
}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"minNodes": 5}, "minNodes must not exceed maxNodes"),
        ({"providerRef": {"kind": "MachineDeployment", "name": "md"}}, "providerRef.namespace is required"),
        ({"allowedNamespaces": {"namespaces": []}}, "allowedNamespaces needs namespaces or a namespaceSelector"),
    ],
)
def test_gpu_pool_rules_reject_in_model_and_in_cel(patch: dict[str, object], message: str) -> None:
    doc = {**GPU_POOL, **patch}
    with pytest.raises(ValidationError) as err:
        GpuPoolSpec.model_validate(doc)
    assert message in str(err.value)
    assert any(message in m for _, m in cel_violations(pool_crd_schema()["properties"]["spec"], doc))


def test_gpu_pool_allows_namespaces_by_name_or_label() -> None:
    allowed = GpuPoolSpec.model_validate(
        {
            **GPU_POOL,
            "allowedNamespaces": {"namespaces": ["team-a"], "namespaceSelector": {"matchLabels": {"gpu": "l4"}}},
        }
    ).allowed_namespaces
    assert allowed.allows("team-a", {})
    assert allowed.allows("team-b", {"gpu": "l4", "other": "x"})
    assert not allowed.allows("team-c", {"gpu": "a100"})


def test_routing_names_an_httproute_and_the_weights_key_defaults() -> None:
    spec = ModelBudgetSpec.model_validate(spec_dict(routing={"httpRouteRef": {"name": "chat"}}))
    assert spec.routing is not None and spec.routing.http_route_ref.name == "chat"
    assert spec.token_limits.publish.config_map.weights_key == "weights"
    wire = spec.model_dump(by_alias=True, exclude_none=True)
    assert wire["routing"] == {"httpRouteRef": {"name": "chat"}}
    assert ModelBudgetSpec.model_validate(wire) == spec
    assert openapi_errors(crd_schema()["properties"]["spec"], wire) == []
    assert cel_violations(crd_schema()["properties"]["spec"], wire) == []
