"""Metrics history from Prometheus: range queries over long spans, in chunks, on one time grid.

Prometheus refuses a range query whose answer would hold more than 11,000 points per series,
so a long span is cut into chunks of at most that many steps and the answers are laid on one
grid (``start + k * step``).  A step Prometheus had nothing for stays NaN: the caller decides
what a gap means.  Errors become ``QueryFailed`` (the message names the server without any
credentials), never a client-library exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from modelbudget.adapters.metrics import PrometheusCredentials, QueryFailed, redact_url

# Prometheus' limit on the points of one series in a range query's answer (its API refuses more).
MAX_POINTS_PER_SERIES = 11_000

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Grid:
    """Evaluation times ``start, start + step, ..., end`` (seconds since the epoch, whole seconds)."""

    start: int
    end: int
    step: int

    def __post_init__(self) -> None:
        if self.step < 1 or self.end <= self.start:
            raise ValueError(f"a time grid needs start < end and a step of at least 1s (got {self})")

    @property
    def size(self) -> int:
        return (self.end - self.start) // self.step + 1

    def chunks(self, max_points: int = MAX_POINTS_PER_SERIES) -> list[tuple[int, int]]:
        """``(first, last)`` evaluation times of each query, at most ``max_points`` each, no overlap."""
        span = (max_points - 1) * self.step
        out = []
        first = self.start
        last_time = self.start + (self.size - 1) * self.step
        while first <= last_time:
            last = min(first + span, last_time)
            out.append((first, last))
            first = last + self.step
        return out


class RangeSource(Protocol):
    """One PromQL range query -> the raw ``data.result`` (a matrix); raises ``QueryFailed``."""

    def __call__(self, query: str, first: int, last: int, step: int) -> Any: ...


def _value(raw: Any) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return math.nan


def place(result: Any, grid: Grid, into: dict[Labels, npt.NDArray[np.float64]]) -> None:
    """Lay one answer's series on ``grid`` (by their labels); points off the grid are ignored."""
    if not isinstance(result, list):
        raise QueryFailed(f"expected a matrix, got {type(result).__name__}")
    for item in result:
        if not isinstance(item, Mapping) or not isinstance(item.get("values"), Sequence):
            raise QueryFailed(f"unexpected series in the answer: {str(item)[:120]}")
        labels = item.get("metric") or {}
        key: Labels = (
            frozenset((str(k), str(v)) for k, v in labels.items()) if isinstance(labels, Mapping) else frozenset()
        )
        series = into.setdefault(key, np.full(grid.size, np.nan))
        times, values = _points(item["values"])
        index = (times - grid.start) / grid.step
        whole = np.round(index)
        on_grid = np.isfinite(index) & (np.abs(index - whole) < 1e-6) & (whole >= 0) & (whole < grid.size)
        series[whole[on_grid].astype(np.int64)] = values[on_grid]


def _points(raw: Sequence[Any]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``[[time, "value"], ...]`` as two arrays; values that are not numbers become NaN."""
    bad = next((p for p in raw if not (isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2)), None)
    if bad is not None:
        raise QueryFailed(f"unexpected point in the answer: {str(bad)[:60]}")
    try:  # the usual answer, converted in one go
        return np.array([p[0] for p in raw], dtype=float), np.array([p[1] for p in raw], dtype=float)
    except (TypeError, ValueError):
        return np.array([_value(p[0]) for p in raw]), np.array([_value(p[1]) for p in raw])


def fetch(
    source: RangeSource, query: str, grid: Grid, progress: Callable[[int], None] | None = None
) -> dict[Labels, npt.NDArray[np.float64]]:
    """Every series ``query`` answers over ``grid``, chunk by chunk; ``progress(points)`` after each."""
    series: dict[Labels, npt.NDArray[np.float64]] = {}
    for first, last in grid.chunks():
        place(source(query, first, last, grid.step), grid, series)
        if progress is not None:
            progress((last - first) // grid.step + 1)
    return series


def single(series: Mapping[Labels, npt.NDArray[np.float64]], grid: Grid) -> npt.NDArray[np.float64] | None:
    """One series (an aggregated query's answer); ``None`` when Prometheus had nothing at all.

    Several series (a template without ``sum``) are summed where all are present.
    """
    if not series:
        return None
    return np.sum(np.stack(list(series.values())), axis=0) if len(series) > 1 else next(iter(series.values()))


class PrometheusHistory:
    """``RangeSource`` over the Prometheus HTTP API (prometheus-api-client).

    Unlike the reconcile loop (one short try, the next reconcile is the retry), a replay is a
    one-off command reading large answers: each query gets a long timeout and a few retries.
    """

    def __init__(
        self,
        url: str,
        credentials: PrometheusCredentials,
        *,
        insecure_skip_verify: bool = False,
        timeout: float = 60.0,
        retries: int = 2,
    ) -> None:
        session = requests.Session()
        session.verify = False if insecure_skip_verify else (credentials.ca_bundle_path or True)
        headers = {"Authorization": f"Bearer {credentials.bearer_token}"} if credentials.bearer_token else None
        self._where = redact_url(url)
        self._timeout = timeout
        self._client = PrometheusConnect(
            url=url.rstrip("/"),
            headers=headers,
            auth=credentials.basic_auth,
            session=session,
            retry=Retry(total=retries, backoff_factor=0.5, status_forcelist=(502, 503, 504)),
            timeout=timeout,
        )

    def __call__(self, query: str, first: int, last: int, step: int) -> Any:
        try:
            return self._client.custom_query_range(
                query, datetime.fromtimestamp(first, UTC), datetime.fromtimestamp(last, UTC), f"{step}s"
            )
        except PrometheusApiClientException as exc:
            raise QueryFailed(f"{self._where} answered {str(exc)[:300]}") from exc
        except requests.exceptions.InvalidJSONError as exc:
            raise QueryFailed(f"{self._where} sent a malformed answer: not JSON") from exc
        except requests.Timeout as exc:
            raise QueryFailed(f"{self._where}: no answer within {self._timeout:g}s") from exc
        except requests.RequestException as exc:
            raise QueryFailed(f"{self._where} unreachable: {type(exc).__name__}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise QueryFailed(f"{self._where} sent a malformed answer: {type(exc).__name__}") from exc
