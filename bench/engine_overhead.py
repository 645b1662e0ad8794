"""What the engine costs around the model: its chars/s against the bare decode step, on a tiny model.

    python -m bench.engine_overhead [--batches 64,256,1024,4096] [--chars 200] [--no-profile]

On a GPU the decode step of a 2x512 LSTM takes well under a millisecond even
at batch 4096, so the engine's own per-step work in Python (sampling, one
bookkeeping call per stream, stop checks, metrics, waking the readers) decides
its throughput. A 1x32 LSTM on the CPU is the same situation on any machine:
its step is cheap next to the per-stream work. For each batch size this runs,
in one process and one after the other:

- the raw step: ``LoadedModel.run`` at batch N, tokens [N, 1], state fed
  back, nothing around it (the ceiling);
- the engine: N concurrent streams through ``Engine`` directly, no gRPC
  (as ``bench/gpu_serving.py`` does on the GPU), each stream one of four
  speaker-name primes, its own temperature and seed, ``--chars`` characters.

It prints a markdown table: chars/s of both, their ratio, CPU microseconds per
character (the whole process, and the engine thread alone; steadier than
chars/s on a shared machine), time to first character, and then cProfile's top
functions by cumulative time inside the engine thread at the largest batch (a
separate run, so profiling does not slow the timed one).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.gpu_serving import PRIMES, VOCAB, build_model, read_stream


def raw_step(model, batch: int, seconds: float) -> dict:
    """chars/s and process CPU µs per character of the bare decode step at ``batch``."""
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), (batch, 1), dtype=np.int64)
    state = model.zero_state(batch)
    for _ in range(3):
        _, state = model.run(tokens, state)
    n, cpu0, start = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, state = model.run(tokens, state)
        n += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {"chars_per_sec": n * batch / wall, "cpu_us_per_char": 1e6 * cpu / (n * batch)}


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds a live thread has used."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


async def engine_run(model, streams: int, chars: int, profile: cProfile.Profile | None = None) -> dict:
    """``streams`` concurrent requests of ``chars`` characters each through a fresh Engine."""
    from charrnn.service.cores import ThreadCore
    from charrnn.service.metrics import Metrics

    engine = ThreadCore(model, metrics=Metrics(), max_active=streams, max_queue=streams)
    if profile is not None:
        run = engine._run

        def profiled(on_failure) -> None:  # the engine thread's own body (cores.ThreadCore._run), under the profiler
            profile.runcall(run, on_failure)

        engine._run = profiled
    engine.start()
    cpu0, thread0 = time.process_time(), thread_cpu(engine._thread)
    start = time.perf_counter()
    results = await asyncio.gather(
        *(read_stream(engine, i, PRIMES[i % len(PRIMES)], chars) for i in range(streams))
    )
    wall = time.perf_counter() - start
    cpu, thread = time.process_time() - cpu0, thread_cpu(engine._thread) - thread0
    engine.drain()
    engine.stop(5.0)
    total = sum(r[1] for r in results)
    ttfc = sorted(r[0] for r in results)
    return {
        "chars_per_sec": total / wall,
        "cpu_us_per_char": 1e6 * cpu / total,
        "thread_us_per_char": 1e6 * thread / total,
        "ttfc_p50_ms": 1000 * statistics.median(ttfc),
        "ttfc_p99_ms": 1000 * ttfc[min(len(ttfc) - 1, int(0.99 * len(ttfc)))],
    }


def profile_table(profile: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs().sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="64,256,1024,4096", help="comma-separated stream counts")
    p.add_argument("--chars", type=int, default=200, help="characters per stream")
    p.add_argument("--seconds", type=float, default=1.0, help="timing of each raw step point")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: steadier)")
    p.add_argument("--top", type=int, default=25, help="profile lines")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from charrnn.service.runtime import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        build_model(path, args.layers, args.hidden)
        model = load_model(path, "bench", 1, "cpu", threads=args.threads)
        rows = []
        for b in batches:
            raw = raw_step(model, b, args.seconds)
            eng = asyncio.run(engine_run(model, b, args.chars))
            rows.append((b, raw, eng))
            print(f"# batch {b}: raw {raw['chars_per_sec']:,.0f} chars/s, engine {eng['chars_per_sec']:,.0f}",
                  file=sys.stderr, flush=True)
        profile = None
        if not args.no_profile:
            profile = cProfile.Profile()
            asyncio.run(engine_run(model, batches[-1], args.chars, profile))

    print(f"{args.layers}x{args.hidden} LSTM, {len(VOCAB)} characters, CPU, onnxruntime threads {args.threads}, "
          f"{args.chars} characters per stream\n")
    print("| streams | raw step chars/s | engine chars/s | engine / raw | CPU µs/char: raw | engine (process) "
          "| engine thread | TTFC p50 / p99 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b, raw, eng in rows:
        print(f"| {b} | {raw['chars_per_sec']:,.0f} | {eng['chars_per_sec']:,.0f} "
              f"| {eng['chars_per_sec'] / raw['chars_per_sec']:.0%} | {raw['cpu_us_per_char']:.2f} "
              f"| {eng['cpu_us_per_char']:.2f} | {eng['thread_us_per_char']:.2f} "
              f"| {eng['ttfc_p50_ms']:.1f} / {eng['ttfc_p99_ms']:.1f} |")
    if profile is not None:
        print(f"\nEngine thread at {batches[-1]} streams, cProfile, top {args.top} by cumulative time:\n")
        print("```")
        print(profile_table(profile, args.top).strip())
        print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
