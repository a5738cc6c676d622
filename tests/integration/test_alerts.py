"""Alert rules and the dashboard: promtool checks them, and a real Prometheus scrapes the real
service and evaluates every expression they use.

promtool and prometheus come from Debian's ``prometheus`` package; where it is absent the tests
that need it skip, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import ROOT, ServerThread, free_port, wait_for
from worker.front.api import create_app
from worker.front.stats import collect, render_prometheus
from worker.runtime import Runtime
from worker.settings import load_settings

PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "partner-notify.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)


def _alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return {
        rule["alert"]: rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _metric_names(expr: str, prefix: str) -> set[str]:
    return set(re.findall(rf"\b({prefix}_[a-z_]+)\b", expr))


@needs_promtool
def test_promtool_finds_the_rules_and_the_scrape_config_valid() -> None:
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        done = subprocess.run(
            [str(PROMTOOL), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_unit_tests_of_every_alert_pass() -> None:
    done = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts.test.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "alerts.test.yml").read_text()))
    assert tested == set(_alert_exprs()), "every alert has a unit test"
    assert set(_alert_exprs()) == {
        "NotifyRetryBacklogGrowing",
        "NotifyDeadLettersRising",
        "NotifyBreakerOpen",
        "NotifyNoDeliveries",
        "NotifyWorkersMissing",
    }


def test_every_metric_the_rules_and_dashboard_use_is_served(runtime: Runtime) -> None:
    # A renamed metric would silently make an alert never fire: fail here instead.
    served = set(re.findall(r"^# TYPE (\w+) ", render_prometheus(collect(runtime)), re.M))
    spec = find_spec("flower.events")
    assert spec is not None and spec.origin is not None
    flower_source = Path(spec.origin).read_text()
    for expr in [*_alert_exprs().values(), *_dashboard_exprs()]:
        assert _metric_names(expr, "notify") <= served, expr
        for name in _metric_names(expr, "flower"):
            assert f"'{name}'" in flower_source, f"{name} is not a Flower metric"


def test_the_dashboard_is_provisioned_from_the_compose_monitoring_profile() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("prometheus/prometheus.yml", "prometheus/alerts.yml", "grafana/dashboards"):
        assert path in mounts
        assert (ROOT / "docker" / path).exists()
    # Prometheus reaches Flower on the internal network; nothing of it is published.
    assert "backend" in services["prometheus"]["networks"]
    assert "ports" not in services["prometheus"]
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert targets == {"api:8000", "flower:5555"}
    assert json.loads(DASHBOARD.read_text())["panels"]


@pytest.fixture
def prometheus(tmp_path: Path, runtime: Runtime) -> Iterator[str]:
    """A real Prometheus scraping the real HTTP service every second; its URL."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    with ServerThread(create_app(load_settings(), runtime)) as service:
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
        config["scrape_configs"] = [
            {
                "job_name": "notify-api",
                "static_configs": [{"targets": [service.url.removeprefix("http://")]}],
            }
        ]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("w"),
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=15)


def _query(base: str, expr: str) -> dict[str, Any]:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    document: dict[str, Any] = answer.json()
    assert document["status"] == "success", (expr, document)
    return document


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_service_and_evaluates_every_expression(
    prometheus: str,
) -> None:
    def scraped() -> bool:
        try:
            return bool(_query(prometheus, "notify_breaker_state")["data"]["result"])
        except (httpx.HTTPError, ValueError):
            return False

    wait_for(scraped, timeout=30, interval=0.5, what="Prometheus to scrape /metrics")
    time.sleep(2)  # a few samples, so rate() and delta() have two points
    for expr in [*_alert_exprs().values(), *_dashboard_exprs()]:
        _query(prometheus, expr)  # parses and evaluates against the scraped series
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    loaded = {rule["name"] for group in rules for rule in group["rules"]}
    assert loaded == set(_alert_exprs())
    assert all(rule["health"] in ("ok", "unknown") for group in rules for rule in group["rules"]), (
        rules
    )
