"""Node prices from OpenCost's Prometheus metrics.

OpenCost exports, per Node, ``node_total_hourly_cost`` (what the node costs per hour) and its
GPU part ``node_gpu_hourly_cost`` (per GPU), each labelled with the node's name.  This adapter
reads them from the ModelBudget's own Prometheus (``metrics.prometheusUrl`` and its auth) and
returns them by node name; which nodes belong to which pool is the apiserver's answer (the
pool's node selector), not OpenCost's.  The sample time of each price comes from
``timestamp(<query>)``, so a price an exporter stopped updating is seen as stale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from modelbudget.adapters.errors import Unavailable
from modelbudget.adapters.metrics import (
    MAX_TIMESTAMP,
    PrometheusCredentials,
    PrometheusMetrics,
    QueryFailed,
    QueryRunner,
)
from modelbudget.api.spec import Metrics, OpenCostQueries
from modelbudget.core.prices import NodePrice


class NodePriceSource(Protocol):
    def node_prices(
        self, metrics: Metrics, queries: OpenCostQueries, credentials: PrometheusCredentials
    ) -> dict[str, NodePrice]:
        """Prices by node name; raises ``Unavailable`` when the prices cannot be read at all."""
        ...


def _value(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def by_node(result: Any, label: str) -> dict[str, float]:
    """One value per node from an instant vector: series without the label or a finite value are
    left out; a node with several series (two exporters) gets the highest, so it is never under-billed.
    """
    if not isinstance(result, list):
        raise QueryFailed(f"expected a vector, got {type(result).__name__}")
    found: dict[str, float] = {}
    for item in result:
        if not isinstance(item, Mapping):
            raise QueryFailed(f"unexpected series in the answer: {str(item)[:120]}")
        labels, pair = item.get("metric"), item.get("value")
        node = labels.get(label) if isinstance(labels, Mapping) else None
        value = _value(pair[1]) if isinstance(pair, list | tuple) and len(pair) == 2 else None
        if isinstance(node, str) and value is not None:
            found[node] = max(value, found.get(node, value))
    return found


def node_prices_from(run: QueryRunner, queries: OpenCostQueries) -> dict[str, NodePrice]:
    """Run the three queries through ``run`` and join them by node."""
    label = queries.node_label
    try:
        totals = by_node(run(queries.node_hourly_cost), label)
        sampled = by_node(run(f"timestamp({queries.node_hourly_cost})"), label)
    except QueryFailed as exc:
        raise Unavailable(f"OpenCost node prices: {exc}") from exc
    try:
        gpus = by_node(run(queries.gpu_hourly_cost), label)
    except QueryFailed:
        gpus = {}  # the GPU part is reported, never billed: its absence costs nothing
    prices = {}
    for node, total in totals.items():
        at = sampled.get(node)
        if at is None or not 0 <= at < MAX_TIMESTAMP:
            continue  # without a sample time a price cannot be judged fresh: treated as missing
        prices[node] = NodePrice(per_hour=total, per_gpu_hour=gpus.get(node), at=datetime.fromtimestamp(at, UTC))
    return prices


class OpenCostPrices:
    """``NodePriceSource`` over the Prometheus that the ModelBudget's metrics come from."""

    def __init__(self, prometheus: PrometheusMetrics) -> None:
        self._prometheus = prometheus  # shares its clients (connections) per URL and credentials

    def node_prices(
        self, metrics: Metrics, queries: OpenCostQueries, credentials: PrometheusCredentials
    ) -> dict[str, NodePrice]:
        return node_prices_from(self._prometheus.runner(metrics, credentials), queries)
