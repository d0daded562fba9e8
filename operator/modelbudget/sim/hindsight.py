"""The peer a careful SRE would configure: the HPA at the best fixed token limit, chosen in hindsight.

The HPA-style baseline runs at the top of the token range, so under a binding ceiling its
replicas cannot keep up and it collapses; beating it proves little.  ``hpa-best`` replays the
same trace once per fixed limit -- every doubling from the smallest to the largest, plus the top --
and keeps the run with the best net value (``valuePerPoint x total score - dollars``).  It knows
the whole trace, so no fixed-limit HPA configuration does better on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.core.planner import resolve
from modelbudget.sim.run import PolicyRun, SimConfig, Workload, run_policy
from modelbudget.sim.score import score

NAME = "hpa-best"


def fixed_limits(spec: ModelBudgetSpec) -> list[int]:
    """The limits tried: each doubling from the bottom of the token range, and its top."""
    r = resolve(spec)
    doublings = int(np.floor(np.log2(r.token_max / r.token_min)))
    return sorted({*(r.token_min * 2**k for k in range(doublings + 1)), r.token_max})


def run_best_fixed_limit_hpa(
    spec: ModelBudgetSpec, work: Workload, config: SimConfig, progress: Callable[[float], None] | None = None
) -> tuple[PolicyRun, int]:
    """The HPA's run at the fixed limit with the best net value, and that limit."""
    limits = fixed_limits(spec)
    best: tuple[float, PolicyRun, int] | None = None
    for i, limit in enumerate(limits):
        run = run_policy(spec, work, "hpa", replace(config, hpa_limit=limit))
        net = score(run, work, spec).net_value
        if best is None or net > best[0]:
            best = (net, run, limit)
        if progress is not None:
            progress((i + 1) / len(limits))
    assert best is not None
    return replace(best[1], policy=NAME), best[2]
