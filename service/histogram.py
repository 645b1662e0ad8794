"""A Prometheus histogram whose counts the service keeps itself, so counts made elsewhere can be added.

The engine core counts its step, batch, queue-wait and inter-character figures
in arrays (metrics.CoreStats) and sends what changed; other front-end processes
send their request histograms' changes the same way. prometheus_client's
``Histogram`` can only ``observe()`` one value at a time, so these families are
a custom collector (the client's public Collector API): the per-bucket counts
and the sum live in numpy arrays here, and ``collect()`` yields a
``HistogramMetricFamily`` with cumulative buckets, ``_count``, ``_sum`` and
``_created``, the same samples a client-library ``Histogram`` exposes.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Sample
from prometheus_client.utils import floatToGoString

# The client library's own switch for _created series (PROMETHEUS_DISABLE_CREATED_SERIES, read once at
# import as the library does), so these families follow the same setting as its counters.
EXPORT_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


class HistogramSeries:
    """One label set's counts: observations per bucket (the last is +Inf, past every bound) and their sum."""

    def __init__(self, bounds: Sequence[float]):
        self._bounds = bounds  # finite upper bounds, ascending
        self._lock = threading.Lock()
        self._counts = np.zeros(len(bounds) + 1, np.float64)  # per bucket, not cumulative
        self._total = 0.0  # sum of the observed values
        self.created = time.time()  # seconds since the epoch, exposed as _created

    def observe(self, value: float) -> None:
        """One observation: it lands in the first bucket whose bound is >= value (else +Inf)."""
        where = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[where] += 1
            self._total += value

    def add(self, counts: Sequence[float], total: float) -> None:
        """Adds observations counted elsewhere: ``counts`` per bucket (not cumulative, +Inf last), ``total`` their sum."""
        counts = np.asarray(counts, np.float64)
        if counts.shape != self._counts.shape:
            raise ValueError(f"counts must have {len(self._counts)} buckets (+Inf last), got {counts.shape}")
        with self._lock:
            self._counts += counts
            self._total += float(total)

    def cumulative(self) -> tuple[np.ndarray, float]:
        """(observations <= each bound, +Inf last; their sum), read together."""
        with self._lock:
            return np.cumsum(self._counts), self._total


class CountedHistogram:
    """A histogram family with labels, registered as a collector; ``labels(...)`` gives a HistogramSeries."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, buckets: Sequence[float],
                 registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(float(b) for b in buckets)  # finite upper bounds; +Inf is implied
        if list(self.buckets) != sorted(self.buckets) or not self.buckets or self.buckets[-1] == float("inf"):
            raise ValueError(f"buckets must be finite ascending upper bounds, got {buckets}")
        self._le = [floatToGoString(b) for b in self.buckets] + ["+Inf"]  # the `le` label of each bucket
        self._lock = threading.Lock()  # guards the dict; each series guards its own counts
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        registry.register(self)

    def labels(self, *values: str, **by_name: str) -> HistogramSeries:
        """The series of one label set, created (at 0) on first use."""
        if by_name:
            if values or set(by_name) != set(self.labelnames):
                raise ValueError(f"labels must be {self.labelnames}, got {values} {by_name}")
            values = tuple(by_name[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"labels must be {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = HistogramSeries(self.buckets)
            return series

    def describe(self) -> Iterator[HistogramMetricFamily]:
        """The family without samples: the registry checks names against it at register()."""
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = list(self._series.items())
        for key, one in series:
            counts, total = one.cumulative()
            family.add_metric(key, list(zip(self._le, counts.tolist())), total)
            if EXPORT_CREATED:
                family.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, key)), one.created))
        yield family
