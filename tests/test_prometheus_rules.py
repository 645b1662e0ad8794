"""The Prometheus rules in deploy/prometheus: valid, unit-tested by promtool, each alert documented."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploytools import REPO, require_tool

RULES = REPO / "deploy" / "prometheus"
RULE_FILES = [RULES / "recording-rules.yml", RULES / "alert-rules.yml"]
UNIT_TESTS = sorted((RULES / "tests").glob("*.test.yml"))
OPERATIONS = REPO / "docs" / "operations.md"


def _promtool() -> str:
    return require_tool("promtool", "checks and unit-tests the rules (Debian package `prometheus`)")


def _rules(kind: str) -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if kind in rule]


def test_rule_files_pass_promtool_check():
    done = subprocess.run([_promtool(), "check", "rules", *map(str, RULE_FILES)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass():
    assert UNIT_TESTS, f"no *.test.yml under {RULES / 'tests'}"
    done = subprocess.run([_promtool(), "test", "rules", *map(str, UNIT_TESTS)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_unit_tests_catch_a_changed_threshold(tmp_path):
    """The unit tests bite: the error-ratio alert at 20% instead of 5% must fail them."""
    copy = tmp_path / "prometheus"
    shutil.copytree(RULES, copy)
    alerts = copy / "alert-rules.yml"
    text = alerts.read_text()
    assert "ratio_rate5m > 0.05" in text
    alerts.write_text(text.replace("ratio_rate5m > 0.05", "ratio_rate5m > 0.2"))
    done = subprocess.run([_promtool(), "test", "rules", str(copy / "tests" / "alert-rules.test.yml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "CharrnnHighErrorRatio" in done.stdout + done.stderr


def _unit_cases() -> list[dict]:
    return [case for path in UNIT_TESTS for case in yaml.safe_load(path.read_text())["tests"]]


@pytest.mark.parametrize("alert", [r["alert"] for r in _rules("alert")])
def test_every_alert_is_tested_firing_and_quiet(alert):
    checks = [c for case in _unit_cases() for c in case.get("alert_rule_test", []) if c["alertname"] == alert]
    assert any(c.get("exp_alerts") for c in checks), f"{alert}: no unit test where it fires"
    assert any(not c.get("exp_alerts") for c in checks), f"{alert}: no unit test where it stays quiet"
    for check in checks:
        for expected in check.get("exp_alerts") or []:
            assert set(expected.get("exp_annotations", {})) >= {"summary", "description", "runbook"}, alert


@pytest.mark.parametrize("record", [r["record"] for r in _rules("record")])
def test_every_recording_rule_is_tested(record):
    checked = [c for case in _unit_cases() for c in case.get("promql_expr_test", [])
               if re.search(rf"(?<![\w:]){re.escape(record)}(?![\w:])", c["expr"]) and c.get("exp_samples")]
    assert checked, f"{record}: no promql_expr_test with expected samples reads it"


@pytest.mark.parametrize("rule", _rules("alert"), ids=lambda r: r["alert"])
def test_every_alert_has_severity_and_a_runbook_section(rule):
    assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip(), rule["alert"]
    anchor = rule["alert"].lower()
    assert annotations["runbook"] == f"docs/operations.md#{anchor}"
    headings = re.findall(r"^#+\s+(.+?)\s*$", OPERATIONS.read_text(), flags=re.M)
    assert rule["alert"] in headings, f"docs/operations.md has no heading '{rule['alert']}' (runbook)"
