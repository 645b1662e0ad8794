"""Memory stays flat when every request brings its own stop set or regex.

Callers commonly send one stop set each, or one regex per form field, so a
server sees a new automaton with most requests. The core keeps the automata
of its rows in tables (service/automata.py) and must drop those no row uses
any more; the front-end's compiled-regex cache is bounded too. 5,000 requests
through a real server, each with a stop set or a regex of its own, 32 at a
time: the resident memory of all the server's processes (front-end and engine
core) after the last must be within 5% of what it was after the first 1,000.
Before the tables dropped their automata, the same load grew it by about
14 KB a request, 30% over this test's 4,000.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import grpc
import pytest

from charrnn.v1 import generator_pb2 as pb
from charrnn.v1 import generator_pb2_grpc
from testkit import probes
from testkit.serve_process import ServeProcess

pytestmark = pytest.mark.slow

REQUESTS = 5000
BASELINE_AFTER = 1000
CONCURRENCY = 32
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# RSS is read after each request of these windows (first request: length), 32 streams in flight at both:
# the median of the first window against the median of the last.
WINDOWS = {BASELINE_AFTER: 100, REQUESTS - 200: 100}


def own_controls(i: int) -> dict:
    """Request i's stop set or regex: no two requests share one."""
    rng = random.Random(i)
    if i % 2:
        word = "".join(rng.choice(LETTERS) for _ in range(6))
        return {"stop": [word, word[::-1] + str(i % 10), f"{i:05d}"]}
    a, b, c = rng.sample(LETTERS, 3)
    return {"regex": f"[{a}{b}{c} ]{{1,{10 + i % 40}}}(x|{a}{i % 97:02d})"}


def server_rss(pid: int) -> int:
    """Resident bytes of the server and all its child processes."""
    total = probes.rss_bytes(pid)
    for child in probes.children(pid):
        try:
            total += probes.rss_bytes(child)
        except (OSError, RuntimeError):  # gone while we looked
            pass
    return total


async def _load(target: str, pid: int) -> dict:
    readings: dict[int, list[int]] = {}
    codes: dict[str, int] = {}
    done = 0
    queue = iter(range(REQUESTS))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)

        async def worker():
            nonlocal done
            for i in queue:
                request = pb.GenerateRequest(model="tiny", prime="A", max_chars=24, seed=i, **own_controls(i))
                try:
                    async for _ in stub.Generate(request, timeout=60):
                        pass
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] = codes.get(e.code().name, 0) + 1
                done += 1
                for start, window in WINDOWS.items():  # read under the same load at both ends
                    if start <= done < start + window:
                        readings.setdefault(start, []).append(server_rss(pid))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return {"codes": codes, "readings": readings}


@pytest.fixture(scope="module")
def report(model_repo, no_torch_env):
    with ServeProcess(model_repo, env=no_torch_env) as server:
        started = time.monotonic()
        figures = asyncio.run(_load(server.target, server.proc.pid))
        figures["seconds"] = time.monotonic() - started
        figures["log"] = server.log()
        yield figures


def test_every_request_was_answered(report):
    assert report["codes"] == {"OK": REQUESTS}, report["codes"]
    assert "Traceback" not in report["log"]


def test_memory_after_5000_own_stop_sets_and_regexes_is_within_5_percent_of_after_1000(report):
    first = statistics.median(report["readings"][BASELINE_AFTER])
    last = statistics.median(report["readings"][REQUESTS - 200])
    growth = (last - first) / first
    assert growth < 0.05, (f"{first / 1e6:.1f} MB after {BASELINE_AFTER} requests, {last / 1e6:.1f} MB after "
                           f"{REQUESTS}: {growth:.1%} ({(last - first) / (REQUESTS - BASELINE_AFTER):.0f} bytes a request)")
