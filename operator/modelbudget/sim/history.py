"""Demand rebuilt from metrics history: a request trace the simulator can replay.

Prometheus holds rates and histograms, not requests.  ``rebuild`` turns the budget's own metrics,
one value per step, back into requests:

- Arrivals: requests finished (the request-rate query counts completions) plus the growth of the
  requests in the server (waiting + running) give how many arrived in each step; their times are
  spread uniformly (seeded) inside the step.
- Sizes: each request's generated tokens are drawn from the generation-length histogram of the
  step it arrived in (linear inside a bucket, as ``histogram_quantile`` reads buckets).  The top
  ``truncated / requests`` of them were cut by the limit in force, so what they wanted is not in
  the data; they are taken to want the largest limit any policy may set (``upper``), which
  counts the most tokens for them: the safe direction for a budget.
- Prompt sizes: prompt tokens over requests, per step.

What Prometheus really produces is handled, and each fallback leaves a note for the report:
steps without data (a scrape gap, a restart) are filled by interpolating the neighbouring rates;
a step whose histogram is empty uses the whole range's histogram; without any histogram, every
request of a step wants that step's mean generated tokens.  Counter resets are Prometheus'
business (``rate`` handles them); what reaches this module is already a rate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

from modelbudget.sim.trace import Trace, TraceError

FloatArray = npt.NDArray[np.float64]
_CHUNK = 200_000  # requests per vectorised draw (bounds the (requests x buckets) scratch array)


@dataclass(frozen=True, eq=False)
class History:
    """The budget's metrics over a range: one value per step, NaN where Prometheus had none.

    Rates are per second over the ``window`` that ends at the value's time (index 0 is the range's
    start: only a reference point).  ``histogram_bounds`` are the finite ``le`` of the
    generation-length histogram and ``histogram`` its cumulative rates, ``+Inf`` last.
    """

    start: datetime
    step: float
    request_rate: FloatArray
    window: float  # seconds each rate is taken over (the ``$window`` the queries ran with)
    truncated_rate: FloatArray | None = None
    prompt_tokens_rate: FloatArray | None = None
    generation_tokens_rate: FloatArray | None = None
    histogram_bounds: FloatArray | None = None
    histogram: FloatArray | None = None  # (steps, len(bounds) + 1)
    requests_waiting: FloatArray | None = None
    requests_running: FloatArray | None = None

    def between(self, first: int, end: int) -> History:
        """Steps ``[first, end)``, the first of them the new reference point."""

        def cut(values: FloatArray | None) -> FloatArray | None:
            return None if values is None else values[first:end]

        return replace(
            self,
            start=self.start + timedelta(seconds=first * self.step),
            request_rate=self.request_rate[first:end],
            truncated_rate=cut(self.truncated_rate),
            prompt_tokens_rate=cut(self.prompt_tokens_rate),
            generation_tokens_rate=cut(self.generation_tokens_rate),
            histogram=cut(self.histogram),
            requests_waiting=cut(self.requests_waiting),
            requests_running=cut(self.requests_running),
        )


def extent(values: FloatArray) -> tuple[int, int] | None:
    """First and last index with a value; ``None`` when there is none."""
    known = np.flatnonzero(~np.isnan(values))
    return (int(known[0]), int(known[-1])) if known.size else None


def missing_runs(values: FloatArray) -> list[tuple[int, int]]:
    """``[first, last)`` index ranges where ``values`` is NaN."""
    bad = np.concatenate([[False], np.isnan(values), [False]])
    edges = np.flatnonzero(np.diff(bad.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def fill_gaps(values: FloatArray) -> FloatArray:
    """NaN steps interpolated linearly between the known ones (held flat at the ends)."""
    known = np.flatnonzero(~np.isnan(values))
    if known.size == 0:
        raise ValueError("no value at all")
    return np.interp(np.arange(values.size), known, values[known])


def _describe_gaps(runs: list[tuple[int, int]], step: float, what: str) -> str:
    minutes = sum(b - a for a, b in runs) * step / 60
    longest = max(b - a for a, b in runs) * step / 60
    return (
        f"{what}: {len(runs)} gap(s), {minutes:.1f} min in all (longest {longest:.1f} min), "
        "filled by interpolating the neighbouring values"
    )


def arrivals_per_step(history: History, notes: list[str]) -> npt.NDArray[np.int64]:
    """Requests arriving in each step (index k: the step ending at k), from completions and queue."""
    rate = history.request_rate
    runs = missing_runs(rate[1:])  # index 0 only anchors the sums: a rate there needs data from before
    if np.all(np.isnan(rate)):
        raise TraceError("the request-rate query returned nothing in this range: no demand to replay")
    if runs:
        notes.append(_describe_gaps(runs, history.step, "request rate"))
    finished = np.cumsum(np.maximum(fill_gaps(rate), 0.0) * history.step)
    # A rate over a window longer than the step is centred (window - step) / 2 before its time,
    # so the sum of rates lags the counter by that much: read it that much later to line it up
    # with the queue gauges, which are instantaneous.
    times = np.arange(rate.size) * history.step
    finished = np.interp(times + (history.window - history.step) / 2, times, finished)
    in_server = np.zeros(rate.size)
    parts = [p for p in (history.requests_waiting, history.requests_running) if p is not None]
    for part in parts:
        if np.all(np.isnan(part)):
            continue
        in_server += np.maximum(fill_gaps(part), 0.0)
    if not parts:
        notes.append("no waiting/running gauges: arrivals taken as completions (shifted by the latency)")
    # Arrived by the end of step k = finished + in the server now - in the server at the start.
    arrived = np.maximum.accumulate(np.maximum(finished + in_server - in_server[0], 0.0))
    whole = np.round(arrived).astype(np.int64)
    counts = np.diff(whole, prepend=0)
    counts[0] = 0  # index 0 is the reference point: what came before the range is not replayed
    return counts


def _per_request(total: FloatArray | None, requests: FloatArray) -> FloatArray | None:
    """``total / requests`` per step; steps without requests or data take the range's mean."""
    if total is None or np.all(np.isnan(total)):
        return None
    ok = ~np.isnan(total) & (requests > 0)
    if not ok.any():
        return None
    mean = float(np.nansum(total[ok]) / np.sum(requests[ok]))
    out = np.full(requests.size, mean)
    out[ok] = total[ok] / requests[ok]
    return out


def _cdf_rows(history: History, notes: list[str]) -> FloatArray | None:
    """Per step, the generation-length CDF at the histogram's bounds (the range's where a step has none)."""
    if history.histogram is None or history.histogram_bounds is None:
        return None
    cumulative = np.maximum.accumulate(np.nan_to_num(np.maximum(history.histogram, 0.0)), axis=1)
    totals = cumulative[:, -1]
    if not np.any(totals > 0):
        return None
    overall = cumulative[totals > 0].sum(axis=0)
    empty = totals <= 0
    if np.any(empty & (history.request_rate > 0)):
        notes.append(
            f"generation-length histogram empty in {int(np.sum(empty & (history.request_rate > 0)))} step(s) "
            "with requests: those steps use the whole range's histogram"
        )
    cumulative[empty] = overall
    rows: FloatArray = cumulative[:, :-1] / cumulative[:, -1:]
    return rows


def _draw_sizes(
    steps: npt.NDArray[np.int64],
    u: FloatArray,
    cdf: FloatArray,
    bounds: FloatArray,
    upper: float,
) -> FloatArray:
    """Inverse CDF per request: linear inside a bucket; beyond the last finite bound, ``upper``."""
    edges = np.concatenate([[0.0], bounds])
    sizes = np.empty(u.size)
    for lo in range(0, u.size, _CHUNK):
        hi = min(lo + _CHUNK, u.size)
        rows = np.concatenate([np.zeros((hi - lo, 1)), cdf[steps[lo:hi]]], axis=1)  # CDF at edges
        uu = u[lo:hi]
        j = np.sum(rows <= uu[:, None], axis=1)  # first edge whose CDF exceeds u
        inside = j < edges.size
        jj = np.minimum(j, edges.size - 1)
        c0 = np.take_along_axis(rows, (jj - 1)[:, None], axis=1)[:, 0]
        c1 = np.take_along_axis(rows, jj[:, None], axis=1)[:, 0]
        width = np.where(c1 > c0, c1 - c0, 1.0)
        value = edges[jj - 1] + (uu - c0) / width * (edges[jj] - edges[jj - 1])
        sizes[lo:hi] = np.where(inside, value, upper)
    return np.clip(sizes, 1.0, upper)


def rebuild(history: History, upper: float, seed: int = 0, name: str = "prometheus") -> Trace:
    """The requests this history shows, as a trace starting at ``history.start``.

    ``upper`` is the largest token limit any policy may set (what a truncated request is taken
    to want).  Raises ``TraceError`` when the history cannot give demand or request sizes.
    """
    notes: list[str] = []
    counts = arrivals_per_step(history, notes)
    total = int(counts.sum())
    if total == 0:
        raise TraceError("Prometheus shows no requests in this range: no demand to replay")
    rng = np.random.default_rng(seed)
    # Steps cover disjoint intervals, so sorting the times keeps each request with its step.
    steps = np.repeat(np.arange(counts.size), counts)
    arrival = np.sort((steps - 1 + rng.random(total)) * history.step)
    requests_known = np.nan_to_num(history.request_rate)

    truncated = _per_request(history.truncated_rate, requests_known)
    if truncated is None:
        notes.append("no truncation figures: no request is taken to have been cut by the limit")
        truncated = np.zeros(counts.size)
    truncated = np.clip(truncated, 0.0, 1.0)
    u = rng.random(total)
    cut = u >= 1.0 - truncated[steps]
    cdf = _cdf_rows(history, notes)
    if cdf is not None and history.histogram_bounds is not None:
        # u below 1 - truncated falls in the uncut part; the cut requests are the histogram's top.
        sizes = _draw_sizes(steps, u, cdf, history.histogram_bounds, upper)
    else:
        mean = _per_request(history.generation_tokens_rate, requests_known)
        if mean is None:
            raise TraceError(
                "neither the generation-length histogram nor the generated-tokens rate returned data: "
                "request sizes cannot be rebuilt (check spec.metrics.queries.generationTokensHistogram "
                "and generationTokensRate against this Prometheus)"
            )
        notes.append(
            "no generation-length histogram in this range: every request of a step wants that step's "
            "mean generated tokens (generated-tokens rate / request rate)"
        )
        sizes = np.clip(mean[steps], 1.0, upper)
    sizes[cut] = upper
    if np.any(cut):
        notes.append(
            f"{int(cut.sum())} request(s) were cut by the limit in force; taken to want {upper:g} tokens "
            "(the largest limit a policy may set)"
        )
    prompt = _per_request(history.prompt_tokens_rate, requests_known)
    if prompt is None:
        notes.append("no prompt-token figures: prompt sizes taken as 0")
        prompt = np.zeros(counts.size)
    notes.insert(0, f"demand rebuilt from Prometheus at {history.step:g}s steps from {history.start.isoformat()}")
    return Trace(arrival, prompt[steps], np.round(sizes), name, history.start, tuple(notes))
