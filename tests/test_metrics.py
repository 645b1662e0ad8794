"""service/metrics.py and histogram.py, against the prometheus_client installed."""

from __future__ import annotations

import re

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from charrnn.service import errors
from charrnn.service.histogram import CountedHistogram
from charrnn.service.metrics import (
    ENGINE_STATES,
    CoreStats,
    Metrics,
    apply_core_stats,
    apply_frontend_delta,
    frontend_delta,
    frontend_snapshot,
)
from charrnn.service.engine import EngineState


BOUNDS = (0.001, 0.01, 0.1)


def _exposition(registry: CollectorRegistry) -> str:
    """The text a scrape gets, with the _created timestamps (time of creation) blanked."""
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", generate_latest(registry).decode())


@pytest.mark.parametrize("values", [[0.0005] * 3, [0.005] * 1000, [0.05, 0.001, 0.0010001, 5.0, 0.0, 0.1]])
def test_counted_histogram_exposes_what_the_client_librarys_histogram_does(values):
    library, counted = CollectorRegistry(), CollectorRegistry()
    one = Histogram("h_seconds", "Help text.", ["model"], buckets=BOUNDS, registry=library)
    two = CountedHistogram("h_seconds", "Help text.", ["model"], buckets=BOUNDS, registry=counted)
    one.labels("idle"), two.labels("idle")  # a series at 0 reads the same too
    for v in values:
        one.labels("m").observe(v)
        two.labels("m").observe(v)
    assert _exposition(counted) == _exposition(library)


def test_core_deltas_add_up_to_cumulative_buckets_sum_and_count():
    metrics = Metrics()
    metrics.init_model("tiny")
    stats = CoreStats()
    stats.observe("step", np.array([0.00003, 0.0002, 0.0002, 0.3, 2.0]))  # buckets 5e-05, 0.00025 (2), 1.0, +Inf
    apply_core_stats(metrics, "tiny", stats.pop_all())
    stats.observe_same("step", 0.004, 2)  # bucket 0.005
    apply_core_stats(metrics, "tiny", stats.pop_all())

    text = generate_latest(metrics.registry).decode()
    cumulative = {"5e-05": 1, "0.0001": 1, "0.00025": 3, "0.0005": 3, "0.001": 3, "0.0025": 3, "0.005": 5,
                  "0.01": 5, "0.025": 5, "0.05": 5, "0.1": 5, "0.25": 5, "1.0": 6, "+Inf": 7}
    for le, n in cumulative.items():
        assert f'charrnn_step_seconds_bucket{{le="{le}",model="tiny"}} {n}.0\n' in text
    assert 'charrnn_step_seconds_count{model="tiny"} 7.0\n' in text
    get = metrics.registry.get_sample_value
    assert get("charrnn_step_seconds_sum", {"model": "tiny"}) == pytest.approx(0.00003 + 0.0004 + 2.3 + 0.008)
    assert get("charrnn_step_seconds_created", {"model": "tiny"}) > 0
    assert get("charrnn_batch_size_count", {"model": "tiny"}) == 0  # no batch figures came: still at 0


def test_another_front_ends_changes_land_in_the_registry():
    server, frontend = Metrics(), Metrics()
    server.request_duration.labels("tiny").observe(0.7)
    before = frontend_snapshot(frontend)
    for seconds in (12.0, 0.001, 400.0):
        frontend.request_duration.labels("tiny").observe(seconds)
    frontend.generated_chars.labels("tiny").inc(7)
    apply_frontend_delta(server, frontend_delta(before, frontend_snapshot(frontend)))

    get = server.registry.get_sample_value
    bucket = {"model": "tiny"}
    assert get("charrnn_request_duration_seconds_bucket", {**bucket, "le": "0.005"}) == 1
    assert get("charrnn_request_duration_seconds_bucket", {**bucket, "le": "1.0"}) == 2
    assert get("charrnn_request_duration_seconds_bucket", {**bucket, "le": "30.0"}) == 3
    assert get("charrnn_request_duration_seconds_bucket", {**bucket, "le": "+Inf"}) == 4
    assert get("charrnn_request_duration_seconds_count", bucket) == 4
    assert get("charrnn_request_duration_seconds_sum", bucket) == pytest.approx(412.701)
    assert get("charrnn_generated_chars_total", bucket) == 7


def test_counts_with_the_wrong_number_of_buckets_are_refused():
    h = CountedHistogram("h_seconds", "h", ["model"], buckets=BOUNDS, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="counts must have 4 buckets"):
        h.labels("m").add([1, 2, 3], 0.5)


def test_every_outcome_and_engine_state_exists_at_zero_once_a_model_loads():
    metrics = Metrics()
    metrics.init_model("tiny")
    get = metrics.registry.get_sample_value
    for code, reason in errors.OUTCOMES:
        assert get("charrnn_requests_total", {"model": "tiny", "code": code, "reason": reason}) == 0
    assert {s.value for s in EngineState} == set(ENGINE_STATES)
    for state in ENGINE_STATES:
        assert get("charrnn_engine_state", {"model": "tiny", "state": state}) == 0
    assert get("charrnn_engine_failures_total", {"model": "tiny"}) == 0
    assert get("process_open_fds") > 0  # the standard process collector is on the service's registry
