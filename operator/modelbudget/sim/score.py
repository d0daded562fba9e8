"""Scores per policy (DESIGN.md "The benchmark"), computed from what the world recorded.

Per scored request, with ``L`` the limit in force when it started: ``clamp(a + b ln min(W, L), 0, 1)``
if it was served within the latency SLO, else 0 (dropped, timed out, late, or still queued at the
end).  Breaches: a minute counts when, in any step of it, the spend rate of the nodes that existed
was above the allowance -- the hourly ceiling itself, or for a Day/Month ceiling the paced rate
``burstFactor * remaining / time left`` computed from what the policy had actually spent, as of the
decision in force (the rate the planner promises never to exceed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelbudget.api.spec import ModelBudgetSpec
from modelbudget.core.curve import resolve_curve
from modelbudget.sim.run import PolicyRun, Workload
from modelbudget.sim.world import QUEUED, REJECTED, SERVED, TIMED_OUT, World

_EPS = 1e-9


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    requests: int
    served: int
    timed_out: int
    rejected: int
    still_queued: int
    slo_met: int
    total_score: float
    dollars: float
    breach_minutes: int
    limit_changes: int  # times the published token limit moved: ConfigMap writes, Events, gate reloads
    value_per_point: float

    @property
    def dropped(self) -> int:
        return self.timed_out + self.rejected

    @property
    def mean_score(self) -> float:
        return self.total_score / self.requests if self.requests else 0.0

    @property
    def slo_attainment(self) -> float:
        return self.slo_met / self.requests if self.requests else 1.0

    @property
    def score_per_dollar(self) -> float:
        return self.total_score / self.dollars if self.dollars > 0 else float("inf")

    @property
    def net_value(self) -> float:
        return self.value_per_point * self.total_score - self.dollars


def judged(world: World, spec: ModelBudgetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Every request's quality at the limit it started under, and whether it was served within the
    SLO (what its score counts only when)."""
    curve = resolve_curve(spec.curve)
    used = np.maximum(np.minimum(world.wanted, world.limit), 1.0)
    quality = np.clip(curve.intercept + curve.slope * np.log(used), 0.0, 1.0)
    on_time = (world.status == SERVED) & (world.finish - world.arrival <= spec.slo.latency_seconds)
    return quality, on_time


def request_scores(run: PolicyRun, work: Workload, spec: ModelBudgetSpec) -> np.ndarray:
    """Each scored request's score (0 unless served within the SLO)."""
    quality, on_time = judged(run.world, spec)
    return np.where(on_time, quality, 0.0)[work.scored]


def minutes_over(t: np.ndarray, spend_rate: np.ndarray, allowance: np.ndarray) -> int:
    """Minutes in which any step's spend rate was above the allowance."""
    over = spend_rate > allowance + _EPS
    return int(np.unique(np.floor(t / 60.0).astype(np.int64)[over]).size)


def breach_minutes(run: PolicyRun) -> int:
    s = run.series
    return minutes_over(s.t, s.spend_rate, s.allowance)


def score(run: PolicyRun, work: Workload, spec: ModelBudgetSpec) -> PolicyResult:
    world = run.world
    status = world.status[work.scored]
    _, on_time = judged(world, spec)
    return PolicyResult(
        policy=run.policy,
        requests=int(status.size),
        served=int(np.count_nonzero(status == SERVED)),
        timed_out=int(np.count_nonzero(status == TIMED_OUT)),
        rejected=int(np.count_nonzero(status == REJECTED)),
        still_queued=int(np.count_nonzero(status == QUEUED)),
        slo_met=int(np.count_nonzero(on_time[work.scored])),
        total_score=float(request_scores(run, work, spec).sum()),
        dollars=float(np.sum(run.series.spend_rate) * run.step / 3600.0),
        breach_minutes=breach_minutes(run),
        limit_changes=int(np.count_nonzero(np.diff(run.series.token_limit))),
        value_per_point=spec.budget.value_of_point,
    )
