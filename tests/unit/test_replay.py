"""``modelbudget replay`` without Prometheus: chunked range queries, rebuilding demand, CLI input.

The end-to-end behaviour on a real Prometheus (fidelity to ``simulate``, gaps, counter resets,
missing histograms) is in tests/e2e/test_replay.py.
"""

from __future__ import annotations

import argparse
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelbudget.adapters.history import MAX_POINTS_PER_SERIES, Grid, fetch, single
from modelbudget.adapters.metrics import QueryFailed
from modelbudget.cli import CliError, main
from modelbudget.cli.replay import credentials_from, grid_from, parse_duration
from modelbudget.sim.history import History, extent, fill_gaps, missing_runs, rebuild
from modelbudget.sim.metrics import p95
from modelbudget.sim.trace import TraceError

REPO = Path(__file__).resolve().parents[2]
START = datetime(2023, 11, 16, tzinfo=UTC)


class RecordingSource:
    """A RangeSource answering ``value = time`` for one series, recording each query's span."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, query: str, first: int, last: int, step: int) -> Any:
        self.calls.append((first, last, step))
        return [{"metric": {"le": "+Inf"}, "values": [[t, str(t)] for t in range(first, last + 1, step)]}]


def test_a_week_at_15s_is_fetched_in_chunks_under_the_point_limit() -> None:
    start = int(START.timestamp())
    grid = Grid(start, start + 7 * 86_400, 15)
    source = RecordingSource()
    seen: list[int] = []
    values = single(fetch(source, "q", grid, seen.append), grid)
    assert values is not None
    assert len(source.calls) == math.ceil(grid.size / MAX_POINTS_PER_SERIES) == 4
    for first, last, step in source.calls:
        assert (last - first) // step + 1 <= MAX_POINTS_PER_SERIES
    # contiguous, no overlap, the whole grid, each point where it belongs
    assert [c[0] for c in source.calls[1:]] == [c[1] + 15 for c in source.calls[:-1]]
    assert sum(seen) == grid.size
    assert np.array_equal(values, start + 15 * np.arange(grid.size))


def test_points_off_the_grid_and_nan_stay_missing() -> None:
    grid = Grid(0, 60, 15)

    def source(query: str, first: int, last: int, step: int) -> Any:
        return [{"metric": {}, "values": [[0, "1"], [7, "5"], [15, "NaN"], [30, "3"], [9999, "4"]]}]

    values = single(fetch(source, "q", grid), grid)
    assert values is not None
    assert values[0] == 1 and values[2] == 3
    assert np.isnan(values[[1, 3, 4]]).all()


def test_a_malformed_answer_is_a_query_failure() -> None:
    grid = Grid(0, 60, 15)
    with pytest.raises(QueryFailed):
        fetch(lambda *_: {"not": "a matrix"}, "q", grid)


def history(steps: int = 41, rate: float = 2.0, **kw: Any) -> History:
    return History(start=START, step=15.0, request_rate=np.full(steps, rate), window=15.0, **kw)


def test_rebuilt_demand_has_the_rate_and_the_histogram_sizes() -> None:
    steps = 41
    bounds = np.array([10.0, 50.0, 100.0, 1000.0])
    # every request generated between 50 and 100 tokens; a quarter of them cut by the limit
    buckets = np.tile([0.0, 0.0, 2.0, 2.0, 2.0], (steps, 1))
    trace = rebuild(history(histogram_bounds=bounds, histogram=buckets, truncated_rate=np.full(steps, 0.5)), upper=4096)
    assert len(trace) == 2 * 15 * (steps - 1)  # 2 req/s over 10 minutes
    assert trace.arrival.min() >= 0 and trace.arrival.max() <= 600
    cut = trace.generated == 4096
    assert abs(cut.mean() - 0.25) < 0.05
    assert ((trace.generated[~cut] >= 50) & (trace.generated[~cut] <= 100)).all()
    assert any("cut by the limit" in note for note in trace.notes)


def test_queue_growth_counts_as_arrivals() -> None:
    """Requests that arrived but have not finished are in the server: they arrived all the same."""
    waiting = np.linspace(0, 300, 41)  # the queue grows by 300 over the range
    trace = rebuild(history(requests_waiting=waiting, generation_tokens_rate=np.full(41, 200.0)), upper=4096)
    assert len(trace) == 2 * 15 * 40 + 300


def test_without_histogram_sizes_are_the_mean_and_it_is_said() -> None:
    trace = rebuild(history(generation_tokens_rate=np.full(41, 2.0 * 300)), upper=4096)
    assert np.all(trace.generated == 300)
    assert any("no generation-length histogram" in note for note in trace.notes)


def test_without_any_size_figure_it_refuses() -> None:
    with pytest.raises(TraceError, match="request sizes cannot be rebuilt"):
        rebuild(history(), upper=4096)


def test_without_any_rate_it_refuses() -> None:
    with pytest.raises(TraceError, match="returned nothing"):
        rebuild(history(rate=math.nan), upper=4096)


def test_gaps_are_interpolated_and_reported() -> None:
    rate = np.full(41, 2.0)
    rate[10:20] = np.nan
    assert missing_runs(rate) == [(10, 20)]
    assert np.allclose(fill_gaps(rate), 2.0)
    trace = rebuild(
        History(START, 15.0, rate, 15.0, generation_tokens_rate=np.full(41, 200.0)),
        upper=4096,
    )
    assert len(trace) == 2 * 15 * 40
    assert any("1 gap(s), 2.5 min" in note for note in trace.notes)


@pytest.mark.parametrize(("text", "seconds"), [("90m", 5400), ("36h", 129_600), ("7d", 604_800), ("2w", 1_209_600)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def _args(**kw: Any) -> argparse.Namespace:
    base = {"resolution": "15s", "since": None, "start": None, "end": None}
    return argparse.Namespace(**(base | kw))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "which range"),
        ({"since": "1d", "start": "2023-11-16T00:00:00"}, "not both"),
        ({"since": "a week"}, "not a duration"),
        ({"start": "yesterday", "end": "2023-11-16T00:00:00"}, "not an ISO 8601 time"),
        ({"since": "10s"}, "shorter than two steps"),
        ({"since": "1d", "resolution": "0.5s"}, "whole seconds"),
    ],
)
def test_bad_ranges_are_clear_errors(kw: dict[str, str], message: str) -> None:
    with pytest.raises(CliError, match=message):
        grid_from(_args(**kw), START)


def test_since_ends_now_on_whole_steps() -> None:
    grid = grid_from(_args(since="1h"), datetime(2023, 11, 16, 12, 0, 7, tzinfo=UTC))
    assert grid.step == 15 and grid.start % 15 == 0 and grid.end % 15 == 0
    assert grid.end - grid.start == 3600 + 15


def test_credentials_come_from_files(tmp_path: Path) -> None:
    token, password = tmp_path / "token", tmp_path / "password"
    token.write_text("s3cret\n")
    password.write_text("hunter2\n")
    none = {"bearer_token_file": None, "basic_auth_user": None, "basic_auth_password_file": None, "ca_file": None}
    creds = credentials_from(argparse.Namespace(**(none | {"bearer_token_file": str(token)})))
    assert creds.bearer_token == "s3cret"
    assert "s3cret" not in repr(creds)
    basic = none | {"basic_auth_user": "me", "basic_auth_password_file": str(password)}
    assert credentials_from(argparse.Namespace(**basic)).basic_auth == ("me", "hunter2")
    with pytest.raises(CliError, match="go together"):
        credentials_from(argparse.Namespace(**(none | {"basic_auth_user": "me"})))
    with pytest.raises(CliError, match="cannot read"):
        credentials_from(argparse.Namespace(**(none | {"bearer_token_file": str(tmp_path / "missing")})))


def test_unreachable_prometheus_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(
        [
            "replay",
            "-f",
            str(REPO / "examples" / "single-pool-hourly.yaml"),
            "--prometheus",
            f"http://user:pw@127.0.0.1:{port}",
            "--since",
            "1h",
            "--query-timeout",
            "2",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "request rate" in err and f"127.0.0.1:{port} unreachable" in err
    assert "pw" not in err


def test_history_cut_to_where_it_has_data() -> None:
    rate = np.full(41, np.nan)
    rate[10:31] = 2.0
    full = History(START, 15.0, rate, 15.0, requests_waiting=np.arange(41.0))
    assert extent(rate) == (10, 30)
    cut = full.between(9, 31)
    assert cut.start == datetime(2023, 11, 16, 0, 2, 15, tzinfo=UTC)
    assert cut.request_rate.size == 22 and np.isnan(cut.request_rate[0])
    assert cut.requests_waiting is not None and cut.requests_waiting[0] == 9
    assert extent(np.full(3, np.nan)) is None


@pytest.mark.parametrize("size", [1, 2, 3, 20, 1001])
def test_scrape_p95_is_numpys(size: int) -> None:
    """The simulator's fast p95 (a week's replay scrapes 40,000 times) equals np.quantile's."""
    values = np.random.default_rng(size).exponential(10.0, size)
    assert p95(values) == pytest.approx(float(np.quantile(values, 0.95)), rel=1e-12)
