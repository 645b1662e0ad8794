"""What the serving numbers are compared with: the raw onnxruntime step, PyTorch eager sampling, the roofline.

- raw ORT: the model's batched step (steps = 1, state fed back) with nothing
  around it: no server, no sampling, no network. The ceiling for the engine.
- PyTorch eager: the classic char-rnn sampling loop (forward one character,
  softmax, multinomial, feed it back) on the same architecture, one stream or a
  batch of them.
- roofline: the machine's measured matrix-multiply rate divided by the model's
  FLOPs per character, the rate the hardware could reach if every step were
  one perfectly efficient GEMM.
"""

from __future__ import annotations

import time

import numpy as np

from charrnn.modelfile import ModelMetadata
from charrnn.service.runtime import load_model


def flops_per_char(meta: ModelMetadata) -> float:
    """Multiply-adds x 2 of one character: every recurrent layer's gates plus the output layer."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[meta.cell]
    total = 0.0
    for layer in range(meta.layers):
        inputs = (meta.embed_dim or meta.hidden) if layer == 0 else meta.hidden
        total += 2 * gates * meta.hidden * (inputs + meta.hidden)
    return total + 2 * meta.hidden * meta.vocab_size


def matmul_flops(seconds: float = 1.0, n: int = 1024) -> float:
    """Best measured float32 GEMM rate of numpy (OpenBLAS/MKL sgemm), FLOP/s."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b  # warm-up: threads started, pages touched
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _timed_steps(step, seconds: float) -> tuple[int, float, float]:
    """Runs step() for about ``seconds`` after a short warm-up; returns (steps, elapsed, CPU seconds)."""
    for _ in range(3):
        step()
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 5:
            return n, elapsed, time.process_time() - cpu


def raw_ort_rate(model_path, batch: int, seconds: float, device: str = "cpu", threads: int = 0) -> tuple[float, float]:
    """(characters per second, CPU microseconds per character) of the bare onnxruntime step at ``batch``.

    The state is fed back as the engine feeds it; nothing else runs.
    """
    model = load_model(model_path, "bench", 1, device, threads)
    holder = {"state": model.zero_state(batch)}
    tokens = np.zeros((batch, 1), np.int64)

    def step():
        _, holder["state"] = model.run(tokens, holder["state"])

    n, elapsed, cpu = _timed_steps(step, seconds)
    return batch * n / elapsed, 1e6 * cpu / (batch * n)


def torch_eager_rate(meta: ModelMetadata, batch: int, seconds: float, device: str = "cpu") -> float:
    """Characters per second of a char-rnn style PyTorch sampling loop (random weights, same sizes)."""
    import torch

    from charrnn.training.model import CharRNN, ModelConfig

    config = ModelConfig(vocab_size=meta.vocab_size, cell=meta.cell, layers=meta.layers, hidden=meta.hidden,
                         embed_dim=meta.embed_dim)
    model = CharRNN(config).eval().to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    holder = {"tok": torch.zeros(batch, 1, dtype=torch.long, device=device), "state": model.init_state(batch, device)}

    @torch.inference_mode()
    def step():
        logits, holder["state"] = model(holder["tok"], holder["state"])  # [B, 1, V]
        probs = torch.softmax(logits[:, -1] / 0.8, dim=-1)
        holder["tok"] = torch.multinomial(probs, 1, generator=gen)  # [B, 1]
        if device == "cuda":
            holder["tok"].cpu()  # a sampler hands each character to the host

    # One intra-op thread is often faster than all of them for small recurrent steps on a
    # busy machine (and far slower for big batches): report the better of the two.
    best, threads = 0.0, torch.get_num_threads()
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        n, elapsed, _ = _timed_steps(step, seconds / 2)
        best = max(best, batch * n / elapsed)
    torch.set_num_threads(threads)
    return best
