"""Reconciles are spread evenly over the interval, and ModelBudgets and pools over shards, the
same way in every process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from modelbudget.cli import main
from modelbudget.controller.spread import Shard, phase, shard_of, stable_fraction


def test_phases_spread_a_thousand_modelbudgets_evenly_over_the_interval() -> None:
    phases = [phase("team", f"llm-{i:04d}", 15.0) for i in range(1000)]
    assert all(0 <= p < 15.0 for p in phases)
    per_second = [sum(1 for p in phases if s <= p < s + 1) for s in range(15)]
    # 1000 / 15 ≈ 67 a second; a uniform hash stays well within ±40% of that at this size.
    assert min(per_second) > 40 and max(per_second) < 94, per_second


def test_a_fraction_is_stable_and_depends_on_the_salt() -> None:
    assert stable_fraction("ns/a", "phase") == stable_fraction("ns/a", "phase")
    assert stable_fraction("ns/a", "phase") != stable_fraction("ns/a", "shard")
    assert phase("ns", "a", 15.0) == stable_fraction("ns/a", "phase") * 15.0


def test_every_modelbudget_and_pool_has_exactly_one_shard() -> None:
    shards = [Shard(i, 3) for i in range(3)]
    for i in range(300):
        assert sum(s.owns_model_budget("team", f"llm-{i}") for s in shards) == 1
        assert sum(s.owns_pool(f"pool-{i}") for s in shards) == 1
    # One shard (the default) owns everything, under the Lease name it always had.
    assert Shard().owns_model_budget("any", "thing") and Shard().owns_pool("any")
    assert Shard().lease_name("modelbudget-operator") == "modelbudget-operator"
    assert Shard(2, 3).lease_name("modelbudget-operator") == "modelbudget-operator-shard-2"


def test_shards_split_a_thousand_modelbudgets_evenly() -> None:
    counts = [0, 0, 0]
    for i in range(3000):
        counts[shard_of(f"team-{i % 7}/llm-{i:04d}", 3)] += 1
    assert min(counts) > 900 and max(counts) < 1100, counts


def test_the_shard_of_a_name_is_the_same_in_another_process() -> None:
    """Python's own hash() differs per process; a shard must not (a restart would move work)."""
    code = "from modelbudget.controller.spread import shard_of; print([shard_of(f'ns/m{i}', 5) for i in range(50)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str([shard_of(f"ns/m{i}", 5) for i in range(50)])


@pytest.mark.parametrize(("index", "count"), [(3, 3), (-1, 2), (0, 0)])
def test_a_shard_outside_its_count_is_refused(index: int, count: int) -> None:
    with pytest.raises(ValueError, match="needs 0 <= shard < shards"):
        Shard(index, count)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shards", "2", "--shard", "2"], "0 <= --shard < --shards"),
        (["--shards", "2", "--shard", "1", "--no-leader-election"], "needs leader election"),
    ],
)
def test_run_refuses_a_shard_it_cannot_be(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *flags]) != 0
    assert message in capsys.readouterr().err
