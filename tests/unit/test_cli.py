"""The CLI: crd regeneration, fit, plan -- including the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelbudget.api.crd import CRD_FILE
from modelbudget.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_crd_regenerates_byte_identically(tmp_path):
    assert main(["crd", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / CRD_FILE).read_bytes() == (ROOT / "crds" / CRD_FILE).read_bytes()
    assert main(["crd", "--out-dir", str(ROOT / "crds"), "--check"]) == 0


def test_crd_check_fails_when_stale(tmp_path, capsys):
    (tmp_path / CRD_FILE).write_text("stale")
    assert main(["crd", "--out-dir", str(tmp_path), "--check"]) == 2
    assert "out of date" in capsys.readouterr().err


def test_fit_prints_curve_and_snippet(tmp_path, capsys):
    csv = tmp_path / "s.csv"
    csv.write_text("tokens,performance\n128,0.49\n512,0.60\n2048,0.71\n8192,0.82\n")
    assert main(["fit", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "R^2" in out and "slope: 0.079" in out and "minTokens: 128" in out


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("tokens,performance\n1,0.1\n2,0.2\n", "at least 3 samples"),
        ("tok,perf\n1,0.1\n", "no column(s)"),
        ("tokens,performance\n1,abc\n", "not a number"),
    ],
)
def test_fit_errors(tmp_path, capsys, content, error):
    csv = tmp_path / "s.csv"
    csv.write_text(content)
    assert main(["fit", str(csv)]) == 2
    assert error in capsys.readouterr().err


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_plan_on_examples(example, capsys):
    assert (
        main(
            [
                "plan",
                "-f",
                str(example),
                "--demand-rps",
                "10",
                "--observed",
                "meanWantedTokens=2000",
                "--at",
                "2026-11-23T12:00:00Z",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "token limit" in out and "replicas" in out


def test_plan_json(capsys):
    assert (
        main(
            [
                "plan",
                "-f",
                str(ROOT / "examples/single-pool-hourly.yaml"),
                "--demand-rps",
                "200",
                "--output",
                "json",
                "--at",
                "2026-11-23T12:00:00Z",
                "--observed",
                "replicas=32",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["expectedSpendPerHour"] <= plan["allowedSpendPerHour"] == 96
    # What holds the limit: the budget or the pools, or the replicas that latency needs beyond them.
    assert {r["reason"] for r in plan["reasons"]} & {"BudgetLimited", "MaxReplicas", "MaxNodes", "LatencyBound"}
    assert "nextState" not in plan


def test_plan_shows_the_forecast_and_sizes_for_its_peak(capsys):
    # Twenty minutes at 2 req/s with a burst to 12 every five minutes: the median peak within the
    # next three minutes is a burst, so replicas are sized for it now.  (Under continuous batching
    # the latency SLO holds the limit low enough that a burst to 6 fits the one paid node; 12 does not.)
    history = ",".join("12" if i % 10 == 5 else "2" for i in range(40))
    args = ["plan", "-f", str(ROOT / "examples/local-demo.yaml"), "--demand-rps", "2", "--output", "json"]
    assert main([*args, "--at", "2026-11-23T12:00:00Z", "--demand-history", history]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["forecast"]["model"] == "holt+growth-quantile"
    assert plan["forecast"]["upperRequestsPerSecond"] == pytest.approx(12.0)
    assert "ForecastScaleUp" in {r["reason"] for r in plan["reasons"]}
    assert main([*args, "--at", "2026-11-23T12:00:00Z"]) == 0
    without = json.loads(capsys.readouterr().out)
    assert without["forecast"] is None
    assert plan["replicas"] > without["replicas"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--observed", "bogus=1"], "expected KEY=VALUE"),
        (["--observed", "nodes.nope=1"], "no node pool named nope"),
        (["--at", "yesterday"], "not an ISO 8601 time"),
        (["--demand-history", "1,two,3"], "expected comma-separated requests/s"),
        (["--demand-history", "1,-2,3"], "expected non-negative requests/s"),
    ],
)
def test_plan_errors(capsys, args, error):
    assert main(["plan", "-f", str(ROOT / "examples/local-demo.yaml"), "--demand-rps", "1", *args]) == 2
    assert error in capsys.readouterr().err


def test_plan_rejects_invalid_manifest(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "examples/local-demo.yaml").read_text().replace("min: 1\n", "min: 50\n", 1)
    bad.write_text(text)
    assert main(["plan", "-f", str(bad), "--demand-rps", "1"]) == 2
    assert "replicas.min must not exceed replicas.max" in capsys.readouterr().err


def test_plan_on_a_shared_pool_needs_the_gpu_pool_beside_the_model_budget(tmp_path, capsys):
    docs = (ROOT / "examples/shared-pool.yaml").read_text().split("\n---\n")
    alone = tmp_path / "alone.yaml"
    alone.write_text(docs[1])  # the first ModelBudget, without its GpuPool
    assert main(["plan", "-f", str(alone), "--demand-rps", "1"]) == 2
    assert "no GpuPool shared-l4 in the file" in capsys.readouterr().err


def test_plan_on_a_shared_pool_prices_it_from_the_gpu_pool(capsys):
    args = ["plan", "-f", str(ROOT / "examples/shared-pool.yaml"), "--demand-rps", "10", "--output", "json"]
    assert main([*args, "--at", "2026-11-23T12:00:00Z"]) == 0
    plan = json.loads(capsys.readouterr().out)
    [pool] = plan["pools"]
    assert pool["pool"] == "shared-l4" and pool["replicas"] > 0
    assert pool["spendPerHour"] == pytest.approx(pool["replicas"] * 0.85)  # 1 GPU per replica at the pool's price
