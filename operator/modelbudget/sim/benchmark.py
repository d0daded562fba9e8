"""One benchmark: every policy on the same trace and spec, scored side by side, with ratios.

``run_benchmark`` is what the CLI and ``bench/simulate.py`` call; ``table_rows`` turns its results
into the rows both print (ratios to the oracle and to the HPA-style policy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

from modelbudget.api.spec import ModelBudgetSpec, Period
from modelbudget.sim import hindsight
from modelbudget.sim.run import POLICIES, PolicyRun, SimConfig, Workload, run_policy
from modelbudget.sim.score import PolicyResult, score
from modelbudget.sim.trace import Trace

# Every policy compared: those ``run_policy`` runs, and the HPA at the best fixed limit in hindsight.
COMPARED = (*POLICIES[:2], hindsight.NAME, *POLICIES[2:])


@dataclass(frozen=True)
class Benchmark:
    spec_name: str
    trace: Trace
    reasoning_factor: float
    config: SimConfig
    runs: dict[str, PolicyRun]
    results: dict[str, PolicyResult]
    hpa_best_limit: int | None = None  # the fixed limit hpa-best found best, when it ran

    def describe(self, spec: ModelBudgetSpec) -> list[str]:
        """What was simulated, in the words the report prints above the table."""
        c, ceiling = self.config, spec.budget.ceiling
        breach = (
            "the hourly ceiling"
            if ceiling.period is Period.HOUR
            else f"the paced allowance (burst {spec.budget.burst_factor:g} x min(remaining / time left, even pace), "
            "from the policy's own spend)"
        )
        lines = [
            f"{self.spec_name} on {self.trace.name}: {len(self.trace)} requests over "
            f"{self.trace.span / 60:.0f} min; wanted tokens W = generated x {self.reasoning_factor:g}",
            f"ceiling {ceiling.amount:g} USD/{ceiling.period.value}; a breach minute = spend rate over {breach}",
            f"step {c.step:g}s, decisions every {c.decision_interval:g}s (oracles: every step; oracle without delays), "
            f"replica start {c.delays.replica_start:g}s, node provisioning {c.delays.node_provision:g}s, "
            f"queue timeout {c.timeout_for(spec):g}s, SLO {spec.slo.latency_seconds:g}s, "
            f"warm-up {c.warmup:g}s (unscored)",
        ]
        if self.hpa_best_limit is not None:
            lines.append(
                f"{hindsight.NAME}: the HPA at a fixed limit of {self.hpa_best_limit} tokens, the best net value "
                f"of {len(hindsight.fixed_limits(spec))} fixed limits on this trace (chosen in hindsight)"
            )
        return lines + list(self.trace.notes)


def run_benchmark(
    spec: ModelBudgetSpec,
    spec_name: str,
    trace: Trace,
    reasoning_factor: float,
    config: SimConfig,
    policies: Sequence[str] = COMPARED,
    progress: Callable[[str, float], None] | None = None,
    workers: int = 1,
) -> Benchmark:
    """Every policy on the trace; with ``workers`` > 1, that many policies at once, each in a process
    of its own (policies share nothing but the trace, and each is seconds to minutes of pure Python)."""
    work = Workload.of(trace, reasoning_factor, config.warmup)
    done: dict[str, tuple[PolicyRun, PolicyResult, int | None]] = {}
    if workers > 1 and len(policies) > 1:
        # Spawned, not forked: the caller may run threads (a progress bar's refresh) that a fork would
        # copy mid-lock.
        with ProcessPoolExecutor(min(workers, len(policies)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_and_score, spec, work, name, config): name for name in policies}
            for name in policies:
                if progress is not None:
                    progress(name, 0.0)  # a child cannot report its progress: started, then done
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                if progress is not None:
                    progress(futures[future], 1.0)
    else:
        for name in policies:
            tick = (lambda f, n=name: progress(n, f)) if progress is not None else None
            done[name] = _run_and_score(spec, work, name, config, tick)
    runs = {name: done[name][0] for name in policies}
    results = {name: done[name][1] for name in policies}
    best_limit = next((done[name][2] for name in policies if name == hindsight.NAME), None)
    return Benchmark(spec_name, trace, reasoning_factor, config, runs, results, best_limit)


def _run_and_score(
    spec: ModelBudgetSpec,
    work: Workload,
    name: str,
    config: SimConfig,
    progress: Callable[[float], None] | None = None,
) -> tuple[PolicyRun, PolicyResult, int | None]:
    """One policy's run and score; for the HPA at the best fixed limit, also that limit."""
    best_limit = None
    if name == hindsight.NAME:
        run, best_limit = hindsight.run_best_fixed_limit_hpa(spec, work, config, progress)
    else:
        run = run_policy(spec, work, name, config, progress)
    return run, score(run, work, spec), best_limit


# Ratios: "/orc" to the oracle, "/dorc" to the delay-aware oracle, "/hpa" to the HPA-style policy,
# "/hpa-best" to the HPA at the best fixed limit in hindsight.
COLUMNS = (
    "policy",
    "mean score",
    "SLO met",
    "dropped",
    "dollars",
    "breach min",
    "limit moves",
    "score/$",
    "net value",
    "score/orc",
    "$/orc",
    "net/orc",
    "score/dorc",
    "$/dorc",
    "net/hpa",
    "net/hpa-best",
)


def _ratio(a: float, b: float) -> str:
    """``a / b``, or ``n/a`` when ``b`` is not positive (a ratio to a loss says nothing)."""
    return f"{a / b:.3f}" if 0 < b < float("inf") else "n/a"


def table_rows(bench: Benchmark) -> list[tuple[str, ...]]:
    res = bench.results
    oracle, delayed, hpa = res.get("oracle"), res.get("oracle-delays"), res.get("hpa")
    best_hpa = res.get(hindsight.NAME)
    rows: list[tuple[str, ...]] = []
    for r in res.values():
        rows.append(
            (
                r.policy,
                f"{r.mean_score:.4f}",
                f"{r.slo_attainment:.1%}",
                str(r.dropped),
                f"{r.dollars:.2f}",
                str(r.breach_minutes),
                str(r.limit_changes),
                f"{r.score_per_dollar:.1f}",
                f"{r.net_value:.2f}",
                _ratio(r.total_score, oracle.total_score) if oracle else "-",
                _ratio(r.dollars, oracle.dollars) if oracle else "-",
                _ratio(r.net_value, oracle.net_value) if oracle else "-",
                _ratio(r.total_score, delayed.total_score) if delayed else "-",
                _ratio(r.dollars, delayed.dollars) if delayed else "-",
                _ratio(r.net_value, hpa.net_value) if hpa else "-",
                _ratio(r.net_value, best_hpa.net_value) if best_hpa else "-",
            )
        )
    return rows
