"""OpenCost prices: which prices bill the ledger, how the adapter reads them, what status and Events say."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from modelbudget.adapters.errors import Unavailable
from modelbudget.adapters.metrics import QueryFailed
from modelbudget.adapters.prices import by_node, node_prices_from
from modelbudget.api.reasons import Reason
from modelbudget.api.spec import ModelBudgetSpec, OpenCostQueries, PriceSource
from modelbudget.core.prices import NodePrice, ObservedPrices, assess_prices
from tests.unit.fakes import FakeCluster, demand, fake_node_names
from tests.unit.test_adapters_metrics import Canned
from tests.unit.test_controller_reconcile import T0, Harness, demo_spec

SPEC_NODE_PRICE = 8.0  # the demo's pool: 4 GPUs x $2/GPU-hour


def opencost_spec(**spend: Any) -> dict[str, Any]:
    return demo_spec(spend={"source": "OpenCost", **spend})


def priced(pool: str, count: int, per_hour: float, at: datetime, gpu: float | None = None) -> dict[str, NodePrice]:
    return {n: NodePrice(per_hour, gpu, at) for n in fake_node_names(pool, count)}


def seen(count: int, prices: dict[str, NodePrice]) -> ObservedPrices:
    return ObservedPrices(pool_nodes={"gpu-pool": tuple(fake_node_names("gpu-pool", count))}, node_prices=prices)


SPEC = ModelBudgetSpec.model_validate(opencost_spec())


def test_the_spec_source_bills_at_spec_prices_and_says_nothing() -> None:
    verdict = assess_prices(None, {"gpu-pool": 2}, ModelBudgetSpec.model_validate(demo_spec()), T0)
    assert (verdict.source, verdict.reason, verdict.running_per_hour) == (PriceSource.SPEC, None, 16.0)


def test_every_node_priced_bills_their_sum() -> None:
    prices = priced("gpu-pool", 2, 8.4, T0 - timedelta(seconds=30), gpu=1.9)
    verdict = assess_prices(seen(2, prices), {"gpu-pool": 2}, SPEC, T0)
    assert verdict.source is PriceSource.OPEN_COST and verdict.reason is Reason.PRICES_FROM_OPEN_COST
    assert verdict.running_per_hour == pytest.approx(16.8)
    (pool,) = verdict.pools
    assert (pool.nodes, pool.observed_per_node_hour, pool.observed_per_gpu_hour) == (2, 8.4, 1.9)
    assert pool.spec_per_node_hour == SPEC_NODE_PRICE


@pytest.mark.parametrize(
    ("prices", "why"),
    [
        (priced("gpu-pool", 1, 8.0, T0), "no price for gpu-pool-node-1"),
        (priced("gpu-pool", 2, 8.0, T0 - timedelta(seconds=601)), "older than 600s"),
        (priced("gpu-pool", 2, float("inf"), T0), "implausible"),
        (priced("gpu-pool", 2, -1.0, T0), "implausible"),
    ],
    ids=["missing", "stale", "infinite", "negative"],
)
def test_any_unpriced_node_bills_the_whole_tick_at_spec_prices(prices: dict[str, NodePrice], why: str) -> None:
    verdict = assess_prices(seen(2, prices), {"gpu-pool": 2}, SPEC, T0)
    assert verdict.source is PriceSource.SPEC and verdict.reason is Reason.PRICES_FROM_SPEC
    assert verdict.running_per_hour == 2 * SPEC_NODE_PRICE
    assert why in verdict.message


def test_no_price_series_at_all_is_no_source_even_with_no_node_to_bill() -> None:
    verdict = assess_prices(seen(0, {}), {"gpu-pool": 0}, SPEC, T0)
    assert verdict.reason is Reason.PRICES_FROM_SPEC and "no node_total_hourly_cost series" in verdict.message
    other = {"elsewhere": NodePrice(3.0, None, T0)}  # OpenCost prices other nodes: it is there
    assert assess_prices(seen(0, other), {"gpu-pool": 0}, SPEC, T0).reason is Reason.PRICES_FROM_OPEN_COST


def test_a_shared_pool_view_is_billed_its_share_beside_opencost_priced_nodes() -> None:
    # A GpuPool's view has no Nodes of this ModelBudget's own: its share is billed at the view's
    # price (what the pool reconciler charges), the own pool's nodes at OpenCost's.
    own = opencost_spec()
    view = {**own["nodePools"][0], "name": "shared-a", "gpusPerNode": 1, "pricePerGpuHour": 3.0, "maxNodes": 8}
    view.pop("providerRef", None)
    spec = ModelBudgetSpec.model_validate({**own, "nodePools": [*own["nodePools"], view]})
    prices = priced("gpu-pool", 2, 8.4, T0 - timedelta(seconds=30))
    verdict = assess_prices(seen(2, prices), {"gpu-pool": 2, "shared-a": 3}, spec, T0)
    assert verdict.source is PriceSource.OPEN_COST
    assert verdict.running_per_hour == pytest.approx(2 * 8.4 + 3 * 3.0)
    assert [p.pool for p in verdict.pools] == ["gpu-pool"]


def test_an_unreachable_source_bills_at_spec_prices() -> None:
    verdict = assess_prices(ObservedPrices(error="Prometheus down"), {"gpu-pool": 1}, SPEC, T0)
    assert verdict.reason is Reason.PRICES_FROM_SPEC and "Prometheus down" in verdict.message
    assert verdict.running_per_hour == SPEC_NODE_PRICE


@pytest.mark.parametrize(
    ("observed", "tolerance", "flagged"),
    [(10.4, 0.1, True), (5.6, 0.1, True), (8.7, 0.1, False), (10.4, 0.35, False)],
    ids=["30%-above", "30%-below", "within", "wider-tolerance"],
)
def test_a_spec_price_off_by_more_than_the_tolerance_is_flagged(
    observed: float, tolerance: float, flagged: bool
) -> None:
    spec = ModelBudgetSpec.model_validate(opencost_spec(priceTolerance=tolerance))
    verdict = assess_prices(seen(1, priced("gpu-pool", 1, observed, T0)), {"gpu-pool": 1}, spec, T0)
    assert verdict.source is PriceSource.OPEN_COST and verdict.running_per_hour == observed
    assert (verdict.reason is Reason.PRICE_MISMATCH) is flagged
    if flagged:
        assert "pool gpu-pool" in verdict.message and "%" in verdict.message


def vector(label: str, *pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"metric": {label: node, "job": "opencost"}, "value": [1.7e9, value]} for node, value in pairs]


def test_the_adapter_joins_prices_and_sample_times_by_node() -> None:
    run = Canned(
        {
            "timestamp(node_total_hourly_cost)": vector("node", ("a", "1767614400"), ("b", "1767614390")),
            "node_total_hourly_cost": vector("node", ("a", "8.5"), ("b", "NaN"), ("c", "3")),
            "node_gpu_hourly_cost": vector("node", ("a", "2.0")),
        }
    )
    prices = node_prices_from(run, OpenCostQueries())
    # b's price is NaN (unknown), c has no sample time: neither is a price
    assert prices == {"a": NodePrice(8.5, 2.0, datetime(2026, 1, 5, 12, 0, tzinfo=UTC))}


def test_a_missing_gpu_part_is_no_error_but_a_failing_price_query_is() -> None:
    ok = Canned(
        {
            "timestamp(": vector("node", ("a", "1767614400")),
            "node_total_hourly_cost": vector("node", ("a", "8")),
            "node_gpu_hourly_cost": QueryFailed("boom"),
        }
    )
    assert node_prices_from(ok, OpenCostQueries())["a"].per_gpu_hour is None
    down = Canned({"node_total_hourly_cost": QueryFailed("http://prom:9090 unreachable")})
    with pytest.raises(Unavailable, match="OpenCost node prices: http://prom:9090 unreachable"):
        node_prices_from(down, OpenCostQueries())


def test_two_series_for_one_node_bill_the_higher_and_unlabelled_ones_are_ignored() -> None:
    answer = [*vector("node", ("a", "8"), ("a", "9")), {"metric": {}, "value": [1.7e9, "5"]}]
    assert by_node(answer, "node") == {"a": 9.0}
    with pytest.raises(QueryFailed):
        by_node({"not": "a vector"}, "node")


@pytest.fixture
def cluster() -> FakeCluster:
    c = FakeCluster()
    c.pools.nodes = {"gpu-pool": 2}
    c.pools.sizes = {"gpu-pool": 2}
    c.tokens.limit = 8192
    return c


def tick(h: Harness, cluster: FakeCluster, at: datetime) -> list[tuple[str, str]]:
    cluster.metrics.next = demand(at, rps=2)
    return [(e.type, e.reason.value) for e in h.tick(at).events]


def test_the_ledger_bills_opencost_prices_falls_back_with_a_warning_and_recovers(cluster: FakeCluster) -> None:
    h = Harness(cluster, opencost_spec())
    cluster.prices.prices = priced("gpu-pool", 2, 8.4, T0)
    assert [e for e in tick(h, cluster, T0) if "Price" in e[1]] == []  # the first success is not news
    assert h.condition("PricesObserved")["reason"] == "PricesFromOpenCost"
    assert h.status["spend"]["source"] == "OpenCost" and h.status["spend"]["currentPerHour"] == 16.8
    assert h.status["spend"]["pools"][0]["observedPerNodeHour"] == 8.4

    t1 = T0 + timedelta(minutes=10)
    cluster.prices.prices = priced("gpu-pool", 2, 8.4, t1)
    tick(h, cluster, t1)
    ledger = h.status["controllerState"]["ledger"]
    assert ledger["spent"] == pytest.approx(16.8 / 6) and ledger["spentAtSpecPrices"] == 0.0

    t2 = t1 + timedelta(minutes=10)
    cluster.prices.error = "OpenCost node prices: http://prom:9090 unreachable: ConnectTimeout"
    assert ("Warning", "PricesFromSpec") in tick(h, cluster, t2)
    cond = h.condition("PricesObserved")
    assert (cond["status"], cond["reason"]) == ("False", "PricesFromSpec") and "unreachable" in cond["message"]
    assert h.status["spend"]["source"] == "Spec" and h.status["spend"]["currentPerHour"] == 2 * SPEC_NODE_PRICE
    ledger = h.status["controllerState"]["ledger"]
    # the interval is charged at the higher of the two rates (16.8 $/h observed before, 16 at spec now)
    assert ledger["spent"] == pytest.approx(2 * 16.8 / 6) and ledger["spentAtSpecPrices"] == pytest.approx(16.8 / 6)
    assert h.status["spend"]["periodToDateAtSpecPrices"] == pytest.approx(16.8 / 6)
    assert cluster.metrics.calls and cluster.prices.calls  # asked every tick

    t3 = t2 + timedelta(minutes=1)
    cluster.prices.error, cluster.prices.prices = None, priced("gpu-pool", 2, 8.4, t3)
    assert ("Normal", "PricesFromOpenCost") in tick(h, cluster, t3)


def test_a_spec_price_30_percent_off_is_a_warning_once(cluster: FakeCluster) -> None:
    h = Harness(cluster, opencost_spec())
    cluster.prices.prices = priced("gpu-pool", 2, SPEC_NODE_PRICE * 1.3, T0)
    assert ("Warning", "PriceMismatch") in tick(h, cluster, T0)
    cond = h.condition("PricesObserved")
    assert (cond["status"], cond["reason"]) == ("True", "PriceMismatch") and "+30%" in cond["message"]
    t1 = T0 + timedelta(seconds=15)
    cluster.prices.prices = priced("gpu-pool", 2, SPEC_NODE_PRICE * 1.3, t1)
    assert ("Warning", "PriceMismatch") not in tick(h, cluster, t1)


def test_the_spec_source_never_asks_opencost_and_drops_the_condition(cluster: FakeCluster) -> None:
    h = Harness(cluster, opencost_spec())
    cluster.prices.error = "down"
    tick(h, cluster, T0)
    assert h.condition("PricesObserved")["reason"] == "PricesFromSpec"
    h.spec = demo_spec()
    asked = len(cluster.prices.calls)
    tick(h, cluster, T0 + timedelta(seconds=15))
    assert len(cluster.prices.calls) == asked
    assert all(c["type"] != "PricesObserved" for c in h.status["conditions"])
    assert h.status["spend"]["source"] == "Spec"


def test_a_broken_price_source_or_missing_credentials_bill_at_spec_prices(
    cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> dict[str, NodePrice]:
        raise KeyError("data")

    monkeypatch.setattr(cluster.prices, "node_prices", broken)
    h = Harness(cluster, opencost_spec())
    tick(h, cluster, T0)
    cond = h.condition("PricesObserved")
    assert cond["reason"] == "PricesFromSpec"
    assert cond["message"] == "OpenCost prices unavailable: price source failed: KeyError"
    assert h.condition("Ready")["status"] == "True"  # the prices' source failing is no reason to stop

    secret = opencost_spec()
    secret["metrics"] = {**secret["metrics"], "auth": {"basicAuthSecretRef": "prom"}}
    h = Harness(cluster, secret)
    tick(h, cluster, T0)
    assert "Secret demo/prom" in h.condition("PricesObserved")["message"]


def test_demand_and_prices_share_one_read_of_the_credentials(cluster: FakeCluster) -> None:
    secret = opencost_spec()
    secret["metrics"] = {**secret["metrics"], "auth": {"bearerTokenSecretRef": {"name": "prom", "key": "token"}}}
    cluster.secrets.data[("demo", "prom", "token")] = "s3cret"
    cluster.prices.prices = priced("gpu-pool", 1, SPEC_NODE_PRICE, T0)
    tick(Harness(cluster, secret), cluster, T0)
    assert cluster.secrets.reads == [("demo", "prom", "token")]
    assert cluster.metrics.calls[-1][1].bearer_token == "s3cret"
    assert cluster.prices.calls  # and the prices were asked with them
