"""Where the soak's memory growth comes from: resident bytes per cancelled call, charrnn-serve vs bare grpc.aio.

grpc.aio (1.85) leaks a small native buffer for each call that a client
cancels or lets expire while a batch is in flight (grpc/grpc#43360, open; fix
proposed in grpc/grpc#43361). To tell that leak apart from one of our own,
three loads run here, each after a warm-up:

- charrnn-serve, every client cancelling at a random moment (the soak's cancel behaviour only);
- charrnn-serve, only well-behaved clients (read to the end, slow readers, stop sequences);
- a bare grpc.aio server-streaming method with no charrnn code, the same cancelling clients,
  written three ways: an async generator (as charrnn's servicer is), ``await context.write()``,
  and ``context.write()`` under ``asyncio.shield`` (so that a cancel never interrupts a write).

The last two show that no handler style avoids the leak: the batch leaks when
it fails (the client has gone), not only when its awaiter is cancelled.

    python -m bench.cancel_leak --serve [generator|writer|shielded]   # a bare server alone (prints its port)
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time

import grpc

from testkit import probes
from testkit.soak import SERVER_ARGS, SoakConfig, Tally, run_load
from charrnn.v1 import generator_pb2 as pb
from testkit.serve_process import ServeProcess

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
    figures = {"charrnn_cancelling": cancelling, "charrnn_well_behaved": behaved}
    for style, key in (("generator", "bare_grpc_cancelling"), ("writer", "bare_grpc_writer_cancelling"),
                       ("shielded", "bare_grpc_shielded_cancelling")):
        bare = subprocess.Popen([sys.executable, "-m", "bench.cancel_leak", "--serve", style],
                                stdout=subprocess.PIPE, text=True)
        try:
            target = f"127.0.0.1:{bare.stdout.readline().strip()}"
            figures[key] = _grow(target, bare.pid, CANCEL_ONLY, seconds, warmup)
        finally:
            bare.kill()
            bare.wait()
    return figures


CHUNK = pb.GenerateResponse(text="abcd").SerializeToString()
MESSAGES = 300  # a millisecond apart: long enough for clients to cancel a call midway


async def _bare_generator(request: bytes, context):
    for _ in range(MESSAGES):
        yield CHUNK
        await asyncio.sleep(0.001)


async def _bare_writer(request: bytes, context) -> None:
    for _ in range(MESSAGES):
        await context.write(CHUNK)
        await asyncio.sleep(0.001)


async def _bare_shielded(request: bytes, context) -> None:
    for _ in range(MESSAGES):
        # The write runs to its end even when the call's task is cancelled; a failed write's
        # error is read here so that it is not reported as never retrieved.
        write = asyncio.ensure_future(context.write(CHUNK))
        write.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(write)
        await asyncio.sleep(0.001)


BARE_STYLES = {"generator": _bare_generator, "writer": _bare_writer, "shielded": _bare_shielded}


async def _serve_bare(style: str) -> None:
    server = grpc.aio.server()
    method = grpc.unary_stream_rpc_method_handler(BARE_STYLES[style])  # no deserializers: raw bytes in and out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("charrnn.v1.Generator",
                                                                          {"Generate": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(_serve_bare(sys.argv[2] if len(sys.argv) > 2 else "generator"))
