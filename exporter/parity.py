"""Parity of an exported graph against the PyTorch model it came from.

Both run the same random token ids from the same random, nonzero initial state
(a zero state would hide a graph that ignores its state inputs). The figures
are the largest absolute differences of the logits and of every state output,
and the error the tolerance applies to: |onnx - torch| / max(1, |torch|),
absolute for values within [-1, 1] (h, most logits) and relative beyond. A
trained LSTM's cell state reaches magnitudes of 100 and more, where float32
rounding alone (one ulp at 100 is 7.6e-6) adds up past any fixed absolute bound.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from charrnn import modelfile as mf
from charrnn.training.model import CharRNN

# (batch, steps) pairs: a single decode step, an odd prefill, and a wider, longer one.
DEFAULT_SHAPES = ((1, 1), (3, 17), (8, 64))


@dataclass(frozen=True)
class ParityResult:
    batch: int
    steps: int
    max_delta_logits: float  # max |onnx - torch| over [B, T, V]
    max_delta_state: float  # max |onnx - torch| over every state output [L, B, H]
    max_error: float  # max |onnx - torch| / max(1, |torch|) over all outputs: what tolerance bounds

    def within(self, tolerance: float) -> bool:
        # Written so that nan (a graph that produced nan) fails.
        return self.max_error <= tolerance

    def describe(self) -> str:
        return (
            f"batch={self.batch} steps={self.steps}: max|d logits|={self.max_delta_logits:.3g}, "
            f"max|d state|={self.max_delta_state:.3g}, error={self.max_error:.3g}"
        )


def cpu_session(path: str | os.PathLike) -> ort.InferenceSession:
    """An onnxruntime session on the CPU: parity is a property of the graph, not of a device."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only; onnxruntime-gpu otherwise logs its CUDA search
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(
    model: CharRNN,
    session: ort.InferenceSession,
    meta: mf.ModelMetadata,
    *,
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES,
    seed: int = 0,
) -> tuple[ParityResult, ...]:
    """Runs ``session`` (see cpu_session) and ``model`` side by side at each (batch, steps) in ``shapes``."""
    names = meta.state_names()
    gen = torch.Generator().manual_seed(seed)
    results = []
    model = model.eval()
    for batch, steps in shapes:
        if batch < 1 or steps < 1:
            raise ValueError(f"parity shapes must have batch >= 1 and steps >= 1, got ({batch}, {steps})")
        tokens = torch.randint(0, meta.vocab_size, (batch, steps), generator=gen)  # [B, T]
        state = tuple(
            0.5 * torch.randn(meta.layers, batch, meta.hidden, generator=gen) for _ in names
        )  # ([L, B, H], ...)
        with torch.no_grad():
            want_logits, want_state = model(tokens, state)
        feeds = {mf.INPUT_TOKENS: tokens.numpy()}
        feeds.update({i: s.numpy() for (i, _), s in zip(names, state)})
        got = session.run([mf.OUTPUT_LOGITS, *(o for _, o in names)], feeds)
        want = [want_logits.numpy(), *(w.numpy() for w in want_state)]
        results.append(
            ParityResult(
                batch=batch,
                steps=steps,
                max_delta_logits=_max_diff(got[0], want[0]),
                max_delta_state=max(_max_diff(g, w) for g, w in zip(got[1:], want[1:])),
                max_error=max(_max_diff(g, w, scaled=True) for g, w in zip(got, want)),
            )
        )
    return tuple(results)


def _max_diff(got: np.ndarray, want: np.ndarray, scaled: bool = False) -> float:
    """max |got - want|, or with ``scaled`` max |got - want| / max(1, |want|); nan if any is nan."""
    if got.shape != want.shape:
        # A shape mismatch is as wrong as a value can be.
        return math.inf
    want = want.astype(np.float64)
    diff = np.abs(got.astype(np.float64) - want)
    if scaled:
        diff /= np.maximum(1.0, np.abs(want))
    return float(np.nan) if np.isnan(diff).any() else float(diff.max(initial=0.0))
