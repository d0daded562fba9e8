"""Request demand for the synthetic model server: trace replay or a rate curve.

Pure: callers ask for the requests arriving in ``[start, end)`` (seconds on the server's own
clock) and get them in arrival order. Randomness comes only from the numpy Generator passed
in, so a seed reproduces a run. Wanted tokens are ``W = generated * reasoning_factor``
(DESIGN.md: traces from services without reasoning are scaled so the token limit binds).
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from modelbudget.testbed.serving import Request


@dataclass(frozen=True)
class TraceRow:
    offset: float  # seconds since the trace's first request
    prompt_tokens: int
    generated_tokens: int


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value).timestamp()


def read_trace(
    path: str | Path,
    time_column: str = "TIMESTAMP",
    prompt_column: str = "ContextTokens",
    generated_column: str = "GeneratedTokens",
) -> list[TraceRow]:
    """Read a trace CSV (timestamps as ISO date-times or seconds) into rows sorted by time."""
    with open(path, newline="") as f:
        raw = [
            (_seconds(row[time_column]), int(row[prompt_column]), int(row[generated_column]))
            for row in csv.DictReader(f)
        ]
    if not raw:
        raise ValueError(f"trace {path} has no rows")
    raw.sort()
    t0 = raw[0][0]
    return [TraceRow(t - t0, p, g) for t, p, g in raw]


def wanted_tokens(generated: int, reasoning_factor: float) -> int:
    return max(1, round(generated * reasoning_factor))


def parse_rate_curve(text: str) -> list[tuple[float, float]]:
    """Parse ``"0:2,60:10,120:30"`` (seconds:req/s) into sorted, validated points."""
    points = []
    for item in text.split(","):
        t, _, rps = item.strip().partition(":")
        points.append((float(t), float(rps)))
    if not points or points[0][0] != 0:
        raise ValueError(f"rate curve {text!r} must start at second 0")
    if any(b[0] <= a[0] for a, b in itertools.pairwise(points)):
        raise ValueError(f"rate curve {text!r} times must increase")
    if any(rps < 0 or not math.isfinite(rps) for _, rps in points):
        raise ValueError(f"rate curve {text!r} rates must be finite and >= 0")
    return points


def curve_value(points: Sequence[tuple[float, float]], t: float) -> float:
    """Piecewise-linear interpolation; the last rate holds after the last point."""
    if t <= points[0][0]:
        return points[0][1]
    for (t0, r0), (t1, r1) in itertools.pairwise(points):
        if t < t1:
            return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
    return points[-1][1]


class TokenSizes(Protocol):
    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        """Return (prompt tokens, generated tokens) of one request."""
        ...


@dataclass(frozen=True)
class TraceSizes:
    """Sizes drawn uniformly from a trace's rows: keeps the trace's joint distribution."""

    rows: Sequence[TraceRow]

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        row = self.rows[int(rng.integers(len(self.rows)))]
        return row.prompt_tokens, row.generated_tokens


@dataclass(frozen=True)
class LognormalSizes:
    """Lognormal sizes with the given means; ``sigma=0`` gives every request the mean."""

    prompt_mean: float
    generated_mean: float
    sigma: float

    def _draw(self, rng: np.random.Generator, mean: float) -> int:
        if self.sigma == 0:
            return max(1, round(mean))
        return max(1, round(rng.lognormal(math.log(mean) - self.sigma**2 / 2, self.sigma)))

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        return self._draw(rng, self.prompt_mean), self._draw(rng, self.generated_mean)


class TraceDemand:
    """Replays a trace from ``origin``: a row at offset ``o`` arrives at ``origin + o * time_scale``.

    ``time_scale < 1`` compresses the trace (higher rate), ``> 1`` stretches it. With
    ``loop`` the trace restarts after its span plus one mean gap, so arrivals never collide.
    """

    def __init__(
        self, rows: Sequence[TraceRow], origin: float, time_scale: float, reasoning_factor: float, loop: bool
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.rows, self.origin, self.time_scale = rows, origin, time_scale
        self.reasoning_factor, self.loop = reasoning_factor, loop
        span = rows[-1].offset
        self.period = (span + span / max(1, len(rows) - 1)) * time_scale or time_scale
        self._index = 0
        self._lap = 0

    def _next_time(self) -> float | None:
        if self._index == len(self.rows):
            if not self.loop:
                return None
            self._index, self._lap = 0, self._lap + 1
        return self.origin + self._lap * self.period + self.rows[self._index].offset * self.time_scale

    def arrivals(self, start: float, end: float) -> list[Request]:
        out = []
        while (t := self._next_time()) is not None and t < end:
            row = self.rows[self._index]
            self._index += 1
            if t >= start:
                out.append(Request(t, row.prompt_tokens, wanted_tokens(row.generated_tokens, self.reasoning_factor)))
        return out

    def rate(self, now: float) -> float | None:
        """A trace has no nominal rate; the server reports the observed one instead."""
        return None


class RateDemand:
    """Arrivals following a piecewise-linear req/s curve that starts at ``origin``.

    ``poisson=True`` draws a Poisson count per interval (realistic noise); ``False`` spaces
    arrivals evenly and carries the fractional remainder, which makes the delivered count
    exact to within one request, for tests that compare rates tightly.
    """

    def __init__(
        self,
        points: Sequence[tuple[float, float]],
        origin: float,
        sizes: TokenSizes,
        reasoning_factor: float,
        rng: np.random.Generator,
        poisson: bool = True,
    ) -> None:
        self.points, self.origin, self.sizes = points, origin, sizes
        self.reasoning_factor, self.rng, self.poisson = reasoning_factor, rng, poisson
        self._carry = 0.0

    def rate(self, now: float) -> float:
        return curve_value(self.points, now - self.origin)

    def arrivals(self, start: float, end: float) -> list[Request]:
        # The midpoint rule is exact on linear segments; ticks are far shorter than segments.
        expected = self.rate((start + end) / 2) * (end - start)
        if self.poisson:
            count = int(self.rng.poisson(expected))
            times = np.sort(self.rng.uniform(start, end, count)).tolist()
        else:
            self._carry += expected
            count = int(self._carry)
            self._carry -= count
            times = [start + (end - start) * (i + 0.5) / count for i in range(count)]
        out = []
        for t in times:
            prompt, generated = self.sizes.sample(self.rng)
            out.append(Request(t, prompt, wanted_tokens(generated, self.reasoning_factor)))
        return out


class Demand(Protocol):
    def arrivals(self, start: float, end: float) -> list[Request]: ...

    def rate(self, now: float) -> float | None: ...
