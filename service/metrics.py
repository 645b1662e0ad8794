"""The Prometheus metrics of the service: names, labels and buckets are a public contract.

docs/metrics.md documents each one; deploy/prometheus and deploy/grafana query
them. Change the three together. Each server (and each test) gets its own
``CollectorRegistry``. The histograms that also take counts made in another
process (the engine core's, other front-ends') are ``CountedHistogram``s
(histogram.py), which keep their counts themselves; the rest are the client
library's own collectors.
"""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from charrnn.service import errors
from charrnn.service.histogram import CountedHistogram
from charrnn.service.protocol import EngineState, StatsDelta

# Buckets tuned to the workload (the client library's default 5 ms..10 s misses
# the sub-millisecond steps of a small model on CPU).
TTFC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INTER_CHAR_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
STEP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
QUEUE_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Every value the `code` label of charrnn_requests_total can take, and each code's `reason`s (errors.py).
STATUS_CODES = errors.CODES

# Every value the `state` label of charrnn_engine_state can take.
ENGINE_STATES = tuple(s.value for s in EngineState)
# Every value the `result` label of charrnn_prime_cache_lookups_total can take.
CACHE_RESULTS = ("hit", "miss")


class Metrics:
    """All collectors of one server, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "charrnn_requests", "Generate requests by final gRPC status code and the reason for it.",
            ["model", "code", "reason"], registry=r
        )
        self.prime_chars = Counter("charrnn_prime_chars", "Prime characters read.", ["model"], registry=r)
        self.generated_chars = Counter(
            "charrnn_generated_chars", "Characters generated and sent.", ["model"], registry=r
        )
        self.time_to_first_char = CountedHistogram(
            "charrnn_time_to_first_char_seconds",
            "From a request's arrival to its first generated character (queue + prefill).",
            ["model"],
            buckets=TTFC_BUCKETS,
            registry=r,
        )
        self.inter_char = CountedHistogram(
            "charrnn_inter_char_seconds",
            "Time between consecutive generated characters of one stream (the K characters of one --decode-steps "
            "call are spaced evenly over it).",
            ["model"],
            buckets=INTER_CHAR_BUCKETS,
            registry=r,
        )
        self.queue_wait = CountedHistogram(
            "charrnn_queue_wait_seconds",
            "Time a request waited for a batch slot.",
            ["model"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.request_duration = CountedHistogram(
            "charrnn_request_duration_seconds",
            "Whole Generate request, arrival to last message.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.step = CountedHistogram(
            "charrnn_step_seconds",
            "One engine step, one character of every stream in the batch: model and sampling (with --decode-steps K, "
            "one K-step call counts K steps of a K-th of its time each).",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = CountedHistogram(
            "charrnn_batch_size", "Streams advanced by one engine step.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.active_streams = Gauge(
            "charrnn_active_streams", "Streams holding a batch slot.", ["model"], registry=r
        )
        self.queued_streams = Gauge(
            "charrnn_queued_streams", "Streams waiting for a batch slot.", ["model"], registry=r
        )
        self.max_active_streams = Gauge(
            "charrnn_max_active_streams", "Batch slots of the model's engine (--max-active-streams).", ["model"], registry=r
        )
        self.model_info = Gauge(
            "charrnn_model_info",
            "1 for each loaded model version.",
            ["model", "version", "cell", "layers", "hidden", "device"],
            registry=r,
        )
        self.model_load = Histogram(
            "charrnn_model_load_seconds",
            "Time to load and validate one model version.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge("charrnn_models_loaded", "Model versions loaded and serving.", registry=r)
        self.model_load_failures = Counter(
            "charrnn_model_load_failures", "Model files refused at load or reload.", ["model"], registry=r
        )
        self.draining = Gauge("charrnn_draining", "1 while the server drains after SIGTERM.", registry=r)
        self.score_requests = Counter(
            "charrnn_score_requests", "Score requests by final gRPC status code and the reason for it.",
            ["model", "code", "reason"], registry=r,
        )
        self.scored_chars = Counter("charrnn_scored_chars", "Characters of text scored.", ["model"], registry=r)
        self.engine_failures = Counter(
            "charrnn_engine_failures",
            "Engine failures: a failed onnxruntime call, a failed restart, or a step that hung past --step-timeout.",
            ["model"],
            registry=r,
        )
        self.engine_state = Gauge(
            "charrnn_engine_state", "Engines of the model's loaded versions in each state.", ["model", "state"],
            registry=r,
        )
        self.prime_cache = Counter(
            "charrnn_prime_cache_lookups", "Prime cache lookups of new streams: hit (no prefill) or miss.",
            ["model", "result"], registry=r,
        )
        # The standard process_* and python_* series (resident memory, open descriptors, CPU, GC):
        # docs/operations.md tells operators to watch memory because of grpcio's per-cancel leak.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def init_model(self, model: str) -> None:
        """Creates every labelled child of ``model`` so series exist (at 0) before traffic."""
        for code, reason in errors.OUTCOMES:
            self.requests.labels(model, code, reason)
            self.score_requests.labels(model, code, reason)
        for state in ENGINE_STATES:
            self.engine_state.labels(model, state)
        for result in CACHE_RESULTS:
            self.prime_cache.labels(model, result)
        for family in (
            self.prime_chars,
            self.generated_chars,
            self.time_to_first_char,
            self.inter_char,
            self.queue_wait,
            self.request_duration,
            self.step,
            self.batch_size,
            self.active_streams,
            self.queued_streams,
            self.max_active_streams,
            self.model_load,
            self.model_load_failures,
            self.engine_failures,
            self.scored_chars,
        ):
            family.labels(model)


class CoreStats:
    """The engine core's own figures, counted in arrays and handed over as deltas.

    The core may run in another process than the registry: it counts here (one
    ``observe`` per step, whatever the batch) and each of its messages to the
    primary front-end carries ``take()``, which ``apply_core_stats`` adds to the
    registry's histograms (CountedHistogram.labels(...).add) and counters.
    """

    HISTOGRAMS = {"step": STEP_BUCKETS, "batch": BATCH_BUCKETS, "queue_wait": QUEUE_WAIT_BUCKETS,
                  "inter_char": INTER_CHAR_BUCKETS}

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the batching-off threads count here too
        self._bounds = {name: np.array(b, np.float64) for name, b in self.HISTOGRAMS.items()}
        self._reset()

    def _reset(self) -> None:
        self._counts = {name: np.zeros(len(b) + 1, np.int64) for name, b in self.HISTOGRAMS.items()}
        self._sums = dict.fromkeys(self.HISTOGRAMS, 0.0)
        self._cache = [0, 0]  # prime cache hits, misses

    def observe(self, name: str, values) -> None:
        """One observation per value (a float, or an array of them) in histogram ``name``."""
        if not len(values):
            return
        counts = self._counts[name]
        where = np.searchsorted(self._bounds[name], values, side="left")  # first bound >= value; past: +Inf
        with self._lock:
            counts += np.bincount(where, minlength=len(counts))
            self._sums[name] += float(values.sum())

    def observe_same(self, name: str, value: float, count: int) -> None:
        """``count`` observations of one value."""
        if count <= 0:
            return
        where = int(np.searchsorted(self._bounds[name], value, side="left"))
        with self._lock:
            self._counts[name][where] += count
            self._sums[name] += value * count

    def cache(self, hit: bool) -> None:
        with self._lock:
            self._cache[0 if hit else 1] += 1

    def pop_all(self) -> StatsDelta:
        """What was counted since the last pop_all."""
        with self._lock:
            delta = StatsDelta(histograms={n: (c, self._sums[n]) for n, c in self._counts.items() if c.any()},
                               cache_hits=self._cache[0], cache_misses=self._cache[1])
            self._reset()
        return delta


def apply_core_stats(metrics: "Metrics", model: str, delta: StatsDelta) -> None:
    """Adds a CoreStats.pop_all() to the registry of ``metrics`` under label ``model``."""
    families = {"step": metrics.step, "batch": metrics.batch_size, "queue_wait": metrics.queue_wait,
                "inter_char": metrics.inter_char}
    for name, (counts, total) in delta.histograms.items():
        families[name].labels(model).add(counts, total)
    hits, misses = delta.cache_hits, delta.cache_misses
    if hits:
        metrics.prime_cache.labels(model, "hit").inc(hits)
    if misses:
        metrics.prime_cache.labels(model, "miss").inc(misses)


# The families a front-end records itself (servicer.py); a front-end process other than the
# server's own sends their changes to it (frontend.py), which adds them to the one registry.
FRONTEND_FAMILIES = ("requests", "prime_chars", "generated_chars", "time_to_first_char", "request_duration",
                     "score_requests", "scored_chars")


def frontend_snapshot(metrics: Metrics) -> dict:
    """{family: {label values: [count per bucket or [value]], sum]}} of the front-end families, cumulative."""
    out: dict = {}
    for family in FRONTEND_FAMILIES:
        collector = getattr(metrics, family)
        rows: dict = {}
        for sample in next(iter(collector.collect())).samples:
            if sample.name.endswith("_created"):
                continue
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            row = rows.setdefault(labels, {"buckets": [], "sum": 0.0, "value": 0.0})
            if sample.name.endswith("_bucket"):
                row["buckets"].append(sample.value)  # cumulative, in bound order, +Inf last
            elif sample.name.endswith("_sum"):
                row["sum"] = sample.value
            elif not sample.name.endswith("_count"):
                row["value"] = sample.value
        out[family] = rows
    return out


def frontend_delta(before: dict, after: dict) -> dict:
    """What changed between two snapshots: {family: [[labels, per-bucket counts or value, sum], ...]}."""
    delta: dict = {}
    for family, rows in after.items():
        changes = []
        for labels, row in rows.items():
            old = before.get(family, {}).get(labels, {"buckets": [0.0] * len(row["buckets"]), "sum": 0.0, "value": 0.0})
            if row["buckets"]:
                cum = np.array(row["buckets"]) - np.array(old["buckets"])
                per_bucket = np.diff(cum, prepend=0.0)
                if per_bucket.any():
                    changes.append([dict(labels), per_bucket.tolist(), row["sum"] - old["sum"]])
            elif row["value"] != old["value"]:
                changes.append([dict(labels), row["value"] - old["value"], 0.0])
        if changes:
            delta[family] = changes
    return delta


def apply_frontend_delta(metrics: Metrics, delta: dict) -> None:
    """Adds another front-end's changes (frontend_delta) to this registry."""
    for family, changes in delta.items():
        if family not in FRONTEND_FAMILIES:
            continue
        collector = getattr(metrics, family)
        for labels, value, total in changes:
            child = collector.labels(**labels)
            if isinstance(value, list):  # a histogram's counts per bucket
                child.add(value, total)
            elif value:
                child.inc(value)
