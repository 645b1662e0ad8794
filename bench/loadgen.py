"""Load generator: N concurrent Generate streams against a running server, timed from the client's side.

Run in its own process (the benchmark starts it with ``python -m bench.loadgen``)
so the client's work does not share an interpreter with the server. Each of the
N workers sends requests back to back, each with its own prime, temperature,
seed and length, for ``--duration`` seconds; the workers start spread over the
first half of the warm-up and their first requests have random lengths, so
arrivals are spread as in steady traffic; what arrives during the first
``--warmup`` seconds is not counted. ``--processes N`` splits the streams over N
client processes (each its own interpreter and event loop), so that the client's
CPU does not cap what it measures. Prints one JSON object on stdout:

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
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np

from charrnn.v1 import generator_pb2 as pb
from testkit.load import run_workers

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


class HttpRefused(Exception):
    def __init__(self, code: str):
        self.code = code


async def _texts(stub, req: pb.GenerateRequest):
    async for resp in stub.Generate(req):
        if resp.text:
            yield resp.text


# GenerateRequest field -> the OpenAI Completions field the HTTP front-end reads it from
HTTP_FIELD = {"prime": "prompt", "max_chars": "max_tokens"}


async def _sse_texts(client, req: pb.GenerateRequest):
    """The same request over POST /v1/completions with stream: the text of each Server-Sent Event."""
    body = {HTTP_FIELD.get(f.name, f.name): v for f, v in req.ListFields()}
    body["stream"] = True
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise HttpRefused(r.json()["error"]["code"])
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise HttpRefused(event["error"]["code"])
                text = event["choices"][0]["text"]
                if text:
                    yield text


def _one_request(rec: Recorder, max_chars: int, vocab: set[str] | None, controls: dict | None = None):
    """What one worker does per request: its own prime, temperature, seed and length (and ``controls``:
    more GenerateRequest fields, the same for every request, e.g. {"logprobs": 5, "regex": "..."})."""
    primes = [p for p in PRIMES if vocab is None or set(p) <= vocab] or [""]

    async def one(stub, rng: random.Random, index: int, n: int) -> None:
        # The first request of each worker has a random length, so the workers' requests
        # end (and new ones arrive) spread over time from the start, as in steady traffic.
        chars = rng.randint(1, max_chars) if n == 0 else rng.randint(max_chars // 2, max_chars)
        req = pb.GenerateRequest(prime=rng.choice(primes), max_chars=chars,
                                 temperature=rng.choice((0.5, 0.7, 0.8, 1.0)), seed=rng.getrandbits(63),
                                 **(controls or {}))
        sent = time.monotonic()
        prev = None
        try:
            async for text in (_sse_texts(stub, req) if isinstance(stub, httpx.AsyncClient) else _texts(stub, req)):
                now = time.monotonic()
                rec.chars_total += len(text)
                if rec.measured(now):
                    rec.chars += len(text)
                    if prev is None:
                        if sent >= rec.window[0]:
                            rec.ttfc.append(now - sent)
                    else:
                        rec.gaps.append((now - prev) / len(text))
                        rec.gap_weights.append(len(text))
                prev = now
            rec.codes["OK"] += 1
        except grpc.aio.AioRpcError as e:
            rec.codes[e.code().name] += 1
            await asyncio.sleep(0.01)  # an overloaded server is not hammered in a tight loop
        except HttpRefused as e:
            rec.codes[e.code] += 1
            await asyncio.sleep(0.01)
        rec.requests += 1

    return one


async def run_load(target: str, concurrency: int, duration: float, warmup: float, max_chars: int,
                   vocab: set[str] | None = None, channels: int = 4, seed: int = 0,
                   controls: dict | None = None) -> dict:
    """One process's share of the load; returns its raw samples (see ``summary``)."""
    start = time.monotonic()
    cpu_start = time.process_time()
    rec = Recorder(start, warmup, duration)
    # Workers start spread over the first half of the warm-up, not as one burst.
    await run_workers(target, concurrency, duration, _one_request(rec, max_chars, vocab, controls), channels=channels,
                      seed=seed, start_spread=warmup / 2 / concurrency, cancel_at_end=True)
    return {
        "concurrency": concurrency,
        "seconds": duration - warmup,
        "chars": rec.chars,
        "ttfc": rec.ttfc,
        "gaps": rec.gaps,
        "gap_weights": rec.gap_weights,
        "requests": rec.requests,
        "chars_total": rec.chars_total,
        "client_cpu_s": time.process_time() - cpu_start,
        "codes": dict(rec.codes),
    }


def summary(parts: list[dict]) -> dict:
    """The figures of the whole load from each process's raw samples."""
    seconds = parts[0]["seconds"]
    ttfc = [t for p in parts for t in p["ttfc"]]
    gaps = np.array([g for p in parts for g in p["gaps"]])
    weights = np.array([w for p in parts for w in p["gap_weights"]])
    codes: collections.Counter = collections.Counter()
    for p in parts:
        codes.update(p["codes"])
    return {
        "concurrency": sum(p["concurrency"] for p in parts),
        "processes": len(parts),
        "seconds": seconds,
        "chars_per_s": sum(p["chars"] for p in parts) / seconds,
        "ttfc_p50": float(np.percentile(ttfc, 50)) if ttfc else float("nan"),
        "ttfc_p99": float(np.percentile(ttfc, 99)) if ttfc else float("nan"),
        "ttfc_samples": len(ttfc),
        "inter_char_p50": weighted_quantile(gaps, weights, 0.50),
        "inter_char_p99": weighted_quantile(gaps, weights, 0.99),
        "mean_chunk_chars": float(weights.mean()) if len(weights) else float("nan"),
        "requests": sum(p["requests"] for p in parts),
        "chars_total": sum(p["chars_total"] for p in parts),
        "client_cpu_s": sum(p["client_cpu_s"] for p in parts),
        "codes": dict(codes),
    }


def _child(args: argparse.Namespace, concurrency: int, seed: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.loadgen", "--target", args.target, "--concurrency", str(concurrency),
           "--duration", str(args.duration), "--warmup", str(args.warmup), "--max-chars", str(args.max_chars),
           "--vocab", args.vocab, "--seed", str(seed), "--controls", args.controls, "--raw"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True,
                   help="host:port of the server's gRPC port, or http://host:port of its HTTP port (SSE streams)")
    p.add_argument("--concurrency", type=int, required=True, help="concurrent streams")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load, warmup included")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds not counted at the start")
    p.add_argument("--max-chars", type=int, default=400, help="each request asks for max/2..max characters")
    p.add_argument("--vocab", default="", help="characters the model knows (primes outside it are skipped)")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the streams, so the client does not measure itself")
    p.add_argument("--controls", default="", help='more GenerateRequest fields as JSON, e.g. \'{"logprobs": 5}\'')
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # a child: print raw samples
    a = p.parse_args(argv)
    if a.processes > 1:
        shares = [a.concurrency // a.processes + (i < a.concurrency % a.processes) for i in range(a.processes)]
        children = [_child(a, n, seed=i + 1) for i, n in enumerate(shares) if n]
        parts = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
        if any(c.returncode for c in children):
            print("a load generator process failed", file=sys.stderr)
            return 1
    else:
        parts = [asyncio.run(run_load(a.target, a.concurrency, a.duration, a.warmup, a.max_chars,
                                      set(a.vocab) or None, seed=a.seed,
                                      controls=json.loads(a.controls) if a.controls else None))]
    json.dump(parts[0] if a.raw else summary(parts), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
