"""Load generator: N concurrent Generate streams against a running server, timed from the client's side.

Run in its own process (the benchmark starts it with ``python -m bench.loadgen``)
so the client's work does not share an interpreter with the server. Each of the
N workers sends requests back to back, each with its own prime, temperature,
seed and length, for ``--duration`` seconds; the workers start spread over the
first half of the warm-up and their first requests have random lengths, so
arrivals are spread as in steady traffic; what arrives during the first
``--warmup`` seconds is not counted. Prints one JSON object on stdout:

- chars_per_s: characters received in the measured window / its length
- ttfc_p50/p99: from sending a request to its first text (requests sent in the window)
- inter_char_p50/p99: time between characters as a reader sees it: a chunk of k
  characters arriving d seconds after the previous one counts k gaps of d / k
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time

import grpc
import numpy as np

from charrnn.v1 import generator_pb2 as pb
from charrnn.v1 import generator_pb2_grpc

# Speaker names as char-rnn is usually primed (1 to 20 characters); "\n" is the empty prime.
PRIMES = (
    "ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:", "\n", "MENENIUS:", "HAMLET:\nTo be", "All:",
    "LADY CAPULET:", "Second Servingman:", "QUEEN ELIZABETH:", "GLOUCESTER:", "MERCUTIO:\nNay", "BRUTUS:",
)


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    if len(values) == 0:
        return float("nan")
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


class Recorder:
    def __init__(self, start: float, warmup: float, duration: float):
        self.window = (start + warmup, start + duration)
        self.chars = 0  # in the measured window
        self.chars_total = 0  # over the whole run (for CPU per character)
        self.ttfc: list[float] = []
        self.gaps: list[float] = []
        self.gap_weights: list[int] = []
        self.requests = 0
        self.codes: collections.Counter = collections.Counter()

    def measured(self, t: float) -> bool:
        return self.window[0] <= t <= self.window[1]


async def worker(stub, rec: Recorder, index: int, max_chars: int, vocab: set[str] | None, delay: float) -> None:
    rng = random.Random(index)
    primes = [p for p in PRIMES if vocab is None or set(p) <= vocab] or [""]
    await asyncio.sleep(delay)  # workers start spread over the warm-up, not as one burst
    first = True
    while True:
        # The first request of each worker has a random length, so the workers' requests
        # end (and new ones arrive) spread over time from the start, as in steady traffic.
        n = rng.randint(1, max_chars) if first else rng.randint(max_chars // 2, max_chars)
        first = False
        req = pb.GenerateRequest(prime=rng.choice(primes), max_chars=n,
                                 temperature=rng.choice((0.5, 0.7, 0.8, 1.0)), seed=rng.getrandbits(63))
        sent = time.monotonic()
        prev = None
        try:
            async for resp in stub.Generate(req):
                if not resp.text:
                    continue
                now = time.monotonic()
                rec.chars_total += len(resp.text)
                if rec.measured(now):
                    rec.chars += len(resp.text)
                    if prev is None:
                        if sent >= rec.window[0]:
                            rec.ttfc.append(now - sent)
                    else:
                        rec.gaps.append((now - prev) / len(resp.text))
                        rec.gap_weights.append(len(resp.text))
                prev = now
            rec.codes["OK"] += 1
        except grpc.aio.AioRpcError as e:
            rec.codes[e.code().name] += 1
            await asyncio.sleep(0.01)  # an overloaded server is not hammered in a tight loop
        rec.requests += 1


async def run_load(target: str, concurrency: int, duration: float, warmup: float, max_chars: int,
                   vocab: set[str] | None = None, channels: int = 4) -> dict:
    chans = [grpc.aio.insecure_channel(target) for _ in range(max(1, min(channels, concurrency)))]
    for ch in chans:
        await asyncio.wait_for(ch.channel_ready(), 30)
    stubs = [generator_pb2_grpc.GeneratorStub(ch) for ch in chans]
    start = time.monotonic()
    cpu_start = time.process_time()
    rec = Recorder(start, warmup, duration)
    spread = warmup / 2 / concurrency
    tasks = [asyncio.create_task(worker(stubs[i % len(stubs)], rec, i, max_chars, vocab, i * spread))
             for i in range(concurrency)]
    await asyncio.sleep(duration)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in chans:
        await ch.close()
    cpu = time.process_time() - cpu_start
    gaps, weights = np.array(rec.gaps), np.array(rec.gap_weights)
    return {
        "concurrency": concurrency,
        "seconds": duration - warmup,
        "chars_per_s": rec.chars / (duration - warmup),
        "ttfc_p50": float(np.percentile(rec.ttfc, 50)) if rec.ttfc else float("nan"),
        "ttfc_p99": float(np.percentile(rec.ttfc, 99)) if rec.ttfc else float("nan"),
        "ttfc_samples": len(rec.ttfc),
        "inter_char_p50": weighted_quantile(gaps, weights, 0.50),
        "inter_char_p99": weighted_quantile(gaps, weights, 0.99),
        "mean_chunk_chars": float(weights.mean()) if len(weights) else float("nan"),
        "requests": rec.requests,
        "chars_total": rec.chars_total,
        "client_cpu_s": cpu,
        "codes": dict(rec.codes),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="host:port of the server")
    p.add_argument("--concurrency", type=int, required=True, help="concurrent streams")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load, warmup included")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds not counted at the start")
    p.add_argument("--max-chars", type=int, default=400, help="each request asks for max/2..max characters")
    p.add_argument("--vocab", default="", help="characters the model knows (primes outside it are skipped)")
    a = p.parse_args(argv)
    result = asyncio.run(run_load(a.target, a.concurrency, a.duration, a.warmup, a.max_chars, set(a.vocab) or None))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
