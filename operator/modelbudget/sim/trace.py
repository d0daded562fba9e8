"""Request traces: reading them (CSV or JSONL, any column names) and reshaping demand in time.

A trace is three aligned arrays sorted by arrival: seconds since the first request, prompt
tokens and generated tokens.  ``wanted`` turns generated tokens into what a reasoning model
would want (``W = generated * factor``, DESIGN.md "The benchmark").  ``stretch`` and
``repeat_daily`` are the only ways demand is reshaped, and each one leaves a note for the
report, so a reader always knows which demand a figure came from.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

DAY_SECONDS = 86_400.0


def data_dir() -> Path:
    """Shared data: ``$MODELBUDGET_DATA_DIR``, else ``../shared/data`` next to the repository."""
    override = os.environ.get("MODELBUDGET_DATA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file and what to fix."""


@dataclass(frozen=True)
class Columns:
    time: str = "TIMESTAMP"
    prompt: str = "ContextTokens"
    generated: str = "GeneratedTokens"


@dataclass(frozen=True, eq=False)
class Trace:
    arrival: npt.NDArray[np.float64]  # seconds since the first request, sorted
    prompt: npt.NDArray[np.float64]
    generated: npt.NDArray[np.float64]
    name: str
    start: datetime | None = None  # wall-clock time of the first request, when the trace says
    notes: tuple[str, ...] = field(default=())  # what was done to the demand, for the report

    def __len__(self) -> int:
        return int(self.arrival.size)

    @property
    def span(self) -> float:
        return float(self.arrival[-1]) if len(self) else 0.0

    def wanted(self, reasoning_factor: float) -> npt.NDArray[np.float64]:
        """Tokens each request would generate unconstrained: at least one."""
        return np.maximum(np.round(self.generated * reasoning_factor), 1.0)

    def window(self, start: float, end: float) -> Trace:
        """The requests arriving in ``[start, end)``, times unchanged."""
        lo, hi = np.searchsorted(self.arrival, [start, end], side="left")
        return Trace(self.arrival[lo:hi], self.prompt[lo:hi], self.generated[lo:hi], self.name, self.start, self.notes)


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value.strip()).timestamp()


def _rows(path: Path) -> Iterable[Mapping[str, object]]:
    if path.suffix in {".jsonl", ".ndjson"}:
        with path.open() as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise TraceError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        return
    with path.open(newline="") as fh:
        yield from csv.DictReader(fh)


def read_trace(path: str | Path, columns: Columns = Columns()) -> Trace:
    """Read a CSV (header row) or JSONL trace; timestamps as ISO date-times or seconds."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace {path} does not exist (pass --trace, or set the data directory)")
    times, prompts, generated = [], [], []
    wanted = (columns.time, columns.prompt, columns.generated)
    for number, row in enumerate(_rows(path), start=2):
        missing = [c for c in wanted if c not in row]
        if missing:
            raise TraceError(
                f"{path} has no column(s) {', '.join(missing)} (has: {', '.join(map(str, row))}); "
                "name them with --time-column/--prompt-column/--generated-column"
            )
        try:
            times.append(_seconds(str(row[columns.time])))
            prompts.append(float(str(row[columns.prompt])))
            generated.append(float(str(row[columns.generated])))
        except ValueError as exc:
            raise TraceError(f"{path}: row {number}: {exc}") from exc
    if not times:
        raise TraceError(f"trace {path} has no requests")
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    t = t[order]
    gen = np.asarray(generated)[order]
    if not np.all(np.isfinite(gen)) or np.any(gen < 0):
        raise TraceError(f"trace {path}: generated tokens must be finite and non-negative")
    first = datetime.fromtimestamp(float(t[0])) if t[0] > DAY_SECONDS * 365 else None
    return Trace(t - t[0], np.asarray(prompts)[order], gen, path.stem, first)


def stretch(trace: Trace, factor: float) -> Trace:
    """Slow demand down (``factor > 1``) or speed it up: arrival times scaled, sizes kept."""
    if factor <= 0 or not math.isfinite(factor):
        raise TraceError(f"stretch factor must be positive, got {factor}")
    if factor == 1:
        return trace
    note = f"arrival times multiplied by {factor:g} (rate / {factor:g})"
    return Trace(trace.arrival * factor, trace.prompt, trace.generated, trace.name, trace.start, (*trace.notes, note))


def diurnal_envelope(seconds_of_day: npt.NDArray[np.float64], trough: float) -> npt.NDArray[np.float64]:
    """Relative demand over a UTC day: 1 at 14:00, ``trough`` at 02:00, a cosine in between."""
    phase = 2 * np.pi * (seconds_of_day / DAY_SECONDS - 14 / 24)
    return trough + (1 - trough) * (1 + np.cos(phase)) / 2


def repeat_daily(trace: Trace, hours: float, trough: float, seed: int, start_of_day: float = 0.0) -> Trace:
    """Tile the trace to ``hours`` and thin it under the diurnal envelope.

    Each copy keeps the trace's own burstiness; a request at time ``t`` is kept with probability
    ``envelope(t)`` (seeded), so the busiest hour keeps the trace as recorded and the quietest
    keeps ``trough`` of it.  ``start_of_day`` is where time 0 falls in the UTC day.
    """
    if not 0 < trough <= 1:
        raise TraceError(f"envelope trough must be in (0, 1], got {trough}")
    period = trace.span + trace.span / max(len(trace) - 1, 1)  # one mean gap between copies
    copies = max(1, math.ceil(hours * 3600 / period))
    offsets = np.repeat(np.arange(copies) * period, len(trace))
    arrival = np.tile(trace.arrival, copies) + offsets
    keep = arrival < hours * 3600
    rng = np.random.default_rng(seed)
    envelope = diurnal_envelope((arrival + start_of_day) % DAY_SECONDS, trough)
    keep &= rng.random(arrival.size) < envelope
    note = (
        f"repeated {copies}x to {hours:g} h, thinned under a diurnal envelope "
        f"(peak 14:00 UTC = trace as recorded, trough 02:00 = {trough:g}x; seed {seed})"
    )
    return Trace(
        arrival[keep],
        np.tile(trace.prompt, copies)[keep],
        np.tile(trace.generated, copies)[keep],
        trace.name,
        trace.start,
        (*trace.notes, note),
    )


def synthetic(
    rate: float, seconds: float, wanted: float | npt.NDArray[np.float64], seed: int | None = None, prompt: float = 100.0
) -> Trace:
    """A trace at a constant rate: evenly spaced (``seed=None``) or Poisson; for tests and benches.

    ``wanted`` is one size for all or an array to draw from uniformly.
    """
    arrival: npt.NDArray[np.float64]
    if seed is None:
        count = int(rate * seconds)
        arrival = (np.arange(count, dtype=np.float64) + 0.5) / rate
        sizes = np.resize(np.asarray(wanted, dtype=float), count)  # cycles through the given sizes
    else:
        rng = np.random.default_rng(seed)
        count = int(rng.poisson(rate * seconds))
        arrival = np.sort(rng.uniform(0, seconds, count))
        pool = np.atleast_1d(np.asarray(wanted, dtype=float))
        sizes = pool[rng.integers(pool.size, size=count)]
    return Trace(arrival, np.full(count, prompt), sizes, f"synthetic-{rate:g}rps")
