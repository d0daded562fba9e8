"""The policies compared: this project's planner and the usual alternatives.

Every policy sees the world only through a ``Scrape`` (the oracle, in ``oracle.py``, is the one
exception: it is the upper bound because it sees more) and answers with an ``Action``.

- ``PlannerPolicy``: the real ``modelbudget.core.decide``, its controller state carried from
  one decision to the next exactly as the operator carries it in status.
- ``HpaPolicy``: a Kubernetes HPA on token-throughput utilisation with the HPA's defaults.
- ``KedaPolicy``: the same HPA machinery driven by queue depth, as KEDA's Prometheus scaler
  on ``vllm:num_requests_waiting`` does.
- ``StaticPolicy``: everything the ceiling buys, all the time.

- ``hpa-best`` (``sim/hindsight.py``): the HPA at the one fixed token limit that, in hindsight,
  gives the best net value on the same trace -- what a careful SRE would configure.

The baselines keep the limit fixed (at the top of the token range unless given) and leave nodes to a cluster
autoscaler (``ClusterAutoscaler``).  Their ``max replicas`` is what the ceiling buys at full scale
(the even pace for a Day/Month budget), so they cannot breach it by construction.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from datetime import datetime, timedelta
from typing import Protocol

from modelbudget.api.spec import ModelBudgetSpec, Period
from modelbudget.api.status import ControllerState, Plan
from modelbudget.core import DemandSample, Observation, decide, resolve
from modelbudget.core.capacity import CapacityLadder
from modelbudget.core.generation import GenerationProfile
from modelbudget.core.observation import GateReport
from modelbudget.core.pacing import period_bounds
from modelbudget.sim.metrics import Scrape
from modelbudget.sim.world import Action


class Policy(Protocol):
    name: str

    def act(self, seen: Scrape, now: datetime) -> Action: ...


def even_pace(spec: ModelBudgetSpec, at: datetime) -> float:
    """$/hour that spends the ceiling exactly over its period: the amount itself for an hourly cap."""
    ceiling = spec.budget.ceiling
    if ceiling.period is Period.HOUR:
        return ceiling.amount
    start, end = period_bounds(ceiling.period, at)
    return ceiling.amount / ((end - start).total_seconds() / 3600.0)


def observation(seen: Scrape, now: datetime) -> Observation:
    """The Observation the operator's Prometheus adapter would build from the same queries."""
    profile = None
    generated = None
    if seen.request_rate > 0:
        profile = GenerationProfile.from_histogram(seen.generation_histogram, seen.truncated_rate / seen.request_rate)
        generated = seen.generation_tokens_rate / seen.request_rate
    return Observation(
        current_replicas=seen.replicas,
        ready_replicas=seen.ready_replicas,
        current_nodes=seen.nodes,
        current_token_limit=seen.token_limit,
        demand=DemandSample(
            at=now,
            request_rate=seen.request_rate,
            prompt_tokens_per_request=seen.prompt_tokens_rate / seen.request_rate if seen.request_rate else None,
            generated_tokens_per_request=generated,
            generation=profile,
            requests_waiting=seen.waiting,
            latency_p95_seconds=seen.latency_p95,
            # The simulated serving path clamps every request to the published limit.
            gates=GateReport((float(seen.token_limit),)),
        ),
    )


class PlannerPolicy:
    name = "planner"

    def __init__(self, spec: ModelBudgetSpec) -> None:
        self.resolved = resolve(spec)
        self.state = ControllerState()
        self.last: Plan | None = None

    def act(self, seen: Scrape, now: datetime) -> Action:
        decision = decide(observation(seen, now), self.resolved, self.state, now)
        self.state, self.last = decision.next_state, decision.plan
        plan = decision.plan
        return Action(
            replicas={a.pool: a.replicas for a in plan.pools},
            nodes=plan.nodes_by_pool(),
            token_limit=plan.token_limit,
            admitted_rps=plan.admitted_requests_per_second,
        )


class ClusterAutoscaler:
    """Nodes for the pods, cheapest pool first; a node goes once unneeded for ``unneeded`` seconds."""

    def __init__(self, spec: ModelBudgetSpec, unneeded: float) -> None:
        self.ladder = CapacityLadder(spec)
        self.unneeded = timedelta(seconds=unneeded)
        self.history: deque[tuple[datetime, dict[str, int]]] = deque()

    def action(self, replicas: int, limit: int, now: datetime) -> Action:
        allocation = self.ladder.allocation(replicas)
        self.history.append((now, allocation.nodes))
        while now - self.history[0][0] >= self.unneeded:
            self.history.popleft()
        nodes = {pool: max(n[pool] for _, n in self.history) for pool in allocation.nodes}
        return Action(allocation.replicas, nodes, limit)


class _HorizontalScaler(ABC):
    """The HPA algorithm: ``desired = ceil(base * ratio)`` unless the ratio is within the tolerance
    of 1; scale-down takes the highest recommendation of the last 300 s; scale-up adds at most
    max(4 pods, 100%) per 15 s sync (the HPA's default behaviour)."""

    name = "hpa"

    def __init__(
        self,
        spec: ModelBudgetSpec,
        start: datetime,
        unneeded: float,
        tolerance: float = 0.1,
        window: float = 300.0,
        limit: int | None = None,
    ) -> None:
        self.ladder = CapacityLadder(spec)
        self.min = spec.replicas.min
        self.max = min(spec.replicas.max, self.ladder.total_slots, self.ladder.max_affordable(even_pace(spec, start)))
        self.limit = resolve(spec).token_max if limit is None else limit
        self.tolerance = tolerance
        self.window = timedelta(seconds=window)
        self.recommendations: deque[tuple[datetime, int]] = deque()
        self.nodes = ClusterAutoscaler(spec, unneeded)

    @abstractmethod
    def usage(self, seen: Scrape) -> tuple[int, float] | None:
        """(base replicas, metric / target); None when the metric says nothing."""

    def act(self, seen: Scrape, now: datetime) -> Action:
        current = seen.replicas
        usage = self.usage(seen)
        desired = current
        if usage is not None and abs(usage[1] - 1.0) > self.tolerance:
            desired = math.ceil(usage[0] * usage[1])
        desired = min(max(desired, self.min), self.max)
        self.recommendations.append((now, desired))
        while now - self.recommendations[0][0] >= self.window:
            self.recommendations.popleft()
        if desired > current:
            desired = min(desired, max(current + 4, 2 * current))
        elif desired < current:
            desired = min(current, max(r for _, r in self.recommendations))
        return self.nodes.action(desired, self.limit, now)


class HpaPolicy(_HorizontalScaler):
    """Utilisation: generated tokens/s over what the ready replicas generate flat out."""

    name = "hpa"

    def __init__(
        self, spec: ModelBudgetSpec, start: datetime, unneeded: float, target: float, limit: int | None = None
    ) -> None:
        super().__init__(spec, start, unneeded, limit=limit)
        self.target = target

    def usage(self, seen: Scrape) -> tuple[int, float] | None:
        if seen.ready_replicas == 0:
            return None  # the HPA does not act on pods that report nothing
        utilisation = seen.generation_tokens_rate / self.ladder.throughput(seen.ready_replicas)
        return seen.ready_replicas, utilisation / self.target


class KedaPolicy(_HorizontalScaler):
    """Queue depth: waiting requests per replica against a threshold (an ``AverageValue`` target)."""

    name = "keda"

    def __init__(self, spec: ModelBudgetSpec, start: datetime, unneeded: float, threshold: float) -> None:
        super().__init__(spec, start, unneeded)
        self.threshold = threshold

    def usage(self, seen: Scrape) -> tuple[int, float] | None:
        base = max(seen.replicas, 1)
        return base, seen.waiting / (base * self.threshold)


class StaticPolicy:
    """Provisioned for the ceiling: the most replicas its (even-paced) rate buys, limit at the top."""

    name = "static"

    def __init__(self, spec: ModelBudgetSpec, start: datetime) -> None:
        ladder = CapacityLadder(spec)
        replicas = min(spec.replicas.max, ladder.total_slots, ladder.max_affordable(even_pace(spec, start)))
        allocation = ladder.allocation(replicas)
        limit = resolve(spec).token_max
        self.fixed = Action(allocation.replicas, allocation.nodes, limit)

    def act(self, seen: Scrape, now: datetime) -> Action:
        return self.fixed
