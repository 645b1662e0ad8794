"""Soak: many concurrent streams that misbehave the way real clients do, against one `charrnn-serve`.

Each of ``streams`` workers sends Generate requests back to back for the whole
soak. A request is, at random, read to the end, cancelled at a random moment
(possibly before its first character, while it waits for a slot), given a short
deadline, read slowly (a pause between messages), sent on a fresh connection
that is closed afterwards, or ended by a stop sequence. Every outcome is
counted by its status; the server's open descriptors are read from /proc
before (after a warm-up and a pause) and after (once the load stopped and the
server settled), and its stream gauges must return to 0.

Memory is compared under load, not idle: the growth is the median resident
size over the last ``rss_window_s`` seconds of the soak against the median over
its first ``rss_window_s`` seconds (sampled once a second). Idle readings of
the same server, taken after the load settles, move by 2 to 4 MB from one run
to the next (what glibc hands back to the kernel depends on where the last
freed blocks lie), which is 5% of a 110 MB server; both windows carry the same
load, so the memory of requests in flight is on both sides of the comparison.
The idle readings are reported too.
"""

from __future__ import annotations

import asyncio
import collections
import random
import statistics
import time
from dataclasses import asdict, dataclass

import grpc

from charrnn.v1 import generator_pb2 as pb
from charrnn.v1 import generator_pb2_grpc
from testkit import probes
from testkit.load import OWN_CONNECTION, run_workers

PRIME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz ,.:;!?'\n"  # inside testkit.modelfactory's vocabulary
# Fewer slots plus queue places (128 + 64) than streams (256): the queue fills, the limits answer.
SERVER_ARGS = ("--max-active-streams", "128", "--max-queue", "64", "--max-queue-wait", "1")
BEHAVIOURS = ("read", "cancel", "deadline", "slow", "fresh_channel", "stop")


@dataclass
class SoakConfig:
    streams: int = 256  # concurrent client streams
    seconds: float = 30.0  # length of the measured soak
    warmup_seconds: float = 5.0  # load before the starting RSS / descriptor reading
    channels: int = 8  # long-lived client connections the workers share
    weights: tuple = (0.45, 0.15, 0.15, 0.10, 0.05, 0.10)  # share of each of BEHAVIOURS
    max_chars: tuple = (10, 300)  # characters asked per request, uniform in [lo, hi]
    deadline_s: tuple = (0.002, 0.3)  # the short deadlines, seconds, uniform
    cancel_after_s: tuple = (0.0, 0.2)  # when a cancelling client cancels, seconds after sending
    slow_pause_s: tuple = (0.005, 0.05)  # a slow reader's pause between messages, seconds
    settle_s: float = 15.0  # longest wait for gauges and descriptors to return after the load
    rss_window_s: float = 6.0  # the growth compares the median RSS of the first and the last this many seconds
    model: str = "tiny"
    seed: int = 0


@dataclass
class Tally:
    outcomes: collections.Counter
    chars: int = 0
    bad_ok: int = 0  # OK streams without a final message, or with more characters than asked


async def _request(stub, channel_factory, rng: random.Random, cfg: SoakConfig, tally: Tally) -> None:
    behaviour = rng.choices(BEHAVIOURS, cfg.weights)[0]
    max_chars = rng.randint(*cfg.max_chars)
    prime = "".join(rng.choice(PRIME_CHARS) for _ in range(rng.randint(0, 40)))
    req = pb.GenerateRequest(model=cfg.model, prime=prime, max_chars=max_chars, temperature=rng.uniform(0.2, 1.5),
                             seed=rng.getrandbits(63), stop=["e!"] if behaviour == "stop" else [])
    timeout = rng.uniform(*cfg.deadline_s) if behaviour == "deadline" else 60.0
    fresh = await channel_factory() if behaviour == "fresh_channel" else None
    call = (generator_pb2_grpc.GeneratorStub(fresh) if fresh else stub).Generate(req, timeout=timeout)
    timer = None
    if behaviour == "cancel":
        timer = asyncio.get_running_loop().call_later(rng.uniform(*cfg.cancel_after_s), call.cancel)
    got, final = 0, None
    try:
        async for response in call:
            got += len(response.text)
            if response.HasField("stats"):
                final = response
            if behaviour == "slow":
                await asyncio.sleep(rng.uniform(*cfg.slow_pause_s))
        outcome = "OK"
        if final is None or got > max_chars:
            tally.bad_ok += 1
    except asyncio.CancelledError:
        if not call.cancelled() or behaviour != "cancel":
            raise  # not ours: the soak itself is being stopped
        outcome = probes.CLIENT_CANCELLED
    except grpc.RpcError as e:
        outcome = e.code().name
    finally:
        if timer is not None:
            timer.cancel()
        if fresh is not None:
            await fresh.close()
    if behaviour == "cancel" and outcome != probes.CLIENT_CANCELLED and call.cancelled():
        outcome = probes.CLIENT_CANCELLED
    tally.outcomes[outcome] += 1
    tally.chars += got


async def run_load(target: str, cfg: SoakConfig, seconds: float, tally: Tally, seed: int) -> None:
    """``cfg.streams`` workers, each sending requests back to back until ``seconds`` have passed."""

    async def fresh_channel():
        return grpc.aio.insecure_channel(target, OWN_CONNECTION)

    async def one(stub, rng: random.Random, i: int, n: int) -> None:
        await _request(stub, fresh_channel, rng, cfg, tally)

    await run_workers(target, cfg.streams, seconds, one, channels=cfg.channels, seed=seed)


def _reading(pid: int) -> dict:
    return {"rss_bytes": probes.rss_bytes(pid), "fds": probes.open_fds(pid), "threads": probes.threads(pid)}


async def _sample(pid: int, series: list, every: float = 1.0) -> None:
    start = time.monotonic()
    while True:
        series.append({"t": round(time.monotonic() - start, 1), **_reading(pid)})
        await asyncio.sleep(every)


async def soak(target: str, pid: int, metrics_url: str, cfg: SoakConfig) -> dict:
    """Runs warm-up, pause, soak, settle; returns the figures (see the module docstring)."""
    warm = Tally(collections.Counter())
    await run_load(target, cfg, cfg.warmup_seconds, warm, cfg.seed)
    await asyncio.to_thread(probes.wait_streams_idle, metrics_url, cfg.settle_s)
    await asyncio.sleep(1.0)  # connections of the warm-up close, buffers return
    before = _reading(pid)
    names_before = probes.thread_names(pid)
    codes_before = probes.requests_by_code(probes.scrape(metrics_url))

    tally = Tally(collections.Counter())
    series: list[dict] = []
    sampler = asyncio.create_task(_sample(pid, series))
    started = time.monotonic()
    try:
        await run_load(target, cfg, cfg.seconds, tally, cfg.seed + 1)
    finally:
        sampler.cancel()
    elapsed = time.monotonic() - started

    active, queued, idle_s = await asyncio.to_thread(probes.wait_streams_idle, metrics_url, cfg.settle_s)
    fds_end, fds_s = await asyncio.to_thread(probes.wait_at_most, probes.open_fds, pid, before["fds"], cfg.settle_s)
    # The metrics endpoint serves each scrape on a short-lived thread: give the last one time to end.
    threads_end, _ = await asyncio.to_thread(probes.wait_at_most, probes.threads, pid, before["threads"], cfg.settle_s)
    after = _reading(pid)
    loaded = [x for x in series if x["t"] > 0]  # the first sample is taken before the load starts
    first = [x["rss_bytes"] for x in loaded if x["t"] <= cfg.rss_window_s] or [before["rss_bytes"]]
    last = [x["rss_bytes"] for x in loaded if x["t"] >= elapsed - cfg.rss_window_s] or [after["rss_bytes"]]
    rss_start, rss_end = statistics.median(first), statistics.median(last)
    codes_after = probes.requests_by_code(probes.scrape(metrics_url))
    server_codes = {c: n - codes_before.get(c, 0) for c, n in codes_after.items() if n - codes_before.get(c, 0)}
    client_codes = dict(sorted(tally.outcomes.items()))
    return {
        "config": asdict(cfg),
        "soak_seconds": round(elapsed, 1),
        "requests": sum(client_codes.values()),
        "completed_ok": client_codes.get("OK", 0),
        "chars_received": tally.chars,
        "client_codes": client_codes,
        "server_codes": server_codes,
        "undocumented": {c: n for c, n in client_codes.items()
                         if c not in probes.DOCUMENTED | {probes.CLIENT_CANCELLED}},
        "bad_ok_streams": tally.bad_ok,
        "rss_start_bytes": int(rss_start),  # median under load, first rss_window_s
        "rss_end_bytes": int(rss_end),  # median under load, last rss_window_s
        "rss_growth": round(rss_end / rss_start - 1, 4),
        "rss_idle_start_bytes": before["rss_bytes"],
        "rss_idle_end_bytes": after["rss_bytes"],
        "rss_peak_bytes": max((s["rss_bytes"] for s in series), default=after["rss_bytes"]),
        "fds_start": before["fds"],
        "fds_end": fds_end,
        "fds_peak": max((s["fds"] for s in series), default=fds_end),
        "fds_settle_seconds": round(fds_s, 2),
        "threads_start": before["threads"],
        "threads_end": threads_end,
        "thread_names_start": names_before,
        "thread_names_end": probes.thread_names(pid),
        "active_after": active,
        "queued_after": queued,
        "idle_after_seconds": round(idle_s, 2),
        "health_after": probes.health_status(target),
        "series": series,
    }
