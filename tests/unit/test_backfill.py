"""The Prometheus backfill's arithmetic (testbed/backfill.py); promtool and Prometheus reading it
back are exercised by tests/e2e/test_replay.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from modelbudget.cli.common import load_manifest
from modelbudget.sim.trace import synthetic
from modelbudget.testbed.backfill import SIMULATE_START, Shape, fleet_for, render, scrape_times, serve

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "single-pool-hourly.yaml"


def _series(text: str, name: str, pod: str = "chat-8b-0") -> list[float]:
    prefix = f'{name}{{model_name="chat-8b",namespace="serving",pod="{pod}"}} '
    return [float(line[len(prefix) :].split()[0]) for line in text.splitlines() if line.startswith(prefix)]


def _render(shape: Shape, token_limit: int | None = None) -> tuple[str, np.ndarray]:
    manifest = load_manifest(str(EXAMPLE))
    fleet = fleet_for(manifest, 2, None, token_limit)
    served = serve(synthetic(2.0, 300, [100.0, 3000.0]), 1.0, fleet)
    times = scrape_times(float(served.finish.max()), 15.0, shape)
    out = io.StringIO()
    render(served, fleet, times, SIMULATE_START.timestamp(), shape, out)
    return out.getvalue(), times


def test_counters_count_every_request_once() -> None:
    text, _ = _render(Shape())
    assert text.endswith("# EOF\n")
    finished = [_series(text, "vllm:request_generation_tokens_count", pod)[-1] for pod in ("chat-8b-0", "chat-8b-1")]
    assert sum(finished) == 600  # 2 req/s for 300 s, all finished by the last scrape
    running = _series(text, "vllm:num_requests_running")
    assert running[-1] == 0 and max(running) > 0


def test_a_restart_sets_counters_back_to_zero_and_a_gap_drops_scrapes() -> None:
    text, times = _render(Shape(gaps=((60.0, 120.0),), restarts=(150.0,)))
    assert not np.any((times >= 60) & (times < 120))
    tokens = _series(text, "vllm:generation_tokens_total")
    drops = [i for i in range(1, len(tokens)) if tokens[i] < tokens[i - 1]]
    assert [times[i] for i in drops] == [150.0]


def test_the_limit_cuts_and_is_counted_as_length() -> None:
    """Requests alternate 100 and 3000 wanted tokens over two pods: pod 1 gets every 3000, cut to 1000."""
    text, _ = _render(Shape(), token_limit=1000)
    labels = 'model_name="chat-8b",namespace="serving",pod="chat-8b-1"'

    def last(series: str) -> float:
        return float([line for line in text.splitlines() if line.startswith(series + " ")][-1].split()[1])

    assert last(f'vllm:request_success_total{{{labels},finished_reason="length"}}') == 300
    assert last(f'vllm:request_success_total{{{labels},finished_reason="stop"}}') == 0
    assert _series(text, "vllm:request_generation_tokens_sum", "chat-8b-1")[-1] == 300 * 1000


def test_without_leaves_a_family_out() -> None:
    text, _ = _render(Shape(without=frozenset({"vllm:request_generation_tokens"})))
    assert "vllm:request_generation_tokens_bucket" not in text
    assert "vllm:generation_tokens_total" in text
