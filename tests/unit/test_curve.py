"""Curve fitting, marginal performance and the inverse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelbudget.core.curve import CurveFitError, LogCurve, fit_curve
from modelbudget.core.generation import GenerationProfile


def test_fit_recovers_known_parameters_from_noisy_samples():
    rng = np.random.default_rng(7)
    tokens = np.geomspace(64, 16384, 40)
    perf = 0.12 + 0.075 * np.log(tokens) + rng.normal(0, 0.01, tokens.size)
    curve = fit_curve(tokens, perf)
    # 40 points over 8 e-folds with sigma 0.01: the slope's standard error is ~0.0007.
    assert curve.slope == pytest.approx(0.075, abs=0.003)
    assert curve.intercept == pytest.approx(0.12, abs=0.02)
    assert curve.r_squared is not None and curve.r_squared > 0.98
    assert (curve.min_tokens, curve.max_tokens) == (64, 16384)


def test_exact_samples_fit_exactly():
    t = [100, 1000, 10000]
    curve = fit_curve(t, [0.1 + 0.05 * math.log(x) for x in t])
    assert curve.slope == pytest.approx(0.05) and curve.r_squared == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("tokens", "perf", "message"),
    [
        ([1, 2], [0.1, 0.2], "at least 3 samples"),
        ([1, -2, 3], [0.1, 0.2, 0.3], "tokens must be positive"),
        ([0, 2, 3], [0.1, 0.2, 0.3], "tokens must be positive"),
        ([5, 5, 5], [0.1, 0.2, 0.3], "two different token values"),
        ([1, 2, 3], [0.3, 0.2, 0.1], "does not grow with tokens"),
        ([1, 2, float("nan")], [0.1, 0.2, 0.3], "finite"),
        ([1, 2, 3], [0.1, 0.2], "3 token values but 2"),
    ],
)
def test_bad_samples_give_clear_errors(tokens, perf, message):
    with pytest.raises(CurveFitError, match=message):
        fit_curve(tokens, perf)


def test_performance_is_clipped_and_log_linear():
    curve = LogCurve(0.1, 0.08, 64, 8192)
    assert curve.performance(10) == curve.performance(64)  # clipped to the valid range
    # each doubling buys the same
    assert curve.performance(2000) - curve.performance(1000) == pytest.approx(0.08 * math.log(2))


def test_generation_profile_from_histogram_marks_truncated_requests_unbounded():
    # 1-2-5 buckets; 30% of requests were cut at the limit.
    buckets = [(10, 10), (20, 30), (50, 60), (100, 80), (200, 100), (float("inf"), 100)]
    profile = GenerationProfile.from_histogram(buckets, truncated_fraction=0.3)
    assert float(np.mean(profile.wanted > 1e9)) == pytest.approx(0.3, abs=1 / 64)
    assert profile.mean_generated(40) < profile.mean_generated(400) < profile.mean_generated(4000)
    # raising the limit is costed as if the truncated requests used all of it (conservative)
    assert profile.mean_generated(4000) >= 0.29 * 4000


def test_generation_profile_g_of_l_is_concave_and_bounded():
    profile = GenerationProfile.from_samples(np.random.default_rng(1).exponential(500, 2000))
    limits = np.array([10.0, 100, 1000, 10000])
    g = profile.mean_generated_many(limits)
    assert np.all(np.diff(g) >= 0) and np.all(g <= limits)
