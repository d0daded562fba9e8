"""Time-scale rules for the slow knobs: scale-up rate limit and scale-down stabilisation.

They follow the HPA's ``behavior``: scale-up may add at most ``max(replicas, percent)`` per
period, counted from the scale-ups recorded in the controller state; scale-down takes the
highest raw recommendation of the stabilisation window, so a dip in demand does not drop
replicas that the next minute needs again.  Time is always an argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta

from modelbudget.api.spec import ScaleUp
from modelbudget.api.status import Recommendation, ScaleUpEvent


def scale_up_cap(current: int, history: Sequence[ScaleUpEvent], now: datetime, policy: ScaleUp) -> int:
    window = timedelta(seconds=policy.period_seconds)
    added = sum(e.added for e in history if now - e.at < window)
    base = max(current - added, 0)
    step = max(policy.max_replicas_per_period, math.ceil(base * policy.max_percent_per_period / 100.0))
    return max(base + step, current)


def in_window(recs: Sequence[Recommendation], now: datetime, seconds: float) -> list[Recommendation]:
    window = timedelta(seconds=seconds)
    return [r for r in recs if now - r.at < window]


def stabilised_replicas(
    desired: int, current: int, recs: Sequence[Recommendation], now: datetime, window_seconds: float
) -> int:
    """For a scale-down: the highest recommendation in the window, never above ``current``."""
    if desired >= current:
        return desired
    highest = max([desired, *(r.replicas for r in in_window(recs, now, window_seconds))])
    return min(highest, current)


def stabilised_nodes(
    pool: str,
    desired: int,
    current: int,
    recs: Sequence[Recommendation],
    now: datetime,
    window_seconds: float,
) -> int:
    if desired >= current:
        return desired
    highest = max([desired, *(r.nodes.get(pool, 0) for r in in_window(recs, now, window_seconds))])
    return min(highest, current)
