"""Demand over the next node-provisioning horizon: what to expect, and an upper quantile.

The model, ``holt+growth-quantile``, chosen by measurement (``bench/forecast.py``):

- history: the peak request rate of each ``bucket`` seconds, the last ``HISTORY_BUCKETS`` of them,
  kept in ``status.controllerState.demandHistory`` so that a restart loses none of it;
- expected: Holt's linear trend (level ``alpha``, trend ``beta``, damped by ``PHI``), the mean rate
  over the next ``h`` buckets;
- upper: the latest peak plus the ``q``-quantile of the growth the history has shown over the same
  horizon, ``max(x[t+1..t+h]) - x[t]``: an empirical, self-calibrating bound on how much demand
  rises within the time new capacity takes to arrive.  It is never below the expected rate.

Stale input never feeds it: only trusted observations are recorded, a gap longer than the horizon
starts the history afresh, and no forecast is given unless the last bucket is the current one and
the history spans at least ``MIN_HORIZONS`` horizons.  Pure: time is an argument.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from modelbudget.api.status import DemandHistory

MODEL = "holt+growth-quantile"
HISTORY_BUCKETS = 120  # an hour of 30 s buckets: enough growth samples, a few KiB of status
MIN_HORIZONS = 3  # the growth quantile needs a few horizons of history to mean anything
ALPHA, BETA, PHI = 0.5, 0.2, 0.9  # Holt's smoothing of level and trend, and the trend's damping
_SIGNIFICANT = 4  # digits kept per bucket: status stays compact, forecasts do not notice


@dataclass(frozen=True)
class Forecast:
    model: str
    horizon_seconds: float
    quantile: float
    expected: float  # mean requests/s over the horizon
    upper: float  # the quantile of the peak requests/s within the horizon
    buckets: int  # history it was made from

    def explain(self) -> str:
        return (
            f"{self.model} over {self.horizon_seconds:.0f}s: expected {self.expected:.3g} req/s, "
            f"p{self.quantile * 100:g} peak {self.upper:.3g} req/s ({self.buckets} buckets)"
        )


def _round(value: float) -> float:
    return float(f"{value:.{_SIGNIFICANT}g}")


def record(
    history: DemandHistory | None, rate: float, now: datetime, bucket_seconds: int, horizon_seconds: float
) -> DemandHistory:
    """Add one trusted observation of the request rate: each bucket keeps its peak."""
    rate = _round(max(rate, 0.0))
    fresh = DemandHistory(start=now, bucket_seconds=bucket_seconds, peaks=[rate])
    if history is None or history.bucket_seconds != bucket_seconds or now < history.start:
        return fresh
    index = int((now - history.start).total_seconds() // bucket_seconds)
    gap = index - (len(history.peaks) - 1)
    if gap * bucket_seconds > horizon_seconds:  # blind for longer than a horizon: begin again
        return fresh
    peaks = list(history.peaks)
    if gap <= 0:
        peaks[-1] = max(peaks[-1], rate)
    else:  # a short gap: the buckets missed are taken to be like the last one seen
        peaks.extend([peaks[-1]] * (gap - 1) + [rate])
    drop = max(len(peaks) - HISTORY_BUCKETS, 0)
    start = history.start + timedelta(seconds=drop * bucket_seconds)
    return DemandHistory(start=start, bucket_seconds=bucket_seconds, peaks=peaks[drop:])


def forecast(history: DemandHistory | None, now: datetime, horizon_seconds: float, quantile: float) -> Forecast | None:
    """The forecast from ``history`` as of ``now``; None without enough recent history."""
    if history is None or not history.peaks:
        return None
    bucket = history.bucket_seconds
    last_end = history.start + timedelta(seconds=len(history.peaks) * bucket)
    if now >= last_end:  # the current bucket was not recorded: the input is stale
        return None
    h = max(1, math.ceil(horizon_seconds / bucket))
    x = np.asarray(history.peaks, dtype=float)
    if x.size < MIN_HORIZONS * h + 1:
        return None
    expected = _holt_mean(x, h)
    # Growth over every horizon in the history: the highest peak within h buckets after t, less x[t].
    ahead = x[1 : x.size - h + 1].copy()
    for k in range(2, h + 1):  # a running maximum over the window: h small calls, not a strided view
        np.maximum(ahead, x[k : x.size - h + k], out=ahead)
    growth = ahead - x[: ahead.size]
    upper = max(float(x[-1] + quantile_of(growth, quantile)), expected, 0.0)
    return Forecast(MODEL, float(horizon_seconds), quantile, expected, upper, int(x.size))


def quantile_of(values: np.ndarray, q: float) -> float:
    """``np.quantile(values, q)`` (its default, linear method), the same arithmetic step by step
    without its general machinery, which costs more than the sort on the few hundred values here
    (the planner forecasts at every decision)."""
    ordered = np.sort(values)
    last = ordered.size - 1
    if math.isnan(ordered[-1]):  # NaN sorts last; numpy's answer is then NaN
        return math.nan
    virtual = last * q
    if virtual >= last or virtual < 0:
        return float(ordered[-1] if virtual >= last else ordered[0])
    low = math.floor(virtual)
    t = virtual - low
    a, b = float(ordered[low]), float(ordered[low + 1])
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _holt_mean(x: np.ndarray, h: int) -> float:
    """Holt's damped linear trend: the mean of the next ``h`` forecasts, never negative."""
    level, trend = float(x[0]), 0.0
    # Python floats: the recursion is scalar.  The constant factors are worked out once (the same
    # products, in the same order), not in each of the history's ~120 steps.
    alpha, keep, phi, beta, decay = ALPHA, 1 - ALPHA, PHI, BETA, (1 - BETA) * PHI
    for value in x[1:].tolist():
        previous = level
        level = alpha * value + keep * (level + phi * trend)
        trend = beta * (level - previous) + decay * trend
    ahead = level + trend * _damped_sums(h)
    return max(float(ahead.sum()) / h, 0.0)  # the mean, as np.mean takes it


@functools.lru_cache(maxsize=16)  # one horizon per spec
def _damped_sums(h: int) -> np.ndarray:
    """``PHI + PHI**2 + ... + PHI**k`` for k = 1..h: how far the damped trend carries."""
    sums: np.ndarray = np.cumsum(PHI ** np.arange(1, h + 1))
    sums.flags.writeable = False  # shared by every forecast
    return sums
