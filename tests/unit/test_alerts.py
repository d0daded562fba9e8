"""The chart's alerts (templates/prometheusrule.yaml), tested with ``promtool test rules``.

The rule is rendered with helm when it is there (``--api-versions`` stands in for a cluster with
the prometheus-operator CRDs); without helm, from the template file with values.yaml's values
(the template keeps to ``.Values`` substitutions and one ``if``/``else`` so that this works).
Each alert fires on series shaped like the operator's and stays quiet when things are fine.
Needs promtool (Debian's prometheus package); skipped without it, except under CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_chart import CHART, NAMESPACE, RELEASE, _exported_metric_names, _helm_binary, run_helm

TEMPLATE = CHART / "templates" / "prometheusrule.yaml"
TROUBLESHOOTING = CHART.parents[1] / "docs" / "troubleshooting.md"
RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
ALERTS = {
    "ModelBudgetSpendNearCeiling",
    "ModelBudgetPacedBudgetRunningOut",
    "ModelBudgetMetricsUnavailable",
    "ModelBudgetTokenLimitNotEnforced",
    "ModelBudgetReconcileErrors",
    "ModelBudgetOperatorAbsent",
    "ModelBudgetPricesFromSpec",
}


# Metrics the alerts use that this branch's controller/telemetry.py may not export yet: the
# condition gauge and the period's spend and projection, exported by the operator as of the
# change that added them (labels: namespace, name, and type/status for the condition).
CONTRACT = {
    "modelbudget_condition",
    "modelbudget_period_to_date_dollars",
    "modelbudget_projected_period_end_dollars",
}


def _value(values: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        values = values[key]
    return values


def render_without_helm(values: dict[str, Any]) -> dict[str, Any]:
    """The template's ``spec`` with ``.Values`` substituted: its ``if``/``else``, values, raw strings."""
    text = TEMPLATE.read_text()
    text = text[text.index("spec:") :]
    text = re.sub(
        r"\{\{-? if (\.Values\.[\w.]+) \}\}(.*?)\{\{-? else \}\}(.*?)\{\{-? end \}\}",
        lambda m: m.group(2) if _value(values, m.group(1)[len(".Values.") :]) else m.group(3),
        text,
        flags=re.S,
    )
    text = re.sub(r"\{\{-? end \}\}\s*$", "", text)  # the template's outer if
    text = re.sub(r"\{\{`(.*?)`\}\}", lambda m: m.group(1), text)
    text = re.sub(r"\{\{ \.Values\.([\w.]+) \}\}", lambda m: str(_value(values, m.group(1))), text)
    assert "{{ ." not in text, "the fallback renderer met template syntax it does not know"
    return {"kind": "PrometheusRule", "spec": yaml.safe_load(text)["spec"]}


def rendered(*sets: str) -> list[dict[str, Any]]:
    """PrometheusRule documents of the chart with ``--set``s, on a cluster that has the API."""
    helm = _helm_binary()
    if helm is None:
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        for item in sets:
            path, _, raw = item.partition("=")
            *parents, leaf = path.split(".")
            _value(values, ".".join(parents))[leaf] = yaml.safe_load(raw)
        return [render_without_helm(values)] if values["alerts"]["enabled"] else []
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--api-versions", RULE_API]
    for item in sets:
        args += ["--set", item]
    out = run_helm(helm, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "PrometheusRule"]


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        reason = "promtool not found (Debian: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def rules_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in doc["spec"]["groups"] for r in g["rules"]}


def test_every_alert_has_a_runbook_section() -> None:
    (doc,) = rendered()
    rules = rules_of(doc)
    assert set(rules) >= ALERTS
    headings = set(re.findall(r"^### `?(\w+)`?$", TROUBLESHOOTING.read_text(), re.M))
    for name, rule in rules.items():
        url = rule["annotations"]["runbook_url"]
        assert url.endswith(f"troubleshooting.md#{name.lower()}"), url
        assert name in headings, f"docs/troubleshooting.md has no section for {name}"
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_alerts_use_only_exported_metrics() -> None:
    (doc,) = rendered()
    used = {m for r in rules_of(doc).values() for m in re.findall(r"\bmodelbudget_[a-z_]+", r["expr"])}
    exported = _exported_metric_names()
    assert used - exported <= CONTRACT, "the alerts use metrics the operator does not export"


def test_rule_only_where_the_api_exists_and_when_enabled() -> None:
    helm = _helm_binary()
    if helm is None:
        pytest.skip("needs helm: .Capabilities decides")
    out = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE)
    assert out.returncode == 0, out.stderr
    assert "kind: PrometheusRule" not in out.stdout  # no prometheus-operator CRDs: nothing to install
    assert rendered("alerts.enabled=false") == []
    (doc,) = rendered("alerts.labels.release=kube-prometheus-stack")
    assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("share", ["1.5", "0", "high"])
def test_schema_refuses_a_share_outside_0_1(share: str) -> None:
    helm = _helm_binary()
    if helm is None:
        pytest.skip("needs helm: the schema is checked by helm")
    args = ["template", RELEASE, str(CHART), "--api-versions", RULE_API, "--set", f"alerts.spendShareOfCeiling={share}"]
    assert run_helm(helm, *args).returncode != 0


# Series shaped like the operator's (controller/telemetry.py, plus the condition and period
# gauges), one ModelBudget per case, and what promtool must see at the evaluation times.
# A series that stops (`_`) stays visible for Prometheus' 5-minute lookback, then is absent.
CASES = """
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # hourly ceiling 96: "hot" spends 90 (94%), "calm" 40
      - series: 'modelbudget_ceiling_dollars{namespace="serving",name="hot",period="Hour"}'
        values: '96x30'
      - series: 'modelbudget_spend_dollars_per_hour{namespace="serving",name="hot"}'
        values: '90x30'
      - series: 'modelbudget_ceiling_dollars{namespace="serving",name="calm",period="Hour"}'
        values: '96x30'
      - series: 'modelbudget_spend_dollars_per_hour{namespace="serving",name="calm"}'
        values: '40x30'
      # daily ceiling 1000: "paced" has spent 950 and is projected at 1200; "daily" spends 90 of 96 $/h
      # (fine: a Day budget is judged by what the period spent, 300, and its projection, 800)
      - series: 'modelbudget_ceiling_dollars{namespace="serving",name="paced",period="Day"}'
        values: '1000x30'
      - series: 'modelbudget_period_to_date_dollars{namespace="serving",name="paced"}'
        values: '950x30'
      - series: 'modelbudget_projected_period_end_dollars{namespace="serving",name="paced"}'
        values: '1200x30'
      - series: 'modelbudget_ceiling_dollars{namespace="serving",name="daily",period="Day"}'
        values: '1000x30'
      - series: 'modelbudget_spend_dollars_per_hour{namespace="serving",name="daily"}'
        values: '90x30'
      - series: 'modelbudget_period_to_date_dollars{namespace="serving",name="daily"}'
        values: '300x30'
      - series: 'modelbudget_projected_period_end_dollars{namespace="serving",name="daily"}'
        values: '800x30'
      # metrics: "blind" lost them at minute 5, "seeing" never did
      - series: 'modelbudget_condition{namespace="serving",name="blind",type="MetricsAvailable",status="True"}'
        values: '1x4 0x25'
      - series: 'modelbudget_condition{namespace="serving",name="blind",type="MetricsAvailable",status="False"}'
        values: '0x4 1x25'
      - series: 'modelbudget_condition{namespace="serving",name="seeing",type="MetricsAvailable",status="True"}'
        values: '1x30'
      # token limit: "leaky" not enforced from the start, "tight" enforced, "nogate" unknown
      - series: 'modelbudget_condition{namespace="serving",name="leaky",type="TokenLimitEnforced",status="False"}'
        values: '1x30'
      - series: 'modelbudget_condition{namespace="serving",name="tight",type="TokenLimitEnforced",status="False"}'
        values: '0x30'
      - series: 'modelbudget_condition{namespace="serving",name="nogate",type="TokenLimitEnforced",status="Unknown"}'
        values: '1x30'
      # prices: "unpriced" bills at spec prices from minute 3, "priced" bills from OpenCost
      - series: 'modelbudget_condition{namespace="serving",name="unpriced",type="PricesObserved",status="False"}'
        values: '0x2 1x27'
      - series: 'modelbudget_condition{namespace="serving",name="priced",type="PricesObserved",status="False"}'
        values: '0x30'
      # reconcile errors: ActuationFailed every minute; one ReconcileFailed blip at minute 2
      - series: 'modelbudget_reconcile_errors_total{reason="ActuationFailed",pod="op-0"}'
        values: '0+1x30'
      - series: 'modelbudget_reconcile_errors_total{reason="ReconcileFailed",pod="op-0"}'
        values: '0 0 1x28'
      # the operator: leader until minute 10, then only a standby is left
      - series: 'modelbudget_leader{pod="op-0"}'
        values: '1x10 _x20'
      - series: 'modelbudget_leader{pod="op-1"}'
        values: '0x30'
    alert_rule_test:
      - eval_time: 4m
        alertname: ModelBudgetSpendNearCeiling
        exp_alerts: []
      - eval_time: 10m
        alertname: ModelBudgetSpendNearCeiling
        exp_alerts:
          - exp_labels: {severity: warning, namespace: serving, name: hot}
            exp_annotations:
              summary: ModelBudget serving/hot is at 93.75% of its ceiling
              description: &spend >-
                The spend rate (Hour ceiling) or the period's spend so far (Day/Month) has reached the share
                of the ceiling the alert is set at; the planner trims tokens and capacity from here on.
              runbook_url: RUNBOOK#modelbudgetspendnearceiling
          - exp_labels: {severity: warning, namespace: serving, name: paced}
            exp_annotations:
              summary: ModelBudget serving/paced is at 95% of its ceiling
              description: *spend
              runbook_url: RUNBOOK#modelbudgetspendnearceiling
      - eval_time: 14m
        alertname: ModelBudgetPacedBudgetRunningOut
        exp_alerts: []
      - eval_time: 20m
        alertname: ModelBudgetPacedBudgetRunningOut
        exp_alerts:
          - exp_labels: {severity: warning, namespace: serving, name: paced}
            exp_annotations:
              summary: >-
                ModelBudget serving/paced is on course to spend 1200.00 USD, over its ceiling, before the
                period ends
              description: >-
                At the current pace the Day/Month budget runs out before the period ends: the operator will
                have to cut capacity late in the period.
              runbook_url: RUNBOOK#modelbudgetpacedbudgetrunningout
      - eval_time: 6m
        alertname: ModelBudgetMetricsUnavailable
        exp_alerts: []
      - eval_time: 8m
        alertname: ModelBudgetMetricsUnavailable
        exp_alerts:
          - exp_labels: {severity: warning, namespace: serving, name: blind}
            exp_annotations:
              summary: ModelBudget serving/blind has had no usable metrics for longer than the fallback delay
              description: >-
                Nothing scales up while the demand metrics cannot be trusted, and the fallback (hold, or scale
                down) is in force. kubectl describe mb says why (MetricsAvailable).
              runbook_url: RUNBOOK#modelbudgetmetricsunavailable
      - eval_time: 9m
        alertname: ModelBudgetTokenLimitNotEnforced
        exp_alerts: []
      - eval_time: 11m
        alertname: ModelBudgetTokenLimitNotEnforced
        exp_alerts:
          - exp_labels: {severity: warning, namespace: serving, name: leaky}
            exp_annotations:
              summary: The token limit ModelBudget serving/leaky publishes is not the one the serving pods apply
              description: >-
                The fast knob does not work: requests may generate more tokens than the plan pays for, so the
                spend the plan promises may not hold.
              runbook_url: RUNBOOK#modelbudgettokenlimitnotenforced
      - eval_time: 16m
        alertname: ModelBudgetPricesFromSpec
        exp_alerts: []
      - eval_time: 19m
        alertname: ModelBudgetPricesFromSpec
        exp_alerts:
          - exp_labels: {severity: warning, namespace: serving, name: unpriced}
            exp_annotations:
              summary: >-
                ModelBudget serving/unpriced bills at its spec's prices: OpenCost's are missing or stale
              description: >-
                spend.source is OpenCost, but for 15 minutes or more the ledger has billed the spec's prices,
                which may not be what the nodes cost. kubectl describe mb says why (PricesObserved).
              runbook_url: RUNBOOK#modelbudgetpricesfromspec
      - eval_time: 10m
        alertname: ModelBudgetReconcileErrors
        exp_alerts: []
      - eval_time: 20m
        alertname: ModelBudgetReconcileErrors
        exp_alerts:
          - exp_labels: {severity: warning, reason: ActuationFailed}
            exp_annotations:
              summary: The modelbudget operator keeps failing reconciles (ActuationFailed)
              description: >-
                Reconciles have failed with reason ActuationFailed for 15 minutes or more; the affected
                ModelBudgets are not being planned.
              runbook_url: RUNBOOK#modelbudgetreconcileerrors
      - eval_time: 14m
        alertname: ModelBudgetOperatorAbsent
        exp_alerts: []
      - eval_time: 22m
        alertname: ModelBudgetOperatorAbsent
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: No modelbudget operator is running (or none is scraped)
              description: >-
                Nothing enforces any ModelBudget: the ceilings are not held, the token limits and sizes stay
                as they were last set.
              runbook_url: RUNBOOK#modelbudgetoperatorabsent
"""


def run_promtool(promtool: str, tmp: Path, doc: dict[str, Any], cases: str) -> subprocess.CompletedProcess[str]:
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    runbook = next(iter(rules_of(doc).values()))["annotations"]["runbook_url"].partition("#")[0]
    (tmp / "test.yaml").write_text(cases.replace("RUNBOOK", runbook))
    return subprocess.run([promtool, "test", "rules", "test.yaml"], cwd=tmp, capture_output=True, text=True)


def test_alerts_fire_when_they_should_and_only_then(promtool: str, tmp_path: Path) -> None:
    (doc,) = rendered()
    check = subprocess.run(
        [promtool, "check", "rules", "/dev/stdin"],
        input=yaml.safe_dump({"groups": doc["spec"]["groups"]}),
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    done = run_promtool(promtool, tmp_path, doc, CASES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_operator_absent_without_leader_election(promtool: str, tmp_path: Path) -> None:
    """A single operator without a Lease exports modelbudget_leader 0: present, not absent."""
    (doc,) = rendered("leaderElection.enabled=false")
    cases = """
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'modelbudget_leader{pod="op-0"}'
        values: '0x10 _x20'
    alert_rule_test:
      - eval_time: 10m
        alertname: ModelBudgetOperatorAbsent
        exp_alerts: []
      - eval_time: 22m
        alertname: ModelBudgetOperatorAbsent
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: No modelbudget operator is running (or none is scraped)
              description: >-
                Nothing enforces any ModelBudget: the ceilings are not held, the token limits and sizes stay
                as they were last set.
              runbook_url: RUNBOOK#modelbudgetoperatorabsent
"""
    done = run_promtool(promtool, tmp_path, doc, cases)
    assert done.returncode == 0, done.stdout + done.stderr


def test_share_of_ceiling_is_the_value_given() -> None:
    (doc,) = rendered("alerts.spendShareOfCeiling=0.75", "alerts.metricsUnavailableFor=5m")
    rules = rules_of(doc)
    assert rules["ModelBudgetSpendNearCeiling"]["expr"].count(">= 0.75") == 2
    assert rules["ModelBudgetMetricsUnavailable"]["for"] == "5m"
