"""``modelbudget plan -f budget.yaml --demand-rps 40``: one decision, with its reasons, offline."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta

import numpy as np
from rich.console import Console
from rich.table import Table

from modelbudget.api import ControllerState, ModelBudgetSpec, Plan
from modelbudget.api.status import DemandHistory, Ledger
from modelbudget.cli import CliError
from modelbudget.cli.common import load_manifest
from modelbudget.core import DemandSample, Observation, decide, resolve
from modelbudget.core.curve import CurveFitError
from modelbudget.core.generation import QUANTILES, GenerationProfile
from modelbudget.core.observation import GateReport
from modelbudget.core.pacing import period_bounds
from modelbudget.core.planner import FORECAST_BUCKET_SECONDS

OBSERVED_KEYS = {
    "replicas": "replicas the Deployment has now (default: replicas.min)",
    "readyReplicas": "of those, ready (default: all)",
    "nodes.<pool>": "nodes running in a pool (default: its minNodes)",
    "tokenLimit": "token limit in force now",
    "waiting": "requests waiting in the queue",
    "meanWantedTokens": "mean tokens a request wants (exponential); default: every request uses the whole limit",
    "spent": "dollars spent so far this period (Day/Month ceilings)",
    "gates": "gates applying the published limit (default 1; 0: nothing enforces it)",
    "capacityBuffers": "1: the cluster serves SIG Autoscaling's CapacityBuffer API (default 0)",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plan", help="compute one plan for a ModelBudget and an observed demand")
    p.add_argument("-f", "--file", required=True, help="a ModelBudget manifest")
    p.add_argument("--demand-rps", type=float, required=True, help="observed requests per second")
    p.add_argument(
        "--observed",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more observed facts: " + "; ".join(f"{k}: {v}" for k, v in OBSERVED_KEYS.items()),
    )
    p.add_argument(
        "--demand-history",
        default=None,
        metavar="R1,R2,...",
        help=f"peak requests/s of each past {FORECAST_BUCKET_SECONDS}s, oldest first, up to now: the forecast's input",
    )
    p.add_argument("--at", default=None, help="decision time, ISO 8601 (default: now, UTC)")
    p.add_argument("--output", choices=["table", "json"], default="table")
    p.set_defaults(func=run)


def _parse_observed(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not (key in OBSERVED_KEYS or key.startswith("nodes.")):
            raise CliError(f"--observed {item!r}: expected KEY=VALUE with KEY one of {', '.join(OBSERVED_KEYS)}")
        try:
            out[key] = float(value)
        except ValueError as exc:
            raise CliError(f"--observed {item!r}: {value!r} is not a number") from exc
    return out


def parse_history(text: str, now: datetime) -> DemandHistory:
    """``R1,R2,...``: peak requests/s per bucket, oldest first, the last one the bucket of ``now``."""
    try:
        peaks = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise CliError(f"--demand-history {text!r}: expected comma-separated requests/s") from exc
    if not peaks or any(not np.isfinite(p) or p < 0 for p in peaks):
        raise CliError(f"--demand-history {text!r}: expected non-negative requests/s")
    start = now - timedelta(seconds=FORECAST_BUCKET_SECONDS * (len(peaks) - 1))
    return DemandHistory(start=start, bucket_seconds=FORECAST_BUCKET_SECONDS, peaks=peaks)


def build_inputs(
    spec: ModelBudgetSpec,
    demand: float,
    observed: dict[str, float],
    now: datetime,
) -> tuple[Observation, ControllerState]:
    replicas = int(observed.get("replicas", spec.replicas.min))
    nodes = {p.name: int(observed.get(f"nodes.{p.name}", p.min_nodes)) for p in spec.node_pools}
    unknown = {k[6:] for k in observed if k.startswith("nodes.")} - set(nodes)
    if unknown:
        raise CliError(f"no node pool named {', '.join(sorted(unknown))} in this ModelBudget")
    if "meanWantedTokens" in observed:
        profile = GenerationProfile.exponential(observed["meanWantedTokens"])
    else:
        profile = GenerationProfile(np.full(QUANTILES, np.inf))
    limit = observed.get("tokenLimit")
    gates = int(observed.get("gates", 1))
    applied = (limit if limit is not None else float(spec.token_limits.max or spec.curve.max_tokens),) * gates
    obs = Observation(
        current_replicas=replicas,
        ready_replicas=int(observed.get("readyReplicas", replicas)),
        current_nodes=nodes,
        current_token_limit=int(limit) if limit is not None else None,
        demand=DemandSample(
            at=now,
            request_rate=demand,
            generation=profile,
            requests_waiting=observed.get("waiting", 0.0),
            gates=GateReport(applied),
        ),
        capacity_buffers=bool(observed.get("capacityBuffers", 0)),
    )
    state = ControllerState()
    if "spent" in observed:
        start, _ = period_bounds(spec.budget.ceiling.period, now)
        state = ControllerState(
            ledger=Ledger(period_start=start, spent=observed["spent"], accrued_at=now, rate_per_hour=0.0)
        )
    return obs, state


def render(plan: Plan, name: str, console: Console) -> None:
    console.print(f"[bold]Plan for {name}[/bold] at {plan.decided_at.isoformat()}")
    knobs = Table(show_header=True, header_style="bold")
    for col in ("knob", "value"):
        knobs.add_column(col)
    knobs.add_row("replicas", str(plan.replicas))
    if plan.buffer_replicas:
        knobs.add_row("capacity buffer", f"{plan.buffer_replicas} placeholder pods (forecast headroom)")
    for a in plan.pools:
        knobs.add_row(f"pool {a.pool}", f"{a.nodes} nodes, {a.replicas} replicas, ${a.spend_per_hour:.2f}/h")
    knobs.add_row("token limit", str(plan.token_limit))
    admitted = plan.admitted_requests_per_second
    knobs.add_row("admitted rate", "all requests" if admitted is None else f"{admitted:.3g} req/s")
    knobs.add_row("spend", f"${plan.expected_spend_per_hour:.2f}/h of ${plan.allowed_spend_per_hour:.2f}/h allowed")
    knobs.add_row("expected performance", f"{plan.expected_performance:.3f} per request")
    ahead = plan.forecast
    knobs.add_row(
        "forecast",
        "none (needs recent history: --demand-history)"
        if ahead is None
        else f"{ahead.expected_requests_per_second:.3g} req/s expected, p{ahead.quantile * 100:g} peak "
        f"{ahead.upper_requests_per_second:.3g} req/s within {ahead.horizon_seconds:.0f}s ({ahead.model})",
    )
    console.print(knobs)
    if plan.reasons:
        why = Table(title="Why", show_header=True, header_style="bold")
        for col in ("knob", "reason", "detail"):
            why.add_column(col)
        for r in plan.reasons:
            why.add_row(r.knob.value, r.reason.value, r.message)
        console.print(why)


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.file)
    if args.demand_rps < 0:
        raise CliError("--demand-rps must not be negative")
    try:
        now = datetime.fromisoformat(args.at) if args.at else datetime.now(UTC)
    except ValueError as exc:
        raise CliError(f"--at {args.at!r} is not an ISO 8601 time") from exc
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    obs, state = build_inputs(manifest.spec, args.demand_rps, _parse_observed(args.observed), now)
    if args.demand_history is not None:
        state = state.model_copy(update={"demand_history": parse_history(args.demand_history, now)})
    try:
        resolved = resolve(manifest.spec)
    except CurveFitError as exc:
        raise CliError(f"{args.file}: curve.samples: {exc}") from exc
    plan = decide(obs, resolved, state, now).plan
    if args.output == "json":
        print(json.dumps(plan.model_dump(mode="json", by_alias=True), indent=2))
    else:
        if "meanWantedTokens" not in " ".join(args.observed):
            Console(stderr=True).print(
                "[dim]assuming every request uses the whole token limit "
                "(give --observed meanWantedTokens=N for a distribution)[/dim]"
            )
        render(plan, manifest.metadata.name, Console())
    return 0
