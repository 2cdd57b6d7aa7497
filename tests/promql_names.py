"""Which metrics a PromQL expression reads, and which the service defines:
so that the alert rules and the Grafana dashboard are checked against
service/metrics.py, not against a list kept by hand."""

from __future__ import annotations

import re

from service.metrics import ServiceMetrics

# The training-health series of issue 16, which the Grafana dashboard charts.
HEALTH_SERIES = {
    "shardprop_gradient_norm", "shardprop_update_to_weight_ratio", "shardprop_worker_compute_seconds_total",
    "shardprop_worker_wait_seconds_total", "shardprop_goodput_ratio", "shardprop_lost_seconds_total",
    "shardprop_steps_lost_total", "shardprop_last_step_timestamp_seconds", "shardprop_job_running",
}
PROMETHEUS_OWN = {"up"}  # written by Prometheus for every scrape target
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names in `expr`: identifiers that are neither functions
    (followed by `(`), keywords, nor inside label matchers, grouping
    clauses, strings or ranges. Grafana's `label_values(metric, label)` reads
    `metric`."""
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*,[^)]*\)", r"\1", expr)
    expr = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    words = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\(?)", expr)
    return {word for word, call in words if not call and word not in KEYWORDS}


def defined_names() -> set[str]:
    """Every series name service/metrics.py defines, as Prometheus stores it."""
    names = set()
    for family in ServiceMetrics().registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names

