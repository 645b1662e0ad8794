"""Serving on a GPU: onnxruntime's CUDA provider under the engine, against the CPU and PyTorch.

    python -m bench.gpu_serving [--quick | --dry-run] [--out results.json]

Needs a CUDA GPU, torch (to build the 2x512 LSTM with random weights) and an
onnxruntime with the CUDA provider. For each batch size it reports:

- ``ort_cuda_step``: the raw batched step (steps=1) with I/O binding, the state
  kept on the device: the ceiling of the engine on this card;
- ``engine_cuda``: N concurrent streams through the real engine (no gRPC; the
  engine is what the server runs), aggregate characters per second and the
  time to the first character, at the server's default --decode-steps (8);
  ``engine_cuda_k1`` the same at --decode-steps 1 (one character a call), and
  ``engine_cuda_graphs`` at the default with --cuda-graphs on (the plain K-step
  calls captured, decode_graph.BucketDecode; ``cuda_graphs_on`` says whether
  they stayed on, and ``cuda_graphs_why_not`` why not);
- ``torch_eager``: a PyTorch sampling loop over the same batch on the GPU (what
  char-rnn-style scripts do, batched);
- ``ort_cpu_step``: the same raw step on this machine's CPU cores;

and the largest |logits| difference between the CUDA and CPU sessions, and how many of
16 greedy streams give the same text through the engine on both devices. At 1024
and 4096 rows it also times one decode step two ways: the logits brought to the
host and sampled there (the sampler graph on the CPU provider), against the
sampler graph on the device with only ids coming back (``step_ms``). And it counts
how many of 32 seeded streams give a different text among 4,064 other streams
(their own temperatures, top-k, top-p) than alone (``seeded_isolation``): cuBLAS
picks its kernels by shape, so a row's arithmetic may differ with the batch.

``--dry-run`` runs the same code on the CPU with small sizes (no GPU needed), so
that the script is known to work before a GPU machine's minutes are spent.
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

from charrnn.service.core import DECODE_STEPS

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


def _engine_request(prime: str, chars: int, **fields):
    """A validated request for the engine, skipping gRPC (``fields``: temperature, seed, top_k, ...)."""
    from charrnn.modelfile import ModelMetadata
    from testkit.requests import generation_request

    meta = ModelMetadata(vocab=tuple(VOCAB), cell="lstm", layers=1, hidden=1, val_loss=float("nan"), train_steps=0,
                         corpus_sha256="")  # validation reads only the vocabulary
    return generation_request(meta, prime, chars, **fields)


def _request(i: int, prime: str, chars: int, temperature: float):
    """Stream ``i``'s request (its own seed) for the engine."""
    return _engine_request(prime, chars, temperature=temperature, seed=i, request_id=f"bench-{i}")


async def read_stream(engine, i: int, prime: str, chars: int) -> tuple[float, int]:
    """Submits stream ``i`` (its own temperature and seed) and reads it: (time to first char, chars)."""
    req = _request(i, prime, chars, temperature=0.5 + (i % 8) / 10)
    stream = engine.submit(req)
    got = 0
    async for chunk in stream:
        got += len(chunk)
    return stream.first_char_at - req.arrived, got


def step_ms(model, batch: int, seconds: float, on_device: bool) -> float:
    """Milliseconds per decode step at ``batch`` (temperature 0.8, no filters): the sampler on the model's device
    (only ids return), or the logits copied to the host and sampled there."""
    from charrnn.service import sampling

    tokens = np.zeros((batch, 1), np.int64)
    state = model.zero_state(batch)
    temperature = np.full(batch, 0.8, np.float32)
    top_k, top_p = np.zeros(batch, np.int64), np.ones(batch, np.float32)
    seeds = sampling.seed_array(list(range(batch)))
    n, start, warm = 0, time.perf_counter(), False
    while not warm or time.perf_counter() - start < seconds:
        if not warm and n == 3:  # three steps of warm-up, not counted
            n, start, warm = 0, time.perf_counter(), True
        u = sampling.uniforms(seeds, np.full(batch, n)).astype(np.float32)
        if on_device:
            picked, state = model.decode(tokens, state, temperature, top_k, top_p, u)
            tokens = picked.ids
        else:
            logits, state = model.run(tokens, state)
            tokens = sampling.sample(logits[:, -1], temperature, top_k, top_p, u)[:, None]
        n += 1
    return 1000 * (time.perf_counter() - start) / n


async def seeded_isolation(model, targets: int, total: int, chars: int) -> dict:
    """How many of ``targets`` seeded streams differ alone and among ``total`` - ``targets`` others."""
    from charrnn.service.cores import ThreadCore
    from charrnn.service.metrics import Metrics

    mine = [dict(prime=PRIMES[i % 4], temperature=0.9, seed=1000 + i) for i in range(targets)]
    rng = np.random.default_rng(7)
    others = [dict(prime=PRIMES[i % 4], temperature=float(rng.choice([0.0, 0.5, 1.0, 1.3])),
                   top_k=int(rng.choice([0, 0, 5, 40])), top_p=float(rng.choice([0.0, 0.0, 0.9])), seed=i)
              for i in range(total - targets)]
    engine = ThreadCore(model, metrics=Metrics(), max_active=total, max_queue=total)
    engine.start()

    async def text(fields: dict) -> str:
        fields = dict(fields)
        req = _engine_request(fields.pop("prime"), chars, **fields)
        return "".join([chunk async for chunk in engine.submit(req)])

    alone = [await text(f) for f in mine]
    together = await asyncio.gather(*(text(f) for f in mine + others))
    engine.stop(5.0)
    differ = sum(a != b for a, b in zip(alone, together[:targets]))
    return {"targets": targets, "batch": total, "chars": chars, "differ": differ}


async def engine_run(model, streams: int, chars: int, decode_steps: int = DECODE_STEPS,
                     cuda_graphs: bool = False) -> dict:
    from charrnn.service.cores import ThreadCore
    from charrnn.service.metrics import Metrics

    engine = ThreadCore(model, metrics=Metrics(), max_active=streams, max_queue=streams, decode_steps=decode_steps,
                        cuda_graphs=cuda_graphs)
    decoder = engine.core.scheduler.batch.decoder
    engine.start()
    start = time.perf_counter()
    results = await asyncio.gather(*(read_stream(engine, i, PRIMES[i % 4], chars) for i in range(streams)))
    wall = time.perf_counter() - start
    engine.drain()
    engine.stop(5.0)
    ttfc = sorted(r[0] for r in results)
    return {
        "streams": streams,
        **({"cuda_graphs_on": decoder.cuda_graphs, "cuda_graphs_why_not": decoder.bucketed.why_not}
           if cuda_graphs and decoder is not None and decoder.bucketed is not None else {}),
        "chars_per_sec": sum(r[1] for r in results) / wall,
        "ttfc_p50_ms": 1000 * statistics.median(ttfc),
        "ttfc_p99_ms": 1000 * ttfc[min(len(ttfc) - 1, int(0.99 * len(ttfc)))],
    }


async def greedy_texts(model, n: int, chars: int) -> list[str]:
    """Greedy (temperature 0) texts of ``n`` streams through the engine: comparable across devices."""
    from charrnn.service.cores import ThreadCore
    from charrnn.service.metrics import Metrics

    engine = ThreadCore(model, metrics=Metrics(), max_active=n, max_queue=n)
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
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU, small sizes (no GPU)")
    args = p.parse_args()
    batches = (1, 64) if args.quick or args.dry_run else (1, 64, 1024, 4096)
    seconds = 0.5 if args.quick or args.dry_run else 2.0
    chars = 100 if args.quick or args.dry_run else 400

    import onnxruntime as ort

    from charrnn.service.runtime import cuda_unusable_reason, load_model

    report: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    reason = cuda_unusable_reason()
    report["cuda_unusable"] = reason
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        reason = None
    try:
        import torch

        report["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - the card's name is a label
        report["card"] = None
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        build_model(path, args.layers, args.hidden)
        cpu = load_model(path, "bench", 1, "cpu")
        # The dry run takes the device path on the CPU (runtime.py): the CUDA path's code, without a GPU.
        gpu = None if reason else load_model(path, "bench", 1, device, device_path=True)
        if gpu is not None:
            for b in (64, 256) if args.dry_run else (1024, 4096):
                report.setdefault("step_ms", []).append({"batch": b, "host_sampling": step_ms(gpu, b, seconds, False),
                                                         "device_sampler": step_ms(gpu, b, seconds, True)})
                print(json.dumps(report["step_ms"][-1]), flush=True)
            report["seeded_isolation"] = asyncio.run(seeded_isolation(gpu, 8 if args.dry_run else 32,
                                                                      128 if args.dry_run else 4096, chars))
            print("seeded isolation", report["seeded_isolation"], flush=True)
        if gpu is not None:
            rng = np.random.default_rng(1)
            tokens = rng.integers(0, len(VOCAB), (8, 64), dtype=np.int64)
            h = rng.standard_normal((args.layers, 8, args.hidden)).astype(np.float32)
            c = rng.standard_normal((args.layers, 8, args.hidden)).astype(np.float32)
            ref, _ = cpu.run(tokens, (h, c))
            state = tuple(ort.OrtValue.ortvalue_from_numpy(a, device, 0) for a in (h, c))
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
                row.update({f"engine_cuda_k1_{k}": v for k, v in asyncio.run(engine_run(gpu, b, chars, 1)).items()
                            if k != "streams"})
                row.update({f"engine_cuda_graphs_{k}": v for k, v in asyncio.run(
                    engine_run(gpu, b, chars, cuda_graphs=True)).items() if k != "streams"})
            try:
                if args.dry_run:
                    raise RuntimeError("not in a dry run (CUDA only)")
                row["torch_eager_cuda_chars_per_sec"] = torch_eager(args.layers, args.hidden, b, seconds)
            except Exception as e:  # noqa: BLE001 - report, keep measuring the rest
                row["torch_eager_error"] = str(e)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    report["rows"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    cols = ["batch", "ort_cuda_step_chars_per_sec", "engine_cuda_k1_chars_per_sec", "engine_cuda_chars_per_sec",
            "engine_cuda_graphs_chars_per_sec", "engine_cuda_graphs_cuda_graphs_on", "engine_cuda_ttfc_p99_ms",
            "torch_eager_cuda_chars_per_sec", "ort_cpu_step_chars_per_sec"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.0f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols) + " |")
    print("cuda:", "usable" if reason is None else reason, "| parity", report.get("parity_max_abs_logits"),
          "| greedy texts identical", report.get("engine_greedy_texts_identical"), "| card", report.get("card"))
    for r in report.get("step_ms", []):
        print(f"step at B={r['batch']}: host sampling {r['host_sampling']:.3f} ms, device sampler "
              f"{r['device_sampler']:.3f} ms ({r['host_sampling'] / r['device_sampler']:.2f}x)")
    if "seeded_isolation" in report:
        si = report["seeded_isolation"]
        print(f"seeded isolation: {si['differ']}/{si['targets']} streams differ alone vs among {si['batch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
