"""On a CUDA machine: is the provider really used, does the GPU path match the CPU path, how fast is a step.

    python -m bench.gpu_check                      # exits 2, saying why, where CUDA is not usable
    python -m bench.gpu_check --batches 1,64,1024,4096 --out bench/results/gpu_check.json
    python -m bench.gpu_check --device cpu         # the same checks against the CPU itself (a dry run)

1. provider: runtime.select_device("cuda") succeeds and the model's session runs on
   CUDAExecutionProvider with its state held as CUDA OrtValues (I/O binding).
2. parity: one prefill call on random tokens and state, logits and new state against
   the CPU session; then the Engine on both devices over the same seeded and greedy
   requests, texts compared.
3. speed: the bare step with the state on the device (chars/s) at each batch size,
   the CPU step beside it, and the whole Engine (streams read by asyncio) at each size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import baselines
from bench.serving import find_or_make_model
from charrnn.service import runtime
from charrnn.service.engine import Engine
from charrnn.service.metrics import Metrics
from charrnn.service.requests import GenerationRequest, SamplingParams

PRIMES = ("ROMEO:", "JULIET:\nO Romeo", "\n", "First Citizen:\nBefore we proceed")


def requests_for(model, n: int, max_chars: int, greedy_every: int = 2) -> list[GenerationRequest]:
    vocab = model.metadata.vocab
    out = []
    for i in range(n):
        prime = "".join(c for c in PRIMES[i % len(PRIMES)] if c in vocab) or vocab[0]
        temperature = 0.0 if greedy_every and i % greedy_every == 0 else 0.8
        out.append(GenerationRequest(
            request_id=f"gpu-check-{i}", prime=prime, prime_ids=np.array([vocab.index(c) for c in prime], np.int64),
            max_chars=max_chars, sampling=SamplingParams(temperature=temperature, top_k=(0, 20)[i % 2], seed=i),
            arrived=time.monotonic()))
    return out


async def run_engine(model, reqs: list[GenerationRequest], max_active: int) -> tuple[list[str], float]:
    """Texts of ``reqs`` through an Engine, and the characters per second it delivered."""
    engine = Engine(model, metrics=Metrics(), max_active=max_active, max_queue=len(reqs))
    engine.start()

    async def one(r):
        return "".join([c async for c in engine.submit(r)])

    started = time.perf_counter()
    texts = await asyncio.gather(*(one(r) for r in reqs))
    seconds = time.perf_counter() - started
    engine.stop(5.0)
    return texts, sum(map(len, texts)) / seconds


def parity(cpu, dev) -> dict:
    rng = np.random.default_rng(0)
    m = cpu.metadata
    tokens = rng.integers(0, m.vocab_size, size=(4, 20))
    state = tuple(rng.normal(size=(m.layers, 4, m.hidden)).astype(np.float32) for _ in cpu.zero_state(1))
    lc, sc = cpu.run(tokens, state)
    # Through concat and take, so the device-side state operations are part of what is compared.
    on_dev = dev.take(dev.concat([_to_device(dev, state), dev.zero_state(1)]), np.arange(4))
    ld, sd = dev.run(tokens, on_dev)
    return {
        "state_on_device": [type(s).__name__ + ("@" + s.device_name() if hasattr(s, "device_name") else "") for s in sd],
        "max_abs_logits": float(np.abs(ld - lc).max()),
        "max_abs_state": max(float(np.abs(a - b).max()) for a, b in zip(dev.state_numpy(sd), sc)),
    }


def _to_device(model, state):
    """Host arrays -> the model's state representation (OrtValues on CUDA), through zero_state's path."""
    if model.device == "cpu":
        return state
    import onnxruntime as ort

    return tuple(ort.OrtValue.ortvalue_from_numpy(s, "cuda", 0) for s in state)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CUDA checks of the engine (see bench/gpu_check.py).")
    p.add_argument("--model", default="", help="a model.onnx (default: a 2x512 LSTM from models/ or random)")
    p.add_argument("--batches", default="1,64,1024,4096", help="batch sizes to time")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of this script")
    p.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    p.add_argument("--out", default="", help="write the results as JSON here too")
    a = p.parse_args(argv)
    report: dict = {"cuda_unusable_reason": runtime.cuda_unusable_reason()}
    print(f"onnxruntime providers: {__import__('onnxruntime').get_available_providers()}")
    if a.device == "cuda" and report["cuda_unusable_reason"]:
        print(f"CUDA is not usable here: {report['cuda_unusable_reason']}")
        return 2
    device = runtime.select_device(a.device)
    work = Path(tempfile.mkdtemp(prefix="charrnn-gpu-check-"))
    path = Path(a.model) if a.model else find_or_make_model(Path("models"), work)
    cpu = runtime.load_model(path, "check", 1, "cpu")
    dev = runtime.load_model(path, "check", 1, device)
    report["providers"] = dev.session.get_providers()
    report["model"] = f"{cpu.metadata.cell} {cpu.metadata.layers}x{cpu.metadata.hidden}"
    print(f"model {path}: {report['model']}; session providers {report['providers']}")

    report["parity"] = parity(cpu, dev)
    print(f"parity of one call: {report['parity']}")
    reqs = requests_for(cpu, 32, 200)
    cpu_texts, _ = asyncio.run(run_engine(cpu, reqs, 64))
    dev_texts, _ = asyncio.run(run_engine(dev, reqs, 64))
    same = [c == d for c, d in zip(cpu_texts, dev_texts)]
    greedy = [r.sampling.temperature == 0 for r in reqs]
    prefix = [next((i for i, (x, y) in enumerate(zip(c, d)) if x != y), len(c)) for c, d in zip(cpu_texts, dev_texts)]
    report["engine_parity"] = {"streams": len(reqs), "identical": sum(same),
                               "greedy_identical": sum(s for s, g in zip(same, greedy) if g), "greedy": sum(greedy),
                               "shortest_common_prefix": min(prefix)}
    print(f"engine parity, CPU vs {device}: {report['engine_parity']}")

    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        dev_rate, _ = baselines.raw_ort_rate(path, b, a.seconds, device)
        cpu_rate, _ = baselines.raw_ort_rate(path, b, min(a.seconds, 1.0), "cpu") if b <= 1024 else (float("nan"), 0)
        _, engine_rate = asyncio.run(run_engine(dev, requests_for(cpu, b, 100, greedy_every=0), b))
        rows.append({"batch": b, "device_step_chars_per_s": dev_rate, "device_step_ms": 1e3 * b / dev_rate,
                     "cpu_step_chars_per_s": cpu_rate, "engine_chars_per_s": engine_rate})
        print(f"B={b:5d}: {device} step {1e3 * b / dev_rate:8.3f} ms = {dev_rate:12,.0f} chars/s | cpu step "
              f"{cpu_rate:10,.0f} chars/s | engine on {device} {engine_rate:12,.0f} chars/s (100 chars per stream)",
              flush=True)
    report["rows"] = rows
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    ok = report["parity"]["max_abs_logits"] < 1e-3 and report["engine_parity"]["greedy_identical"] >= 0.9 * sum(greedy)
    print("gpu check:", "OK" if ok else "PARITY PROBLEM")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
