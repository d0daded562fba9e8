"""The log-linear token-performance curve: ``perf(t) = a + b * ln t`` on ``[t_min, t_max]``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelbudget.api.spec import Curve


class CurveFitError(ValueError):
    """Samples that cannot give a curve; the message says what to fix."""


@dataclass(frozen=True)
class LogCurve:
    intercept: float
    slope: float
    min_tokens: int
    max_tokens: int
    r_squared: float | None = None  # set when fitted from samples

    def performance(self, tokens: float) -> float:
        """Performance at a token limit, with ``tokens`` clipped to the curve's valid range."""
        t = min(max(tokens, self.min_tokens), self.max_tokens)
        return self.intercept + self.slope * math.log(t)


def fit_curve(
    tokens: Sequence[float],
    performance: Sequence[float],
    min_tokens: int | None = None,
    max_tokens: int | None = None,
) -> LogCurve:
    """Least-squares fit of ``a + b ln t``; the valid range defaults to the sampled range."""
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(performance, dtype=float)
    if t.shape != y.shape:
        raise CurveFitError(f"got {t.size} token values but {y.size} performance values")
    if t.size < 3:
        raise CurveFitError(f"need at least 3 samples to fit a curve, got {t.size}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(y))):
        raise CurveFitError("samples must be finite numbers (found NaN or infinity)")
    if np.any(t <= 0):
        raise CurveFitError(f"tokens must be positive, got {float(t.min()):g}")
    x = np.log(t)
    if np.ptp(x) == 0:
        raise CurveFitError("samples need at least two different token values")
    design = np.column_stack([np.ones_like(x), x])
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    if b <= 0:
        raise CurveFitError(
            f"fitted slope is {b:.4g}: performance does not grow with tokens in these samples, "
            "so no token limit above the minimum is worth paying for"
        )
    residual = y - (a + b * x)
    total = float(np.sum((y - y.mean()) ** 2))
    r_squared = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0
    lo = math.floor(t.min()) if min_tokens is None else min_tokens
    hi = math.ceil(t.max()) if max_tokens is None else max_tokens
    return LogCurve(float(a), float(b), max(lo, 1), hi, r_squared)


def resolve_curve(curve: Curve) -> LogCurve:
    """The curve a spec states, fitting its samples when it gives samples instead of parameters."""
    if curve.samples is not None:
        return fit_curve(
            [s.tokens for s in curve.samples],
            [s.performance for s in curve.samples],
            curve.min_tokens,
            curve.max_tokens,
        )
    assert curve.intercept is not None and curve.slope is not None  # the spec's cross-field rule
    return LogCurve(curve.intercept, curve.slope, curve.min_tokens, curve.max_tokens)
