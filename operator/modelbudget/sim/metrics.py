"""What Prometheus and the apiserver would show about the simulated world at one instant.

Policies see the world only through a ``Scrape``: the default vLLM queries of ``spec.metrics``
evaluated over ``spec.metrics.window`` (so demand is the rate of *completed* requests, and
generation lengths are already cut at the limit that was in force), the instantaneous queue
gauges, and the cluster facts a controller reads from the apiserver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from modelbudget.sim.world import World

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def window_seconds(window: str) -> float:
    """A Prometheus range like ``2m`` in seconds."""
    match = re.fullmatch(r"([0-9]+)(s|m|h)", window)
    if match is None:
        raise ValueError(f"not a Prometheus range: {window!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def buckets_1_2_5(largest: float) -> list[float]:
    """vLLM's generation-token histogram bounds: 1, 2, 5, 10, 20, 50, ... up to ``largest``."""
    out: list[float] = []
    magnitude = 1
    while True:
        for m in (1, 2, 5):
            if m * magnitude > largest:
                return out
            out.append(float(m * magnitude))
        magnitude *= 10


def p95(values: np.ndarray) -> float:
    """``np.quantile(values, 0.95)`` (its default, linear method) without its per-call overhead,
    which on the small arrays of one scrape window cost more than the sort (a week's replay
    scrapes 40,000 times)."""
    ordered = np.sort(values)
    position = 0.95 * (ordered.size - 1)
    low = int(position)
    high = min(low + 1, ordered.size - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


@dataclass(frozen=True)
class Scrape:
    # rates over the window (per second), as the default queries return them
    request_rate: float
    truncated_rate: float
    generation_tokens_rate: float
    prompt_tokens_rate: float
    generation_histogram: list[tuple[float, float]]  # cumulative (le, rate), +Inf last
    latency_p95: float | None
    # gauges now
    waiting: float
    # from the apiserver
    replicas: int
    ready_replicas: int
    nodes: dict[str, int]
    token_limit: int


def scrape(world: World, now: float, window: float, bounds: list[float]) -> Scrape:
    done = np.asarray(world.completed_since(now - window), dtype=np.int64)
    wanted, limit = world.wanted[done], world.limit[done]
    tokens = np.minimum(wanted, limit)
    truncated = int(np.count_nonzero(wanted > limit))
    counts = np.searchsorted(np.sort(tokens), bounds, side="right")
    histogram = [(le, c / window) for le, c in zip(bounds, counts.tolist(), strict=True)]
    histogram.append((float("inf"), done.size / window))
    latency = world.finish[done] - world.arrival[done]
    return Scrape(
        request_rate=done.size / window,
        truncated_rate=truncated / window,
        generation_tokens_rate=float(tokens.sum()) / window,
        prompt_tokens_rate=float(world.prompt[done].sum()) / window,
        generation_histogram=histogram,
        latency_p95=p95(latency) if done.size else None,
        waiting=float(world.waiting()),
        replicas=world.replicas(),
        ready_replicas=world.ready_replicas(now),
        nodes=world.nodes(),
        token_limit=world.token_limit,
    )
