"""``spend.source: OpenCost`` on the testbed: the ledger bills from OpenCost-style node prices that
the testbed's Prometheus scrapes, falls back to the spec's prices when they go, and flags a spec
price that is 30% off.

The prices come from a tiny exporter in this test that speaks OpenCost's metric names
(``node_total_hourly_cost`` and ``node_gpu_hourly_cost``, labelled ``node``) for the Nodes of the
test's pool, as read from the apiserver at each scrape; it registers with Prometheus through the
testbed's file-based discovery, like the model servers do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from gatekit import free_port
from kubernetes import client
from support import GPUS_PER_NODE, NODE_PRICE, Env, Testbed, budget, world

pytestmark = pytest.mark.e2e


class OpenCostExporter:
    """Serves ``node_*_hourly_cost`` for every Node of one pool at the price set now."""

    def __init__(self, core: client.CoreV1Api, pool: str, targets_dir: str) -> None:
        self.core, self.pool = core, pool
        self.node_price = NODE_PRICE
        self.addr = f"127.0.0.1:{free_port()}"
        self.target = Path(targets_dir) / f"opencost-{pool}.json"
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        host, port = self.addr.rsplit(":", 1)
        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def render(self) -> str:
        nodes = self.core.list_node(label_selector=f"modelbudget.dev/pool={self.pool}").items
        lines = ["# TYPE node_total_hourly_cost gauge", "# TYPE node_gpu_hourly_cost gauge"]
        for node in nodes:
            name = node.metadata.name
            lines.append(f'node_total_hourly_cost{{node="{name}",instance_type="kwok"}} {self.node_price}')
            lines.append(f'node_gpu_hourly_cost{{node="{name}"}} {self.node_price / GPUS_PER_NODE}')
        return "\n".join(lines) + "\n"

    def register(self) -> None:
        # Write then rename: Prometheus must never read a half-written file.
        self.target.with_suffix(".tmp").write_text(json.dumps([{"targets": [self.addr]}]))
        self.target.with_suffix(".tmp").rename(self.target)

    def remove(self) -> None:
        """Gone from Prometheus: the target is dropped and its series are marked stale."""
        self.target.unlink(missing_ok=True)
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def opencost(env: Env, testbed: Testbed) -> Iterator[OpenCostExporter]:
    exporter = OpenCostExporter(env.core, env.pool, testbed.targets_dir)
    exporter.register()
    yield exporter
    exporter.remove()


def spend(env: Env) -> dict[str, Any]:
    return dict(env.status().get("spend") or {})


def nodes(env: Env) -> int:
    return len(env.core.list_node(label_selector=f"modelbudget.dev/pool={env.pool}").items)


@world(replicas=1, rps=1.0)
def test_the_ledger_bills_opencost_prices_flags_a_wrong_spec_and_falls_back(
    env: Env, opencost: OpenCostExporter
) -> None:
    opencost.node_price = NODE_PRICE * 1.05  # within the default 10% of the spec's price
    spec = budget("llm", env.pool, env.prometheus, spend={"source": "OpenCost", "maxStalenessSeconds": 30})
    env.apply_budget(spec)
    env.start_operator()

    def billed_by(source: str, per_node: float) -> bool:
        s = spend(env)
        n = nodes(env)
        return s.get("source") == source and abs(s.get("currentPerHour", -1) - n * per_node) < 1e-6

    env.wait_for(lambda: billed_by("OpenCost", NODE_PRICE * 1.05), 90, "billing at OpenCost's prices")
    cond = env.condition("PricesObserved")
    assert (cond["status"], cond["reason"]) == ("True", "PricesFromOpenCost"), cond
    pool = spend(env)["pools"][0]
    assert pool["observedPerNodeHour"] == pytest.approx(NODE_PRICE * 1.05)
    assert pool["observedPerGpuHour"] == pytest.approx(NODE_PRICE * 1.05 / GPUS_PER_NODE)
    assert pool["specPerNodeHour"] == NODE_PRICE

    # The spec's price is now 30% below what OpenCost says: flagged, still billed from OpenCost.
    opencost.node_price = NODE_PRICE * 1.3
    env.wait_for(lambda: env.condition("PricesObserved").get("reason") == "PriceMismatch", 60, "PriceMismatch")
    assert "+30%" in env.condition("PricesObserved")["message"]
    env.wait_for(lambda: env.events("PriceMismatch"), 30, "a PriceMismatch Event")
    assert env.events("PriceMismatch")[0].type == "Warning"
    env.wait_for(lambda: billed_by("OpenCost", NODE_PRICE * 1.3), 30, "billing at the new observed price")

    # OpenCost goes away: the ledger falls back to the spec's prices, with a condition and an Event.
    before = spend(env)["periodToDateAtSpecPrices"]
    opencost.remove()
    env.wait_for(lambda: env.condition("PricesObserved").get("reason") == "PricesFromSpec", 90, "PricesFromSpec")
    assert env.condition("PricesObserved")["status"] == "False"
    env.wait_for(lambda: env.events("PricesFromSpec"), 30, "a PricesFromSpec Event")
    assert env.events("PricesFromSpec")[0].type == "Warning"
    env.wait_for(lambda: billed_by("Spec", NODE_PRICE), 30, "billing at the spec's prices")
    env.wait_for(lambda: spend(env)["periodToDateAtSpecPrices"] > before, 30, "spend accrued at spec prices")
