"""The Grafana dashboard and the alerting rules in ``examples/`` use only metrics that meterware exports,
and the README's "Monitoring" section lists every one of them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from meterware.config import Config
from meterware.metrics import AppMetrics
from meterware.rollup.metrics import CustomerMetrics, RollupMetrics, ShardLag
from meterware.storage.memory import MemoryStorage

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"
RULES = ROOT / "examples" / "prometheus-rules.yml"
NAME = re.compile(r"\bmeterware_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_families() -> dict[str, str]:
    """Every metric family meterware exports (app and worker), by name, with its type."""
    registry = CollectorRegistry()
    AppMetrics(registry)
    RollupMetrics(registry)
    registry.register(CustomerMetrics(MemoryStorage(shards=1), Config(), limit=1, interval=1))
    return {family.name: family.type for family in registry.collect()}


def exported_series() -> set[str]:
    """The series names a query can use: ``_total`` of counters, ``_bucket/_sum/_count`` of histograms."""
    return {name + suffix for name, kind in exported_families().items() for suffix in SUFFIXES[kind]}


def strings(node: Any, keys: tuple[str, ...]) -> Iterator[str]:
    """Every string under one of ``keys`` anywhere in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from strings(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item, keys)


def dashboard_queries() -> list[str]:
    return list(strings(json.loads(DASHBOARD.read_text()), ("expr", "definition")))


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_metric_of_the_dashboard_is_exported() -> None:
    """Each ``meterware_*`` name in a panel query or a variable is a series the code exports."""
    referenced = {name for query in dashboard_queries() for name in NAME.findall(query)}
    assert referenced
    assert referenced <= exported_series(), referenced - exported_series()


def test_every_metric_of_the_alerting_rules_is_exported() -> None:
    """Each ``meterware_*`` name in an alert expression is a series the code exports."""
    referenced = {name for rule in rules() for name in NAME.findall(rule["expr"])}
    assert referenced
    assert referenced <= exported_series(), referenced - exported_series()


def test_the_dashboard_covers_traffic_latency_rejections_customers_and_pipeline() -> None:
    """The panels an operator expects are there, each with at least one query."""
    document = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in document["panels"] if panel["type"] != "row"]
    assert all(panel["targets"] and all(t["expr"] for t in panel["targets"]) for panel in panels)
    queries = " ".join(dashboard_queries())
    for needed in (
        "sum by (outcome) (rate(meterware_requests_total",
        "histogram_quantile(0.99, sum by (le) (rate(meterware_request_duration_seconds_bucket",
        "sum by (reason) (rate(meterware_rejections_total",
        "topk(15, max by (customer) (meterware_customer_period_usage",
        "meterware_customer_balance_credits",
        "meterware_buffer_events",
        "meterware_flush_duration_seconds_bucket",
        "meterware_events_dropped_total",
        "meterware_rollup_lag_seconds",
        "meterware_rollup_lag_entries",
    ):
        assert needed in queries, needed
    assert len({panel["id"] for panel in document["panels"]}) == len(document["panels"])


def test_the_rules_alert_on_a_stalled_worker_lag_drops_and_backend_outages() -> None:
    """The alerts of the issue are there, each with an expression, a severity and a summary."""
    by_name = {rule["alert"]: rule for rule in rules()}
    for alert in (
        "MeterwareRollupWorkerStalled",
        "MeterwareRollupLagGrowing",
        "MeterwareRollupBacklogGrowing",
        "MeterwareEventsDropped",
        "MeterwareBackendDown",
    ):
        assert alert in by_name, alert
    for rule in by_name.values():
        assert rule["expr"].strip()
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_promtool_accepts_the_rules_and_the_dashboard_queries(tmp_path: Path) -> None:
    """Prometheus' own checker parses every alert, and every panel query as a recording rule."""
    assert shutil.which("promtool"), "promtool is missing: tests/install-deps.sh installs it"
    grafana = {"$__rate_interval": "5m", "$app_job": ".*", "$worker_job": ".*", "$meter": "calls"}
    records = []
    for index, query in enumerate(strings(json.loads(DASHBOARD.read_text()), ("expr",))):
        for variable, value in grafana.items():
            query = query.replace(variable, value)
        records.append({"record": f"meterware:dashboard:{index}", "expr": query})
    panels = tmp_path / "panels.yml"
    panels.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
    for path in (RULES, panels):
        command = ["promtool", "check", "rules", str(path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def readme_metrics() -> dict[str, tuple[str, str]]:
    """The table of the README's Monitoring section: series name -> (type, labels)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(meterware_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|", section, re.MULTILINE)
    return {name: (kind, labels.strip()) for name, kind, labels in rows}


def test_the_readme_lists_every_metric_with_its_type_and_labels() -> None:
    """Every exported metric has a row (name as queried, type, labels) in the README, and no other."""
    registry = CollectorRegistry()
    AppMetrics(registry).call("/", "GET", "success", "p", 0.1)
    RollupMetrics(registry).lag[0] = ShardLag(oldest_ms=0, behind=0)
    families = exported_families()
    documented = readme_metrics()
    expected = {name + ("_total" if kind == "counter" else ""): kind for name, kind in families.items()}
    assert {name: kind for name, (kind, _) in documented.items()} == expected
    for family in registry.collect():
        if family.samples:
            labels = set(family.samples[0].labels) - {"le"}
            name = family.name + ("_total" if family.type == "counter" else "")
            shown = {label.strip(" `") for label in documented[name][1].split(",") if label.strip(" `-")}
            assert shown == labels, name
