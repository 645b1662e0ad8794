"""OpenTelemetry: a real OTLP/gRPC receiver (the collector's TraceService from opentelemetry-proto) started here,
a real charrnn-serve exporting to it, and clients sending W3C traceparent over gRPC metadata and HTTP headers.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from charrnn.service import tracing
from charrnn.service.client import GeneratorClient
from testkit.serve_process import ServeProcess


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span it is sent, with its resource's service.name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    self.spans.extend((service, span) for span in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str, count: int, timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    r = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    r.endpoint = f"http://127.0.0.1:{port}"
    yield r
    server.stop(None)


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env, receiver):
    env = {**no_torch_env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_SERVICE_NAME": "charrnn-under-test", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with ServeProcess(model_repo, "--http-port", "0", "--log-format", "json", env=env) as proc:
        yield proc


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def _check_request_trace(receiver, trace_id: str, parent: str, name: str, model: str, chars: int, seed: int):
    spans = receiver.of_trace(trace_id, 4)
    by_name = {s.name: (svc, s) for svc, s in spans}
    assert set(by_name) == {name, "queue", "prefill", "decode"}, sorted(by_name)
    service, root = by_name[name]
    assert service == "charrnn-under-test"
    assert root.parent_span_id.hex() == parent  # the client's span is the parent
    assert root.kind == root.SPAN_KIND_SERVER
    attrs = _attrs(root)
    assert attrs["charrnn.model"] == model and attrs["charrnn.generated_chars"] == chars
    assert attrs["charrnn.seed"] == seed and attrs["charrnn.finish_reason"] == "length"
    assert attrs["charrnn.status_code"] == "OK" and attrs["rpc.grpc.status_code"] == 0
    phases = [by_name[p][1] for p in ("queue", "prefill", "decode")]
    assert all(p.parent_span_id == root.span_id for p in phases)
    assert root.start_time_unix_nano <= phases[0].start_time_unix_nano
    assert phases[0].end_time_unix_nano == phases[1].start_time_unix_nano  # one after the other
    assert phases[2].end_time_unix_nano <= root.end_time_unix_nano
    return root


def test_grpc_traceparent_arrives_on_the_server_spans(server, receiver):
    trace_id, parent, header = _traceparent()
    with GeneratorClient(server.target) as client:
        stub_call = client._stub.Generate(  # the metadata a traced gRPC client sends
            __import__("charrnn.v1.generator_pb2", fromlist=["x"]).GenerateRequest(
                model="tiny", prime="A", max_chars=25, seed=9),
            metadata=(("traceparent", header),), timeout=30)
        assert "".join(r.text for r in stub_call)
    root = _check_request_trace(receiver, trace_id, parent, "charrnn.v1.Generator/Generate", "tiny@1", 25, 9)
    # the request's log lines carry the trace and span ids
    line = server.wait_for_log(rf'"trace_id": "{trace_id}"')
    logged = json.loads(line.string)
    assert logged["span_id"] == root.span_id.hex() and logged["message"] == "generate ok"


def test_http_traceparent_arrives_on_the_server_spans(server, receiver):
    trace_id, parent, header = _traceparent()
    r = httpx.post(server.http_url + "/v1/completions", headers={"traceparent": header}, timeout=30,
                   json={"model": "other", "prompt": "A", "max_tokens": 12, "seed": 4, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    _check_request_trace(receiver, trace_id, parent, "charrnn.v1.Generator/Generate", "other@1", 12, 4)
    server.wait_for_log(rf'"trace_id": "{trace_id}"')


def test_an_error_is_a_span_with_its_status(server, receiver):
    trace_id, parent, header = _traceparent()
    r = httpx.post(server.http_url + "/v1/completions", headers={"traceparent": header}, timeout=30,
                   json={"model": "tiny", "prompt": "A", "max_tokens": 0})
    assert r.status_code == 400
    (service, span), = receiver.of_trace(trace_id, 1)
    assert _attrs(span)["charrnn.status_code"] == "INVALID_ARGUMENT" and _attrs(span)["rpc.grpc.status_code"] == 3
    assert span.status.code == span.status.STATUS_CODE_ERROR


def test_score_is_traced(server, receiver):
    trace_id, parent, header = _traceparent()
    r = httpx.post(server.http_url + "/v1/score", headers={"traceparent": header}, timeout=30,
                   json={"model": "tiny", "text": "ABC"})
    assert r.status_code == 200
    (service, span), = receiver.of_trace(trace_id, 1)
    assert span.name == "charrnn.v1.Generator/Score" and _attrs(span)["charrnn.scored_chars"] == 3


@pytest.mark.parametrize("modules, prefixes", [
    # the gRPC server: nothing of OpenTelemetry at all
    ("server, servicer, tracing", ("opentelemetry",)),
    # with HTTP: FastAPI itself imports the API package (its own instrumentation, turned off); never the SDK
    ("server, servicer, tracing, http_api", ("opentelemetry.sdk", "opentelemetry.exporter")),
])
def test_without_otel_variables_nothing_of_opentelemetry_is_imported(modules, prefixes):
    code = (
        "import sys\n"
        f"from charrnn.service import {modules}\n"
        "assert tracing.from_env() is None\n"
        f"print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("env, want", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),
])
def test_which_variables_turn_tracing_on(env, want):
    assert tracing.wanted(env) is want


def test_an_unknown_exporter_is_refused_with_a_warning(caplog):
    assert tracing.from_env({"OTEL_TRACES_EXPORTER": "zipkin"}) is None
    assert "OTEL_TRACES_EXPORTER must be one of otlp, console, got 'zipkin'" in caplog.text
