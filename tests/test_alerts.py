"""examples/metrics/alerts.yml: valid rules (promtool check rules), each proven by its
unit test in examples/metrics/alerts_test.yml (promtool test rules), and each unit test
able to fail: without the rule, its test does."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.dashboard import ALERTS, ALERTS_TEST, alert_names, probe, without_alert

#: The alerts issue 13 asks for, by what they watch.
EXPECTED = {
    "CacheChainBreakerOpen",  # breaker open for more than 1 minute
    "CacheChainCallsRefused",  # calls refused
    "CacheChainLayerErrorRatio",  # error plus refused ratio over 5%
    "CacheChainQueueNearlyFull",  # queue over 80% of capacity
    "CacheChainWritesDropped",  # writes dropped
    "CacheChainLayerLatencyNearTimeout",  # L2 p99 near its timeout
    "CacheChainHitRatioCollapse",  # hit ratio collapse
    "CacheChainTargetDown",  # target down
    "CacheChainStatsdDrops",  # StatsD drops
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: scripts/test.sh installs it (apt-get install prometheus)")
    return found


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def test_every_alert_of_the_issue_is_there_once() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), names
    assert set(names) == EXPECTED


def test_the_rules_are_valid() -> None:
    done = run("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in done.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    done = run("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test_that_expects_it_to_fire() -> None:
    text = ALERTS_TEST.read_text()
    tested = re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*\n\s*- exp_labels:", text)
    assert set(tested) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_without_the_rule_its_unit_test_fails(name: str, tmp_path: Path) -> None:
    mutated = without_alert(name)
    assert f"alert: {name}" not in mutated
    assert mutated.count("- alert:") == len(EXPECTED) - 1
    (tmp_path / "alerts.yml").write_text(mutated)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    done = run("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert done.returncode != 0, done.stdout
    assert f"alertname: {name}," in done.stdout + done.stderr


def test_every_rule_keeps_job_and_instance_apart() -> None:
    text = ALERTS.read_text()
    exprs = re.findall(r"expr: >-\n((?:\s{10}.*\n)+)", text)
    assert len(exprs) == len(EXPECTED)
    for expr in exprs:
        for clause in re.findall(r"by \(([^)]*)\)", expr):
            labels = {label.strip() for label in clause.split(",")}
            assert {"job", "instance"} <= labels, expr
        assert "by (" in expr or "on (job, instance)" in expr, expr


def test_the_probe_of_a_comparison_returns_every_series() -> None:
    assert probe("sum by (a) (rate(x[5m])) > 0.05") == "sum by (a) (rate(x[5m])) > bool 0.05"
    assert probe('min(x{state="closed"}) == 0') == 'min(x{state="closed"}) == bool 0'
    assert probe("a < 0.5 * b and c > 1") == "a < bool 0.5 * b and c > bool 1"
    assert probe('x{to!="open"} >= 2') == 'x{to!="open"} >= bool 2'
