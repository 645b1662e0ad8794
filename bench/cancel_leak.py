"""Where the soak's memory growth comes from: resident bytes per cancelled call, charrnn-serve vs bare grpc.aio.

grpc.aio (1.85) leaks a small native buffer for each call that a client
cancels or lets expire while a batch is in flight (grpc/grpc#43360, open; fix
proposed in grpc/grpc#43361). To tell that leak apart from one of our own,
three loads run here, each after a warm-up:

- charrnn-serve, every client cancelling at a random moment (the soak's cancel behaviour only);
- charrnn-serve, only well-behaved clients (read to the end, slow readers, stop sequences);
- a bare grpc.aio server-streaming method with no charrnn code, the same cancelling clients.

    python -m bench.cancel_leak --serve    # the bare server alone (prints its port)
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time

import grpc

from bench import probes
from bench.soak import SERVER_ARGS, SoakConfig, Tally, run_load
from charrnn.v1 import generator_pb2 as pb
from tests.serve_process import ServeProcess

CANCEL_ONLY = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # weights over soak.BEHAVIOURS
WELL_BEHAVED = (0.6, 0.0, 0.0, 0.2, 0.0, 0.2)


def _grow(target: str, pid: int, weights: tuple, seconds: float, warmup: float) -> dict:
    """RSS growth of ``pid`` over ``seconds`` of load, after ``warmup`` seconds of the same load."""
    cfg = SoakConfig(weights=weights)
    asyncio.run(run_load(target, cfg, warmup, Tally(collections.Counter()), 0))
    time.sleep(1.0)
    before = probes.rss_bytes(pid)
    tally = Tally(collections.Counter())
    asyncio.run(run_load(target, cfg, seconds, tally, 1))
    time.sleep(1.0)
    after = probes.rss_bytes(pid)
    cancelled = tally.outcomes.get(probes.CLIENT_CANCELLED, 0) + tally.outcomes.get("DEADLINE_EXCEEDED", 0)
    return {
        "seconds": seconds,
        "calls": sum(tally.outcomes.values()),
        "cancelled_calls": cancelled,
        "rss_start_bytes": before,
        "rss_growth_bytes": after - before,
        "rss_growth": round(after / before - 1, 4),
        "bytes_per_cancelled_call": round((after - before) / cancelled, 1) if cancelled else None,
    }


def measure(models, env: dict, seconds: float, warmup: float) -> dict:
    with ServeProcess(models, *SERVER_ARGS, env=env) as server:
        cancelling = _grow(server.target, server.proc.pid, CANCEL_ONLY, seconds, warmup)
    with ServeProcess(models, *SERVER_ARGS, env=env) as server:
        behaved = _grow(server.target, server.proc.pid, WELL_BEHAVED, seconds, warmup)
    bare = subprocess.Popen([sys.executable, "-m", "bench.cancel_leak", "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        target = f"127.0.0.1:{bare.stdout.readline().strip()}"
        bare_cancelling = _grow(target, bare.pid, CANCEL_ONLY, seconds, warmup)
    finally:
        bare.kill()
        bare.wait()
    return {"charrnn_cancelling": cancelling, "charrnn_well_behaved": behaved, "bare_grpc_cancelling": bare_cancelling}


async def _bare_stream(request: bytes, context) -> None:
    """Some 300 small messages a millisecond apart: long enough for clients to cancel it midway."""
    chunk = pb.GenerateResponse(text="abcd").SerializeToString()
    for _ in range(300):
        yield chunk
        await asyncio.sleep(0.001)


async def _serve_bare() -> None:
    server = grpc.aio.server()
    method = grpc.unary_stream_rpc_method_handler(_bare_stream)  # no deserializers: raw bytes in and out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("charrnn.v1.Generator",
                                                                          {"Generate": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        asyncio.run(_serve_bare())
