"""deploy/grafana/charrnn-dashboard.json: the panels operators need, a datasource variable, valid queries."""

from __future__ import annotations

import pytest

from tests.deployqueries import dashboard, dashboard_panels, dashboard_queries, parse

# Title -> a metric each of its queries must read (panels that answer the operator's questions).
REQUIRED_PANELS = {
    "Active and queued streams": ("charrnn_active_streams", "charrnn_queued_streams"),
    "Characters per second": ("charrnn_generated_chars_total",),
    "Time to first character": ("charrnn_time_to_first_char_seconds_bucket",),
    "Time between characters": ("charrnn_inter_char_seconds_bucket",),
    "Batch size": ("charrnn_batch_size_sum", "charrnn_batch_size_bucket"),
    "Queue wait": ("charrnn_queue_wait_seconds_bucket",),
    "Errors by code": ("charrnn_requests_total",),
    "Models": ("charrnn_model_info",),
    "Model load time": ("charrnn_model_load_seconds_sum",),
    "Step time": ("charrnn_step_seconds_bucket",),
    "Engine state": ("charrnn_engine_state",),
    "Engine failures": ("charrnn_engine_failures_total",),
    "Prime cache hit ratio": ("charrnn_prime_cache_lookups_total",),
    "Resident memory per pod": ("process_resident_memory_bytes",),
}


def _panel(title: str) -> dict:
    matches = [p for p in dashboard_panels() if p["title"] == title]
    assert len(matches) == 1, f"expected one panel titled {title!r}, found {len(matches)}"
    return matches[0]


@pytest.mark.parametrize("title", sorted(REQUIRED_PANELS))
def test_required_panel_reads_its_metrics(title):
    exprs = " ".join(t["expr"] for t in _panel(title)["targets"])
    for metric in REQUIRED_PANELS[title]:
        assert metric in exprs, f"panel {title!r} does not read {metric}"


def test_latency_panels_show_p50_and_p99_where_asked():
    exprs = " ".join(t["expr"] for t in _panel("Time to first character")["targets"])
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    exprs = " ".join(t["expr"] for t in _panel("Time between characters")["targets"])
    assert "histogram_quantile(0.99," in exprs


def test_models_panel_is_a_table_of_instant_info():
    panel = _panel("Models")
    assert panel["type"] == "table"
    assert all(t.get("format") == "table" and t.get("instant") for t in panel["targets"])


def test_datasource_is_a_variable_used_everywhere():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == wanted, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", wanted) == wanted, (panel["title"], target["refId"])
    assert variables["model"]["datasource"] == wanted


def test_every_query_parses_as_promql():
    queries = dashboard_queries()
    assert queries
    for query in queries:
        parse(query)  # raises with the panel and the expression


def test_panels_have_unique_ids_and_fit_the_grid():
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    refids = [(p["title"], t["refId"]) for p in panels for t in p.get("targets", [])]
    assert len(refids) == len(set(refids))
