"""deploy/prometheus: the scrape config and alerting rules, checked by promtool, and the
rules' metric names checked against what fedsim.aggregator.metrics exports.

promtool comes with Debian's `prometheus` package. Without it the promtool tests
skip with the reason; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fedsim.aggregator.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "prometheus"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool not found: apt-get install -y prometheus (Debian's package)"
        if IN_CI:
            pytest.fail(reason + "; CI=true requires it")
        pytest.skip(reason)
    return path


def run(*args: str, stdin: bytes | None = None, cwd: Path = DEPLOY) -> str:
    done = subprocess.run(args, input=stdin, cwd=cwd, capture_output=True, timeout=60, check=False)
    out = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, out
    return out


def busy_metrics() -> Metrics:
    """A Metrics object with every labelled series present."""
    m = Metrics()
    m.update_accepted(staleness=2, seconds_aggregating=0.004)
    m.update_refused("stale")
    m.update_duplicate()
    for kind in ("train", "evaluate"):
        m.task_handed_out(kind)
        m.task_finished(kind)
        m.task_expired(kind)
    m.evaluation(accuracy=0.95, loss=0.17, version=3)
    m.checkpoint_written(0.02)
    return m


def test_config_is_valid(promtool, tmp_path):
    # The image puts the rules at /etc/prometheus/alerts.yml; point at the repository's copy.
    config = (DEPLOY / "prometheus.yml").read_text()
    assert "/etc/prometheus/alerts.yml" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/alerts.yml", str(DEPLOY / "alerts.yml"))
    )
    out = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert "SUCCESS: 3 rules found" in out


def test_alert_rules_pass_their_unit_tests(promtool):
    """alerts_test.yml: each alert fires when it should, and not in the cases next to it."""
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts_test.yml")


def test_exposition_passes_promtools_lint(promtool):
    body, _ = busy_metrics().render()
    # `check metrics` reads stdin and prints nothing for a clean exposition.
    assert run(promtool, "check", "metrics", stdin=body).strip() == ""


def test_scrape_config_targets_the_aggregator():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "aggregator"
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["aggregator:8080"]}]


def test_rules_name_only_metrics_that_are_exported():
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert set(alerts) == {"AggregatorDown", "NoAcceptedUpdate", "RefusalRateHigh"}
    used = set(re.findall(r"\bfedsim_[a-z_]+", " ".join(r["expr"] for r in alerts.values())))
    body, _ = busy_metrics().render()
    exported = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert used, "the rules name no fedsim metric"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
