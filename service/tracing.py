"""OpenTelemetry traces of requests, only when the standard OTEL_* variables ask for them.

``from_env()`` returns None (and imports nothing of OpenTelemetry) unless
``OTEL_TRACES_EXPORTER`` names an exporter or an ``OTEL_EXPORTER_OTLP_*ENDPOINT``
is set, and ``OTEL_SDK_DISABLED`` is not ``true``. Then every Generate and Score
call, over gRPC or HTTP, is a span that continues the caller's W3C
``traceparent`` (gRPC metadata or HTTP header), with child spans ``queue``,
``prefill`` and ``decode`` timed from the engine's own stats, and attributes for
the model, characters, seed, finish reason and status code. Spans leave over
OTLP/gRPC (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME`` and the rest
of the SDK's variables apply) in batches, off the event loop. The log lines of
a traced request carry its ``trace_id`` and ``span_id`` (logs.TRACE).

The SDK and exporter come with the ``otel`` extra (``pip install 'charrnn[otel]'``);
without it the server logs one warning and serves untraced.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Mapping, Sequence

from charrnn.service.logs import TRACE

log = logging.getLogger("charrnn.service.tracing")
EXPORTERS = ("otlp", "console")  # OTEL_TRACES_EXPORTER values served here


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (the SDK's own variables; nothing of it imported)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def from_env(env: Mapping[str, str] | None = None) -> "Tracing | None":
    env = os.environ if env is None else env
    if not wanted(env):
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter not in EXPORTERS:
        log.warning("OTEL_TRACES_EXPORTER must be one of %s, got %r; serving without traces",
                    ", ".join(EXPORTERS), exporter)
        return None
    try:
        return Tracing(exporter)
    except ImportError as e:
        log.warning("OTEL_* variables ask for traces but the otel extra is not installed (%s): pip install "
                    "'charrnn[otel]'; serving without traces", e)
        return None


def _wall_ns(monotonic: float) -> int:
    """A time.monotonic() instant as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class Tracing:
    """One TracerProvider per process, exporting in batches."""

    def __init__(self, exporter: str):
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()  # endpoint, headers, TLS from OTEL_EXPORTER_OTLP_*
        else:
            span_exporter = ConsoleSpanExporter()
        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; charrnn-serve is the default name.
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "charrnn-serve"})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self.tracer = self.provider.get_tracer("charrnn.service")
        self._trace, self._propagate = trace, propagate
        self._ok = trace.Status(trace.StatusCode.OK)
        self._error = trace.StatusCode.ERROR

    def start(self, name: str, metadata: Sequence[tuple[str, str]], arrived: float, attributes: dict):
        """A server span for one call, child of the caller's traceparent if it sent one; its ids go on the logs."""
        carrier = {str(k).lower(): v for k, v in metadata if isinstance(v, str)}
        parent = self._propagate.extract(carrier)
        span = self.tracer.start_span(name, context=parent, kind=self._trace.SpanKind.SERVER,
                                      start_time=_wall_ns(arrived), attributes=attributes)
        ctx = span.get_span_context()
        TRACE.set((format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")))
        return span

    def end(self, span, code: str, attributes: dict, stats=None) -> None:
        """Ends ``span``: its outcome, and the queue / prefill / decode spans of the engine's stats."""
        import grpc

        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        span.set_attribute("charrnn.status_code", code)
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        if stats is not None:
            parent = self._trace.set_span_in_context(span)
            at = span.start_time  # the call's arrival: the phases follow one another from there
            for phase, seconds in (("queue", stats.queue_seconds), ("prefill", stats.prefill_seconds),
                                   ("decode", stats.decode_seconds)):
                end = at + int(seconds * 1e9)
                self.tracer.start_span(phase, context=parent, start_time=at).end(end_time=end)
                at = end
        if code in ("OK", "CANCELLED"):
            span.set_status(self._ok)
        else:
            span.set_status(self._trace.Status(self._error, code))
        span.end()

    def close(self) -> None:
        self.provider.shutdown()  # flushes what is left
