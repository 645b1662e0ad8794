"""The PromQL that deploy/ ships (dashboard panels, recording and alert rules) and the metric names it reads.

Expressions are parsed by a real PromQL parser (promql-parser), not matched
with patterns, so a name inside a function call, a range or a binary operation
is found the same way Prometheus finds it. The contract side is
``charrnn.service.metrics.Metrics`` registered in a fresh registry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import promql_parser
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from charrnn.service.histogram import CountedHistogram
from charrnn.service.metrics import Metrics
from tests.deploytools import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "charrnn-dashboard.json"
RULE_FILES = (REPO / "deploy" / "prometheus" / "recording-rules.yml", REPO / "deploy" / "prometheus" / "alert-rules.yml")

# Grafana variables and what stands in for them when an expression is parsed or run.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "model": ".*"}
# Labels Prometheus attaches to every scraped series (static config and Kubernetes service discovery).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# Series Prometheus makes itself.
PROMETHEUS_SERIES = {"up"}


@dataclass(frozen=True)
class Query:
    where: str  # "dashboard panel 'Title' A" or "alert CharrnnX"
    expr: str   # PromQL with Grafana variables substituted


@dataclass(frozen=True)
class Selector:
    name: str                       # metric name ('' when selected by matchers only)
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value); op one of = != =~ !~


def substitute_grafana_variables(text: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"Grafana variable ${name} has no stand-in in GRAFANA_VARIABLES")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, text)


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))  # panels inside collapsed rows
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    return _panels(dashboard()["panels"])


def dashboard_queries() -> list[Query]:
    return [
        Query(f"dashboard panel {panel['title']!r} {target['refId']}", substitute_grafana_variables(target["expr"]))
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def template_metric_names() -> list[tuple[str, str]]:
    """(variable, metric) for each `label_values(metric, label)` template query."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query.strip())
        if not match:
            raise AssertionError(f"template variable {variable['name']}: query {query!r} is not label_values(metric, label)")
        found.append((variable["name"], match.group(1)))
    return found


def rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_queries() -> list[Query]:
    return [Query(f"{'alert' if 'alert' in r else 'record'} {r.get('alert') or r.get('record')}", r["expr"]) for r in rules()]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def parse(query: Query):
    try:
        return promql_parser.parse(query.expr)
    except ValueError as e:
        raise AssertionError(f"{query.where}: {query.expr!r} does not parse: {e}") from None


_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def selectors(query: Query) -> list[Selector]:
    found: list[Selector] = []

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple((m.name, _OPS[str(m.op)], m.value) for m in node.matchers.matchers)
            name = node.name or next((v for label, op, v in matchers if label == "__name__" and op == "="), "")
            found.append(Selector(name, matchers))

    promql_parser.walk(parse(query), visit)
    return found


def grouping_labels(query: Query) -> set[str]:
    """Labels named in by (...), without (...), on (...), ignoring (...), group_left/right (...)."""
    labels: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        if isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            modifier = node.modifier
            if modifier.matching is not None:
                labels.update(modifier.matching.labels)
            labels.update(getattr(modifier, "group_labels", None) or [])

    promql_parser.walk(parse(query), visit)
    return labels


def contract_series() -> dict[str, set[str]]:
    """Sample name -> label names, for every series a fresh Metrics() can expose.

    Every labelled family gets one child (label values = label names) so its
    samples, with their _total/_bucket/_count/_sum/_created suffixes, appear.
    """
    metrics = Metrics(CollectorRegistry())
    for collector in vars(metrics).values():
        if isinstance(collector, CountedHistogram):
            collector.labels(*collector.labelnames)
        elif isinstance(collector, MetricWrapperBase) and collector._labelnames:
            collector.labels(*collector._labelnames)
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def contract_families() -> dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]]:
    """Family name as exposed (counters with _total) -> (type, label names, buckets without +Inf)."""
    metrics = Metrics(CollectorRegistry())
    families = {}
    for collector in vars(metrics).values():
        if isinstance(collector, CountedHistogram):
            families[collector.name] = ("histogram", collector.labelnames, collector.buckets)
            continue
        if not isinstance(collector, MetricWrapperBase):
            continue
        kind = collector._type
        name = collector._name + ("_total" if kind == "counter" else "")
        buckets = tuple(b for b in getattr(collector, "_upper_bounds", ()) if b != float("inf"))
        families[name] = (kind, tuple(collector._labelnames), buckets)
    return families
