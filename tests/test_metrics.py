"""service/metrics.py's own helpers, against the prometheus_client installed."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from charrnn.service import errors
from charrnn.service.metrics import ENGINE_STATES, Metrics, observe_many
from charrnn.service.supervisor import EngineState


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("h_seconds", "h", ["model"], buckets=(0.001, 0.01, 0.1), registry=registry)


@pytest.mark.parametrize("value, count", [(0.0005, 3), (0.005, 1000), (0.05, 7), (5.0, 2), (0.01, 4)])
def test_observe_many_equals_count_observations(value, count):
    by_one, one = _histogram()
    at_once, many = _histogram()
    for _ in range(count):
        one.labels("m").observe(value)
    observe_many(many.labels("m"), value, count)

    def samples(registry):
        return {(s.name, s.labels.get("le")): s.value for f in registry.collect() for s in f.samples
                if not s.name.endswith("_created")}

    got, want = samples(at_once), samples(by_one)
    assert got.keys() == want.keys()
    for key in want:  # buckets and count exactly; the sum up to the order of the additions
        assert got[key] == pytest.approx(want[key], rel=1e-12) if key[0].endswith("_sum") else got[key] == want[key]


def test_observe_many_finds_the_client_librarys_internals():
    # observe_many falls back to one observe() per count when these go; that would be correct but slow.
    _, h = _histogram()
    child = h.labels("m")
    assert all(hasattr(child, name) for name in ("_buckets", "_upper_bounds", "_sum"))


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
