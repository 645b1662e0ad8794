"""The HTTP front-end (OpenAI Completions, Server-Sent Events) against gRPC, on one real charrnn-serve.

    python -m bench.http_vs_grpc                      # 1 and 128 streams; about 3 minutes on 2 cores
    python -m bench.http_vs_grpc --streams 1,32 --duration 6
    OTEL_EXPORTER_OTLP_ENDPOINT=... python -m bench.http_vs_grpc --tracing   # also a traced server

Serves one 2x512 LSTM (bench/serving.py finds or makes it) with --http-port on,
then drives the same server with the load generator (bench/loadgen.py, its own
processes) over gRPC and over HTTP in turn, at each concurrency, for
``--rounds`` interleaved rounds, keeping each row's best. The requests are the
same (prime, length, temperature, seed); the HTTP client is httpx reading the
SSE body line by line. Reports time to first character (p50, p99), chars/s,
and the server's and the client's CPU per character; HTTP rows are divided by
the gRPC row of the same concurrency. With ``--tracing`` a second server runs
with OpenTelemetry spans exported to an OTLP receiver started here, and its gRPC
row is divided by the untraced one's.

Writes bench/results/http_vs_grpc.md and http_vs_grpc.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

from bench import serving

RESULTS = Path(__file__).parent / "results"


def _receiver():
    """An OTLP/gRPC trace receiver that counts the spans it is sent (opentelemetry-proto's TraceService)."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Counter(trace_service_pb2_grpc.TraceServiceServicer):
        spans = 0

        def Export(self, request, context):
            Counter.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Counter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, Counter, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="HTTP (SSE) against gRPC on one server (see bench/http_vs_grpc.py).")
    p.add_argument("--streams", default="1,128", help="comma-separated concurrent stream counts")
    p.add_argument("--duration", type=float, default=8, help="seconds of load per point")
    p.add_argument("--warmup", type=float, default=2, help="seconds of each point not counted")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all rows; the best of each row is kept")
    p.add_argument("--max-chars", type=int, default=400, help="longest request, characters")
    p.add_argument("--tracing", action="store_true", help="also a server with OpenTelemetry spans on")
    p.add_argument("--model", default="", help="serve this 2x512 model file (default: found or made)")
    p.add_argument("--out", default=str(RESULTS), help="folder for http_vs_grpc.md and .json")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.streams.split(",")]

    work = Path(tempfile.mkdtemp(prefix="charrnn-http-bench-"))
    repo = serving.one_model_repo(work, a.model)
    servers = {"plain": serving.ServerProcess(repo, True, "cpu", 2 * max(levels), 0, name="plain",
                                              extra=("--http-port", "0"))}
    receiver = None
    if a.tracing:
        receiver, counter, endpoint = _receiver()
        saved = dict(os.environ)
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"})
        try:
            servers["traced"] = serving.ServerProcess(repo, True, "cpu", 2 * max(levels), 0, name="traced",
                                                      extra=("--http-port", "0"))
        finally:
            os.environ.clear()
            os.environ.update(saved)
    rows = [(c, name, transport) for c in levels for name in servers for transport in ("grpc", "http")
            if name == "plain" or transport == "grpc"]
    best: dict[tuple, dict] = {}
    try:
        for rnd in range(a.rounds):
            for c, name, transport in rows:
                r = serving.load(servers[name], c, a.duration, a.warmup, a.max_chars, serving.VOCAB_65,
                                 http=transport == "http")
                bad = {k: v for k, v in r["codes"].items() if k != "OK"}
                if bad:
                    raise RuntimeError(f"{c} streams {name} {transport}: requests failed: {bad}")
                print(f"round {rnd + 1} {c:4d} streams {name:>6} {transport:>4}: {r['chars_per_s']:>9,.0f} chars/s "
                      f"TTFC p50 {1e3 * r['ttfc_p50']:.1f} ms p99 {1e3 * r['ttfc_p99']:.1f} ms", flush=True)
                key = (c, name, transport)
                if key not in best or r["chars_per_s"] > best[key]["chars_per_s"]:
                    best[key] = r
    finally:
        for s in servers.values():
            s.stop()
        if receiver is not None:
            receiver.stop(None)
    out_rows = []
    for c, name, transport in rows:
        r, base = best[(c, name, transport)], best[(c, "plain", "grpc")]
        out_rows.append({"streams": c, "server": name, "transport": transport, **r,
                         "vs_grpc": r["chars_per_s"] / base["chars_per_s"],
                         "ttfc_p50_vs_grpc": r["ttfc_p50"] / base["ttfc_p50"]})
    report = {
        "command": "python -m bench.http_vs_grpc " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "date": time.strftime("%Y-%m-%d"), "duration": a.duration, "warmup": a.warmup, "rounds": a.rounds,
        "spans_received": counter.spans if receiver is not None else None, "rows": out_rows,
    }
    serving.write_report(Path(a.out), "http_vs_grpc", report, markdown(report))
    return 0


def markdown(r: dict) -> str:
    lines = ["# HTTP (SSE) against gRPC", "",
             f"`{r['command']}` on {r['machine']}, {r['date']}: a 2x512 LSTM on the CPU, {r['duration']:g} s of load "
             f"per point (first {r['warmup']:g} s not counted), best of {r['rounds']} interleaved rounds; the same "
             "requests over each transport. Ratios divide by the untraced server's gRPC row at the same concurrency.",
             ""]
    if r["spans_received"] is not None:
        lines += [f"The traced server exported {r['spans_received']:,} spans to the OTLP receiver.", ""]
    lines += ["| streams | server | transport | chars/s | / gRPC | TTFC p50 ms | TTFC p99 ms | TTFC p50 / gRPC "
              "| server CPU µs/char | client CPU µs/char |",
              "| ---: | :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {row['streams']} | {row['server']} | {row['transport']} | {row['chars_per_s']:,.0f} "
                     f"| {row['vs_grpc']:.2f}x | {1e3 * row['ttfc_p50']:.1f} | {1e3 * row['ttfc_p99']:.1f} "
                     f"| {row['ttfc_p50_vs_grpc']:.2f}x | {row['server_cpu_us_per_char']:.0f} "
                     f"| {row['client_cpu_us_per_char']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
