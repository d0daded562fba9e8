"""How many tokens requests want, and so what a token limit generates and scores.

A real server only shows generation lengths already cut at the limit in force, so the profile
keeps what the data can say: the wanted-token quantiles below that limit, and the fraction of
requests that hit it.  Those are assumed to want unboundedly many tokens (``inf``), which
over-estimates tokens (and so cost) when the limit is raised: the safe direction for a budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from modelbudget.core.curve import LogCurve

QUANTILES = 64
# The quantile levels each profile holds: the midpoints of QUANTILES equal slices (read-only, shared).
_LEVELS = (np.arange(QUANTILES) + 0.5) / QUANTILES
_LEVELS.flags.writeable = False
# Means are written ``sum / count``: numpy's ``mean`` is that same sum and division (the same
# numbers to the last bit) behind a few microseconds of argument handling, and the planner takes
# these means several times per decision.


@dataclass(frozen=True, eq=False)
class GenerationProfile:
    """Wanted tokens per request as ``QUANTILES`` equally likely values (sorted; ``inf`` allowed)."""

    wanted: npt.NDArray[np.float64] = field(repr=False)

    def __post_init__(self) -> None:
        if self.wanted.ndim != 1 or self.wanted.size == 0 or np.any(np.isnan(self.wanted)):
            raise ValueError("a generation profile needs a non-empty 1-D array of token counts")

    def mean_generated(self, limit: float) -> float:
        """``G(L) = E[min(W, L)]``."""
        return float(np.minimum(self.wanted, limit).sum()) / self.wanted.size

    def quantile_wanted(self, q: float) -> float:
        """The ``q``-quantile (0..1) of ``W``; under a limit ``L`` that request generates ``min(W_q, L)``."""
        index = min(max(math.ceil(q * self.wanted.size) - 1, 0), self.wanted.size - 1)  # ``wanted`` is sorted
        return float(self.wanted[index])

    def mean_generated_many(self, limits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        used = np.minimum(self.wanted[None, :], limits[:, None])
        means: npt.NDArray[np.float64] = used.sum(axis=1) / self.wanted.size
        return means

    def mean_score_many(self, curve: LogCurve, limits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``E[clamp(a + b ln min(W, L), 0, 1)]`` for each limit: the benchmark's per-request score."""
        scores = self.scores_many(curve, self.generated_many(limits))
        means: npt.NDArray[np.float64] = scores.sum(axis=1) / self.wanted.size
        return means

    def generated_many(self, limits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Per limit (rows), what each of the equally likely requests generates: ``max(min(W, L), 1)``."""
        used: npt.NDArray[np.float64] = np.maximum(np.minimum(self.wanted[None, :], limits[:, None]), 1.0)
        return used

    @staticmethod
    def scores_many(curve: LogCurve, generated: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The score of each number of generated tokens (``generated_many``'s), clamped to [0, 1]."""
        scores: npt.NDArray[np.float64] = np.clip(curve.intercept + curve.slope * np.log(generated), 0.0, 1.0)
        return scores

    @staticmethod
    def exponential(mean: float) -> GenerationProfile:
        """Wanted tokens exponentially distributed around ``mean``: the usual stand-in when only a
        mean is known (``modelbudget plan``, tests)."""
        return GenerationProfile(-np.log1p(-_LEVELS) * mean)

    @staticmethod
    def from_samples(wanted: Sequence[float] | npt.NDArray[np.float64]) -> GenerationProfile:
        """From raw per-request wanted tokens (e.g. a trace), reduced to quantiles."""
        w = np.asarray(wanted, dtype=float)
        if w.size == 0:
            raise ValueError("no samples")
        return GenerationProfile(np.quantile(w, _LEVELS))

    @staticmethod
    def from_histogram(buckets: Sequence[tuple[float, float]], truncated_fraction: float = 0.0) -> GenerationProfile:
        """From cumulative Prometheus buckets ``(le, count)`` of generated tokens per request.

        The top ``truncated_fraction`` of requests (those stopped by the limit) become ``inf``;
        the rest are read off the bucket CDF with linear interpolation inside each bucket.
        """
        pts = sorted((le, c) for le, c in buckets if not math.isnan(c))
        if not pts or pts[-1][1] <= 0:
            raise ValueError("empty histogram")
        edges = np.array([0.0] + [le for le, _ in pts])
        counts = np.array([0.0] + [c for _, c in pts])
        counts = np.maximum.accumulate(counts)  # counter resets can make rates dip
        cdf = counts / counts[-1]
        finite = np.isfinite(edges)
        known = cdf[finite]
        wanted = np.interp(_LEVELS, known, edges[finite])
        wanted[known[-1] < _LEVELS] = np.inf  # mass in the +Inf bucket
        f = min(max(truncated_fraction, 0.0), 1.0)
        if f > 0:
            wanted[1.0 - f < _LEVELS] = np.inf
        return GenerationProfile(np.sort(wanted))

    @staticmethod
    def from_mean(mean_generated: float, limit: float | None, truncated_fraction: float = 0.0) -> GenerationProfile:
        """When only the mean is known: every request wants the mean (or unbounded if truncated)."""
        wanted = np.full(QUANTILES, max(mean_generated, 1.0))
        f = min(max(truncated_fraction, 0.0), 1.0)
        if f > 0 and limit is not None:
            n = math.ceil(f * QUANTILES)
            wanted[QUANTILES - n :] = np.inf
        return GenerationProfile(np.sort(wanted))
