"""``modelbudget replay`` against a real Prometheus holding a backfilled hour of an Azure trace.

No cluster: the test loads the synthetic server's metrics for the trace into TSDB blocks with
promtool (``modelbudget.testbed.backfill``) and starts its own Prometheus on a free loopback
port.  The same hour is backfilled several times under different namespaces, each shaped the way
a real Prometheus' data can be: plain, with a scrape gap, with a counter reset (the server
restarted), without the generation-length histogram, without any size figures.  Skipped when
there is no prometheus/promtool binary, except under CI (env ``CI``), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelbudget.cli import main
from modelbudget.sim.trace import data_dir, read_trace
from modelbudget.testbed.backfill import Shape, backfill, create_blocks, serve_history

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "single-pool-hourly.yaml"
TRACE = data_dir() / "traces" / "azure_llm_2023_conv.csv"
FACTOR = 20.0  # W = generated x 20, as bench/simulate.py and the README use
HOUR = ["--start", "2023-11-16T00:00:00+00:00", "--end", "2023-11-16T01:00:00+00:00"]
SHAPES = {
    "plain": Shape(),
    "gap": Shape(gaps=((1200.0, 1500.0),)),  # Prometheus down for 5 minutes
    "reset": Shape(restarts=(1800.0,)),  # the server restarted half-way: every counter back to 0
    "nohist": Shape(without=frozenset({"vllm:request_generation_tokens"})),
    "nosizes": Shape(without=frozenset({"vllm:request_generation_tokens", "vllm:generation_tokens"})),
}


def _binaries() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        reason = "prometheus/promtool not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return prometheus, promtool


def manifest_for(tmp: Path, namespace: str) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["metrics"]["selector"] = f'namespace="{namespace}",model_name="chat-8b"'
    path = tmp / f"{namespace}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A Prometheus holding the hour once per shape (namespace = shape name); yields (URL, dir)."""
    prometheus, promtool = _binaries()
    tmp = tmp_path_factory.mktemp("history")
    trace = read_trace(TRACE)
    from modelbudget.cli.common import load_manifest

    for name, shape in SHAPES.items():
        openmetrics = tmp / f"{name}.om"
        backfill(load_manifest(str(manifest_for(tmp, name))), trace, openmetrics, reasoning_factor=FACTOR, shape=shape)
        create_blocks(openmetrics, tmp / "tsdb", promtool)
    with serve_history(tmp / "tsdb", prometheus=prometheus) as url:
        yield url, tmp


def results(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    return {r["policy"]: r for r in doc["runs"][0]["results"]} | {"_doc": doc}


def replay(url: str, tmp: Path, namespace: str, *extra: str) -> dict[str, Any]:
    out = tmp / f"replay-{namespace}"
    code = main(
        ["replay", "-f", str(manifest_for(tmp, namespace)), "--prometheus", url, *HOUR, "--out", str(out), *extra]
    )
    assert code == 0
    (path,) = out.glob("*.json")
    return results(path)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("simulate")
    trace = ["--trace", str(TRACE), "--reasoning-factor", str(FACTOR), "--skip-factor-one"]
    code = main(["simulate", "-f", str(EXAMPLE), *trace, "--out", str(out)])
    assert code == 0
    (path,) = out.glob("*.json")
    return results(path)


@pytest.fixture(scope="module")
def plain(history: tuple[str, Path]) -> dict[str, Any]:
    return replay(*history, "plain")


def within(a: float, b: float, share: float) -> bool:
    return abs(a - b) <= share * abs(b)


# The fixed-limit policies do not replay within 5%, and cannot from these metrics: at the top
# limit (16,384) they serve only the shortest answers within the SLO (static: 770 of 19,366
# requests, total score 452), so their score is the share of answers under ~800 tokens. vLLM's
# generation-length histogram has 1-2-5 buckets (500, 1000, 2000, ...), and any reading inside a
# bucket guesses that share: linear (what replay does) gives 6.1% under 800 where the trace has
# 4.5%; log-linear 6.6%, monotone-cubic 5.6%. Measured: static total score 673.8 replayed vs 452.0
# simulated; hpa dollars 36.1 vs 40.2 (its scaling follows the same overloaded queue). The planner
# and the oracles, which set limits the SLO can meet, replay within 5%. Kept visible as strict
# expected failures.
DIVERGES = pytest.mark.xfail(strict=True, reason="fixed-limit scores live inside one histogram bucket")


@pytest.mark.parametrize(
    "policy", ["planner", "oracle", pytest.param("static", marks=DIVERGES), pytest.param("hpa", marks=DIVERGES)]
)
def test_replay_of_a_backfilled_hour_reproduces_simulate(
    plain: dict[str, Any], simulated: dict[str, Any], policy: str
) -> None:
    """The done-when: within 5% on dollars and on total score, policy by policy."""
    got, want = plain[policy], simulated[policy]
    assert within(got["dollars"], want["dollars"], 0.05), (got["dollars"], want["dollars"])
    assert within(got["total_score"], want["total_score"], 0.05), (got["total_score"], want["total_score"])
    assert within(got["requests"], want["requests"], 0.01)


def test_replay_reports_what_actually_ran(plain: dict[str, Any]) -> None:
    actual = plain["_doc"]["actual"]
    # The backfilled fleet: 4 pods on one 8-GPU node at $3/GPU-hour, for the hour.
    assert actual["replicasMax"] == 4
    assert actual["nodesMax"] == 1
    assert within(actual["dollars"], 24.0, 0.01)
    assert "kube_deployment_status_replicas" in actual["sources"]["replicas"]


def test_gap_is_filled_and_said(history: tuple[str, Path], plain: dict[str, Any]) -> None:
    got = replay(*history, "gap")
    notes = " ".join(got["_doc"]["notes"])
    assert "request rate: 1 gap(s)" in notes
    assert got["_doc"]["range"]["gapSteps"] >= 20  # 5 minutes of 15 s steps without a rate
    # A quiet 5 minutes in a busy hour, interpolated: demand and the plan barely move.
    assert within(got["planner"]["requests"], plain["planner"]["requests"], 0.03)
    assert within(got["planner"]["dollars"], plain["planner"]["dollars"], 0.05)


def test_counter_reset_changes_nothing(history: tuple[str, Path], plain: dict[str, Any]) -> None:
    got = replay(*history, "reset")
    assert within(got["planner"]["requests"], plain["planner"]["requests"], 0.01)
    assert within(got["planner"]["dollars"], plain["planner"]["dollars"], 0.02)
    assert within(got["planner"]["total_score"], plain["planner"]["total_score"], 0.02)


def test_missing_histogram_falls_back_to_mean_sizes(history: tuple[str, Path], plain: dict[str, Any]) -> None:
    got = replay(*history, "nohist")
    notes = " ".join(got["_doc"]["notes"])
    assert "no generation-length histogram in this range" in notes
    assert within(got["planner"]["requests"], plain["planner"]["requests"], 0.01)
    # Every request of a step at the step's mean: the same tokens, a different spread of them.
    assert within(got["planner"]["dollars"], plain["planner"]["dollars"], 0.25)


def test_no_size_figures_at_all_is_a_clear_error(history: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    url, tmp = history
    manifest = str(manifest_for(tmp, "nosizes"))
    code = main(["replay", "-f", manifest, "--prometheus", url, *HOUR, "--out", str(tmp / "nosizes-out")])
    assert code == 2
    assert "request sizes cannot be rebuilt" in capsys.readouterr().err


def test_selector_matching_nothing_is_a_clear_error(
    history: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, tmp = history
    code = main(["replay", "-f", str(manifest_for(tmp, "elsewhere")), "--prometheus", url, *HOUR])
    assert code == 2
    assert "request-rate query returned no series" in capsys.readouterr().err


def test_range_wider_than_the_history_replays_only_the_history(
    history: tuple[str, Path], plain: dict[str, Any]
) -> None:
    """--since 7d on a Prometheus with a day of data: the missing days are no data, not demand."""
    url, tmp = history
    wide = ["--start", "2023-11-15T22:00:00+00:00", "--end", "2023-11-16T03:00:00+00:00"]
    out = tmp / "replay-wide"
    assert main(["replay", "-f", str(manifest_for(tmp, "plain")), "--prometheus", url, *wide, "--out", str(out)]) == 0
    (path,) = out.glob("*.json")
    got = results(path)
    assert any("the replay covers that" in note for note in got["_doc"]["notes"])
    assert got["_doc"]["range"]["start"] == "2023-11-16T00:00:00+00:00"
    assert within(got["planner"]["requests"], plain["planner"]["requests"], 0.01)
    assert within(got["planner"]["dollars"], plain["planner"]["dollars"], 0.05)
