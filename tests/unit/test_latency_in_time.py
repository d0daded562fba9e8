"""The economic search values a limit only for the requests that finish in time (as the oracles count
them), at the batch of a busy moment with a margin for bursts between decisions (BURST_MARGIN)."""

from __future__ import annotations

import numpy as np
import pytest

from modelbudget.api import ControllerState
from modelbudget.core import DemandSample, Observation, resolve
from modelbudget.core.generation import QUANTILES, GenerationProfile
from modelbudget.core.observation import GateReport
from modelbudget.core.planner import _best_replicas_in_time, context
from tests.builders import NOW, make_spec

# make_spec's pool: 1000 tok/s per replica on a full batch of 256, so ITL = 0.02 + 0.000921875 * b
# seconds; nodes of 4 replicas at $8/h.  Every request wants more than 256 tokens, so at a limit of
# 256 each generates 256: 6 req/s * 256 = 1536 tok/s, and it is in time within a 10 s SLO (no
# prompt) when 255 * itl(busy) <= 10, i.e. a busy batch of at most 20.84 sequences.
# With z = 2 * 1.645 = 3.29, busy = b + 3.29 sqrt(b): 4 replicas generate 384 tok/s each at a mean
# batch b = 384 * 0.02 / (1 - 384 * 0.000921875) = 11.89, busy 23.2 (late); 5 replicas 307 tok/s at
# b = 8.57, busy 18.2 (in time): 5 replicas, 2 nodes, $16/h.  (The SLO's percentile alone,
# z = 1.645, allows b <= 14.57, 436 tok/s a replica: 4 replicas; tokens/s alone 2.)
LIMIT, RPS = 256.0, 6.0
SCORE_AT_LIMIT = 0.1 + 0.08 * np.log(LIMIT)  # make_spec's curve


def context_at(value_per_point: float):
    spec = make_spec(slo={"latencySeconds": 10}, budget={"valuePerPoint": value_per_point})
    obs = Observation(
        current_replicas=4,
        ready_replicas=4,
        current_nodes={"pool-a": 1},
        current_token_limit=int(LIMIT),
        demand=DemandSample(
            at=NOW,
            request_rate=RPS,
            generation=GenerationProfile(np.full(QUANTILES, 1e9)),
            requests_waiting=0.0,
            gates=GateReport((LIMIT,)),
        ),
    )
    ctx, _ = context(obs, resolve(spec), ControllerState(), NOW)
    return ctx


def grid_index(ctx, limit: float) -> int:
    [index] = np.flatnonzero(ctx.resolved.grid == limit)
    return int(index)


def test_replicas_are_bought_until_the_busy_batch_is_in_time() -> None:
    ctx = context_at(0.01)  # every request in time is worth 0.01 * 6 * 3600 * score = $117.4/h
    [(n, net)] = _best_replicas_in_time(ctx, [grid_index(ctx, LIMIT)], [ctx.demand], [RPS], fewest=[4])
    assert n == 5
    assert net == pytest.approx(0.01 * RPS * 3600 * SCORE_AT_LIMIT - 16.0)


def test_late_requests_are_worth_nothing_so_cheap_value_buys_no_replicas() -> None:
    ctx = context_at(0.0001)  # $1.17/h of value in time cannot pay the second node's $8/h
    [(n, net)] = _best_replicas_in_time(ctx, [grid_index(ctx, LIMIT)], [ctx.demand], [RPS], fewest=[4])
    assert n == 4
    assert net == pytest.approx(-8.0)  # 4 replicas run batches too busy: nothing in time, one node paid
