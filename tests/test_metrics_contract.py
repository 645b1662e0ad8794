"""The metrics contract (service/metrics.py) against what deploy/ and docs/ say about it.

Every metric name the dashboard and the rules read must be one the service
exposes, with labels it has; docs/metrics.md must list exactly the contract's
metrics with their types, labels and buckets. The same names are checked
against a live server's /metrics in test_prometheus_live.py.
"""

from __future__ import annotations

import re

import pytest

from charrnn.service.metrics import STATUS_CODES
from tests.deployqueries import (
    PROMETHEUS_SERIES,
    TARGET_LABELS,
    Query,
    Selector,
    contract_families,
    contract_series,
    dashboard_queries,
    grouping_labels,
    recorded_names,
    rule_queries,
    selectors,
    template_metric_names,
)
from tests.deploytools import REPO

CONTRACT = contract_series()
RECORDED = recorded_names()


def test_selectors_are_read_by_a_promql_parser():
    query = Query("example", 'histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{model=~".*",code!="OK"}[5m])))'
                             ' / on (job) group_left (model) b:c:d and absent(up{job="charrnn"})')
    assert selectors(query) == [
        Selector("a_bucket", (("model", "=~", ".*"), ("code", "!=", "OK"))),
        Selector("b:c:d", ()),
        Selector("up", (("job", "=", "charrnn"),)),
    ]
    assert grouping_labels(query) == {"model", "le", "job"}
    with pytest.raises(AssertionError, match="does not parse"):
        selectors(Query("broken", "sum(rate(x[5m])"))


def test_contract_series_carry_their_suffixes_and_labels():
    assert CONTRACT["charrnn_requests_total"] == {"model", "code", "reason"}
    assert CONTRACT["charrnn_time_to_first_char_seconds_bucket"] == {"model", "le"}
    assert CONTRACT["charrnn_models_loaded"] == set()
    assert "charrnn_requests" not in CONTRACT and "charrnn_step_seconds" not in CONTRACT


def _known(name: str) -> bool:
    return name in CONTRACT or name in RECORDED or name in PROMETHEUS_SERIES


def _unknown_names(queries: list[Query]) -> list[str]:
    return [f"{q.where}: {s.name!r}" for q in queries for s in selectors(q) if not _known(s.name)]


def test_dashboard_reads_only_contract_metrics():
    queries = dashboard_queries()
    assert len(queries) >= 15
    assert _unknown_names(queries) == []
    for variable, metric in template_metric_names():
        assert metric in CONTRACT, f"template variable {variable} reads {metric!r}, not in the contract"


def test_rules_read_only_contract_metrics_and_recorded_series():
    queries = rule_queries()
    assert len(queries) >= 15
    assert _unknown_names(queries) == []


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_queries_name_only_labels_the_series_have(source):
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    problems = []
    for query in queries:
        found = selectors(query)
        in_query = set(TARGET_LABELS)
        for selector in found:
            labels = CONTRACT.get(selector.name)
            if labels is None:
                continue  # recorded series and `up`: their labels come from the expressions checked here
            in_query |= labels
            for label, op, value in selector.matchers:
                if label not in labels | TARGET_LABELS | {"__name__"}:
                    problems.append(f"{query.where}: {selector.name} has no label {label!r}")
                if label == "code":
                    codes = value.split("|") if op in ("=~", "!~") else [value]
                    problems += [f"{query.where}: code {c!r} is not in STATUS_CODES" for c in codes
                                 if c not in STATUS_CODES]
        if any(s.name in CONTRACT for s in found):
            problems += [f"{query.where}: groups by {label!r}, which no series in it has"
                         for label in sorted(grouping_labels(query) - in_query)]
    assert problems == []


def test_failed_ratio_excludes_exactly_the_client_caused_codes():
    rule = next(q for q in rule_queries() if q.where == "record model:charrnn_requests_failed:ratio_rate5m")
    excluded = {v for s in selectors(rule) for label, op, v in s.matchers if label == "code" and op == "!~"}
    assert len(excluded) == 1
    assert set(re.split(r"\|", excluded.pop())) == {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED"}


METRICS_DOC = REPO / "docs" / "metrics.md"


def _doc_table() -> dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]]:
    rows = {}
    for line in METRICS_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.fullmatch(r"`charrnn_\w+`", cells[0]):
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"docs/metrics.md lists {name} twice"
        labels = tuple(label.strip().strip("`") for label in cells[2].split(",") if label.strip())
        buckets = tuple(float(b) for b in cells[3].split(",") if b.strip())
        rows[name] = (cells[1], labels, buckets)
    return rows


def test_metrics_doc_lists_exactly_the_contract():
    documented = _doc_table()
    contract = contract_families()
    assert sorted(documented) == sorted(contract), "docs/metrics.md and service/metrics.py list different metrics"
    for name, (kind, labels, buckets) in contract.items():
        assert documented[name] == (kind, labels, buckets), f"docs/metrics.md row for {name}"


def test_metrics_doc_lists_every_status_code():
    text = METRICS_DOC.read_text()
    for code in STATUS_CODES:
        assert f"`{code}`" in text, code


def test_metrics_doc_examples_parse_and_read_contract_metrics():
    text = METRICS_DOC.read_text()
    examples = []
    for block in re.findall(r"(?:^    .+\n?)+", text, flags=re.M):
        lines = [line[4:] for line in block.splitlines()]
        # One expression per line, except a continuation line that starts with an operator.
        expr = ""
        for line in lines:
            if expr and not re.match(r"\s*[-+*/]", line):
                examples.append(expr)
                expr = ""
            expr = f"{expr} {line.strip()}" if expr else line.strip()
        examples.append(expr)
    assert len(examples) >= 8
    assert _unknown_names([Query(f"docs/metrics.md example {i}", e) for i, e in enumerate(examples)]) == []
