"""Small builders for specs and observations used across the unit tests."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from modelbudget.api import ControllerState, ModelBudgetSpec
from modelbudget.core import Decision, DemandSample, Observation, decide, resolve
from modelbudget.core.generation import GenerationProfile
from modelbudget.core.observation import GateReport

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)

BASE_SPEC: dict[str, Any] = {
    "targetRef": {"name": "llm"},
    "curve": {"intercept": 0.1, "slope": 0.08, "minTokens": 64, "maxTokens": 8192},
    "budget": {"ceiling": {"amount": 100, "period": "Hour"}, "valuePerPoint": 0.01},
    "replicas": {"min": 1, "max": 32, "gpusPerReplica": 1},
    "nodePools": [
        {
            "name": "pool-a",
            "gpuType": "nvidia-l4",
            "pricePerGpuHour": 2.0,
            "gpusPerNode": 4,
            "minNodes": 0,
            "maxNodes": 8,
            "tokensPerSecondPerReplica": 1000,
        }
    ],
    "metrics": {"prometheusUrl": "http://prometheus:9090"},
}


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def spec_dict(**patch: Any) -> dict[str, Any]:
    return merge(BASE_SPEC, patch)


def make_spec(**patch: Any) -> ModelBudgetSpec:
    return ModelBudgetSpec.model_validate(spec_dict(**patch))


def observe(
    rps: float | None = 5.0,
    replicas: int = 1,
    ready: int | None = None,
    nodes: dict[str, int] | None = None,
    mean_wanted: float = 2000.0,
    waiting: float = 0.0,
    limit: int | None = None,
    at: datetime | None = NOW,
    error: str | None = None,
    gates: tuple[float, ...] | None = None,
) -> Observation:
    """``gates``: the limits the gates apply (default: one gate applying ``limit``, or its default
    8192 before anything is published); ``()`` for no gate at all."""
    applied = gates if gates is not None else (float(limit if limit is not None else 8192),)
    return Observation(
        current_replicas=replicas,
        ready_replicas=replicas if ready is None else ready,
        current_nodes=nodes if nodes is not None else {"pool-a": -(-replicas // 4)},
        current_token_limit=limit,
        demand=DemandSample(
            at=at,
            request_rate=rps,
            generation=GenerationProfile.exponential(mean_wanted),
            requests_waiting=waiting,
            error=error,
            gates=GateReport(applied),
        ),
    )


def decide_for(obs: Observation, spec: ModelBudgetSpec, state: ControllerState, now: datetime) -> Decision:
    """``decide`` on a spec as the operator reads it: resolved first."""
    return decide(obs, resolve(spec), state, now)
