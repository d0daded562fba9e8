"""The spend ledger and the allowed spend rate.

An hourly ceiling caps the rate.  A daily or monthly ceiling is a budget for the calendar
period (UTC): the allowed rate is the even pace, ``remaining / time left``, times a bounded
burst factor.  Re-evaluated every reconcile, that rate shrinks as the budget is used, so the
period total approaches the ceiling without passing it (``remaining`` decays like
``(time left / period)^burst``) and is not gone by noon.

The rate is also bounded by the burst factor times the period's even pace (``amount / period``):
money left unspent by a quiet morning is not spent at a hundred times the pace in the last
minutes of the day.  An end-of-period splurge is not intended -- it buys capacity nobody planned
for, at the moment a budget owner least expects it -- so what a quiet period leaves is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from modelbudget.api.spec import Budget, Period
from modelbudget.api.status import Ledger


def period_bounds(period: Period, now: datetime) -> tuple[datetime, datetime]:
    now = now.astimezone(UTC)
    if period is Period.HOUR:
        start = now.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if period is Period.DAY:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def _hours(delta: timedelta) -> float:
    return max(delta.total_seconds(), 0.0) / 3600.0


def accrue(
    ledger: Ledger | None, running_per_hour: float, now: datetime, period: Period, at_spec_prices: bool = True
) -> Ledger:
    """Add what ran since the last accrual; start a new period when the old one has ended.

    Between two observations the cluster ran at the old rate, the new rate, or something in
    between: the larger of the two is charged, so the ledger errs on the side of spent money.
    Time before the first observation is unknown and not charged (the status says when the
    ledger started).  ``at_spec_prices``: whether this accrual is billed at the spec's prices
    (else at observed ones); the ledger keeps that part apart.
    """
    start, _ = period_bounds(period, now)
    if ledger is None:
        return Ledger(period_start=start, spent=0.0, accrued_at=now, rate_per_hour=running_per_hour)
    rate = max(ledger.rate_per_hour, running_per_hour)
    if ledger.period_start < start:  # the period rolled over since the last accrual
        since = max(start, ledger.accrued_at)
        charge = rate * _hours(now - since)
        return Ledger(
            period_start=start,
            spent=charge,
            accrued_at=now,
            rate_per_hour=running_per_hour,
            spent_at_spec_prices=charge if at_spec_prices else 0.0,
        )
    charge = rate * _hours(now - ledger.accrued_at)
    return Ledger(
        period_start=ledger.period_start,
        spent=ledger.spent + charge,
        accrued_at=max(now, ledger.accrued_at),
        rate_per_hour=running_per_hour,
        spent_at_spec_prices=ledger.spent_at_spec_prices + (charge if at_spec_prices else 0.0),
    )


@dataclass(frozen=True)
class Allowance:
    per_hour: float
    paced: bool
    remaining: float | None  # dollars left in the period (paced ceilings only)
    hours_left: float | None

    def explain(self) -> str:
        if not self.paced:
            return f"hourly ceiling ${self.per_hour:.2f}/h"
        return f"paced budget: ${self.remaining:.2f} left for {self.hours_left:.2f} h -> ${self.per_hour:.2f}/h allowed"


def allowed_rate(budget: Budget, ledger: Ledger, now: datetime) -> Allowance:
    ceiling = budget.ceiling
    if ceiling.period is Period.HOUR:
        return Allowance(ceiling.amount, paced=False, remaining=None, hours_left=None)
    start, end = period_bounds(ceiling.period, now)
    remaining = max(ceiling.amount - ledger.spent, 0.0)
    hours_left = max(_hours(end - now), 1.0 / 3600.0)
    pace = min(remaining / hours_left, ceiling.amount / _hours(end - start))
    return Allowance(budget.burst_factor * pace, True, remaining, hours_left)


def projected_period_end(ledger: Ledger, running_per_hour: float, period: Period, now: datetime) -> float:
    _, end = period_bounds(period, now)
    return ledger.spent + running_per_hour * _hours(end - now)
