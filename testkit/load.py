"""One load loop for every client-side load: N workers, each sending requests back to back over shared channels.

``bench/loadgen.py`` (the serving benchmark's client) and ``testkit/soak.py``
(the reliability soak) differ only in what one request does; this runs them.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Awaitable, Callable

import grpc

from charrnn.v1 import generator_pb2_grpc

# grpc shares one connection among a process's channels to the same target; this gives each its own.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]

# one_request(stub, rng, worker index, request number) -> None
OneRequest = Callable[[generator_pb2_grpc.GeneratorStub, random.Random, int, int], Awaitable[None]]


async def run_workers(
    target: str,
    workers: int,
    seconds: float,
    one_request: OneRequest,
    *,
    channels: int = 4,
    seed: int = 0,
    start_spread: float = 0.0,
    cancel_at_end: bool = False,
) -> None:
    """Runs ``workers`` loops of ``one_request`` for ``seconds``.

    Worker ``i`` has its own ``random.Random`` (from ``seed`` and ``i``), uses
    channel ``i % channels`` and starts ``i * start_spread`` seconds late. At the
    end, requests in flight finish (``cancel_at_end`` False) or are cancelled.
    A ``target`` of "http://host:port" gives each worker an httpx.AsyncClient of that base URL instead of a
    stub (the HTTP front-end).
    """
    count = max(1, min(channels, workers))
    if target.startswith("http://"):
        import httpx

        clients = [httpx.AsyncClient(base_url=target, timeout=None,
                                     limits=httpx.Limits(max_connections=None, max_keepalive_connections=workers))
                   for _ in range(count)]
        chans = []
    else:
        chans = [grpc.aio.insecure_channel(target, OWN_CONNECTION) for _ in range(count)]
        clients = []
    try:
        for ch in chans:
            await asyncio.wait_for(ch.channel_ready(), 30)
        stubs = clients or [generator_pb2_grpc.GeneratorStub(ch) for ch in chans]
        end = time.monotonic() + seconds

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1_000_003 + i)
            await asyncio.sleep(i * start_spread)
            n = 0
            while time.monotonic() < end:
                await one_request(stubs[i % len(stubs)], rng, i, n)
                n += 1

        tasks = [asyncio.create_task(worker(i)) for i in range(workers)]
        if cancel_at_end:
            await asyncio.sleep(seconds)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        else:
            await asyncio.gather(*tasks)
    finally:
        for ch in chans:
            await ch.close()
        for client in clients:
            await client.aclose()
