"""Serving on a GPU: onnxruntime's CUDA provider under the engine, against the CPU and PyTorch.

    python bench/gpu_serving.py [--quick] [--out results.json]

Needs a CUDA GPU, torch (to build the 2x512 LSTM with random weights) and an
onnxruntime with the CUDA provider. For each batch size it reports:

- ``ort_cuda_step``: the raw batched step (steps=1) with I/O binding, the state
  kept on the device: the ceiling of the engine on this card;
- ``engine_cuda``: N concurrent streams through the real engine (no gRPC; the
  engine is what the server runs), aggregate characters per second and the
  time to the first character;
- ``torch_eager``: a PyTorch sampling loop over the same batch on the GPU (what
  char-rnn-style scripts do, batched);
- ``ort_cpu_step``: the same raw step on this machine's CPU cores;

and the largest |logits| difference between the CUDA and CPU sessions, and how many of
16 greedy streams give the same text through the engine on both devices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny-shakespeare's 65


def build_model(path: Path, layers: int, hidden: int) -> None:
    import torch

    from charrnn.exporter.export import export_model
    from charrnn.training.model import CharRNN, ModelConfig

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=len(VOCAB), layers=layers, hidden=hidden))
    export_model(model, list(VOCAB), path, train_config={"note": "random weights for benchmarking"})


def time_steps(model, batch: int, seconds: float) -> float:
    """Steps per second of the raw batched decode step at ``batch``."""
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), (batch, 1), dtype=np.int64)
    state = model.zero_state(batch)
    for _ in range(3):
        _, state = model.run(tokens, state)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, state = model.run(tokens, state)
        n += 1
    return n / (time.perf_counter() - start)


def torch_eager(layers: int, hidden: int, batch: int, seconds: float) -> float:
    """Characters per second of a batched PyTorch sampling loop on the GPU."""
    import torch

    from charrnn.training.model import CharRNN, ModelConfig

    model = CharRNN(ModelConfig(vocab_size=len(VOCAB), layers=layers, hidden=hidden)).cuda().eval()
    x = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    state = model.init_state(batch, "cuda")
    n = 0
    with torch.inference_mode():
        for _ in range(3):
            logits, state = model(x, state)
        torch.cuda.synchronize()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            logits, state = model(x, state)
            x = torch.multinomial(torch.softmax(logits[:, -1] / 0.8, -1), 1)
            x.cpu()  # each character goes to its client
            n += 1
    return n * batch / (time.perf_counter() - start)


PRIMES = ("ROMEO:\n", "JULIET:\n", "First Citizen:\n", "KING HENRY:\n")  # stream i primes with PRIMES[i % 4]


def _request(i: int, prime: str, chars: int, temperature: float):
    """Stream ``i``'s request (its own seed) for the engine, skipping gRPC."""
    from charrnn.modelfile import ModelMetadata
    from testkit.requests import generation_request

    meta = ModelMetadata(vocab=tuple(VOCAB), cell="lstm", layers=1, hidden=1, val_loss=float("nan"), train_steps=0,
                         corpus_sha256="")  # validation reads only the vocabulary
    return generation_request(meta, prime, chars, temperature=temperature, seed=i, request_id=f"bench-{i}")


async def read_stream(engine, i: int, prime: str, chars: int) -> tuple[float, int]:
    """Submits stream ``i`` (its own temperature and seed) and reads it: (time to first char, chars)."""
    req = _request(i, prime, chars, temperature=0.5 + (i % 8) / 10)
    stream = engine.submit(req)
    got = 0
    async for chunk in stream:
        got += len(chunk)
    return stream.first_char_at - req.arrived, got


async def engine_run(model, streams: int, chars: int) -> dict:
    from charrnn.service.launch import Engine
    from charrnn.service.metrics import Metrics

    engine = Engine(model, metrics=Metrics(), max_active=streams, max_queue=streams)
    engine.start()
    start = time.perf_counter()
    results = await asyncio.gather(*(read_stream(engine, i, PRIMES[i % 4], chars) for i in range(streams)))
    wall = time.perf_counter() - start
    engine.drain()
    engine.stop(5.0)
    ttfc = sorted(r[0] for r in results)
    return {
        "streams": streams,
        "chars_per_sec": sum(r[1] for r in results) / wall,
        "ttfc_p50_ms": 1000 * statistics.median(ttfc),
        "ttfc_p99_ms": 1000 * ttfc[min(len(ttfc) - 1, int(0.99 * len(ttfc)))],
    }


async def greedy_texts(model, n: int, chars: int) -> list[str]:
    """Greedy (temperature 0) texts of ``n`` streams through the engine: comparable across devices."""
    from charrnn.service.launch import Engine
    from charrnn.service.metrics import Metrics

    engine = Engine(model, metrics=Metrics(), max_active=n, max_queue=n)
    engine.start()

    async def one(i: int) -> str:
        req = _request(i, PRIMES[i % 4][: 2 + i % 7], chars, temperature=0.0)
        return "".join([chunk async for chunk in engine.submit(req)])

    texts = await asyncio.gather(*(one(i) for i in range(n)))
    engine.stop(5.0)
    return list(texts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, about 20 seconds")
    p.add_argument("--out", default="bench/results/serving_gpu.json")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()
    batches = (1, 64) if args.quick else (1, 64, 1024, 4096)
    seconds = 0.5 if args.quick else 2.0
    chars = 100 if args.quick else 400

    import onnxruntime as ort

    from charrnn.service.runtime import cuda_unusable_reason, load_model

    report: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    reason = cuda_unusable_reason()
    report["cuda_unusable"] = reason
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        build_model(path, args.layers, args.hidden)
        cpu = load_model(path, "bench", 1, "cpu")
        gpu = None if reason else load_model(path, "bench", 1, "cuda")
        if gpu is not None:
            rng = np.random.default_rng(1)
            tokens = rng.integers(0, len(VOCAB), (8, 64), dtype=np.int64)
            h = rng.standard_normal((args.layers, 8, args.hidden)).astype(np.float32)
            c = rng.standard_normal((args.layers, 8, args.hidden)).astype(np.float32)
            ref, _ = cpu.run(tokens, (h, c))
            state = tuple(ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in (h, c))
            got, _ = gpu.run(tokens, state)
            report["parity_max_abs_logits"] = float(np.abs(got - ref).max())
            # The same greedy streams through the engine on both devices (state gathered and
            # joined on the GPU): how many texts come out identical, character for character.
            on_cpu, on_gpu = (asyncio.run(greedy_texts(m, 16, 200)) for m in (cpu, gpu))
            report["engine_greedy_texts_identical"] = f"{sum(a == b for a, b in zip(on_cpu, on_gpu))}/16"
        for b in batches:
            row: dict = {"batch": b}
            if b <= 64:
                row["ort_cpu_step_chars_per_sec"] = b * time_steps(cpu, b, seconds)
            if gpu is not None:
                row["ort_cuda_step_chars_per_sec"] = b * time_steps(gpu, b, seconds)
                row.update({f"engine_cuda_{k}": v for k, v in asyncio.run(engine_run(gpu, b, chars)).items()
                            if k != "streams"})
            try:
                row["torch_eager_cuda_chars_per_sec"] = torch_eager(args.layers, args.hidden, b, seconds)
            except Exception as e:  # noqa: BLE001 - report, keep measuring the rest
                row["torch_eager_error"] = str(e)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    report["rows"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    cols = ["batch", "ort_cuda_step_chars_per_sec", "engine_cuda_chars_per_sec", "engine_cuda_ttfc_p99_ms",
            "torch_eager_cuda_chars_per_sec", "ort_cpu_step_chars_per_sec"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.0f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols) + " |")
    print("cuda:", "usable" if reason is None else reason, "| parity", report.get("parity_max_abs_logits"),
          "| greedy texts identical", report.get("engine_greedy_texts_identical"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
