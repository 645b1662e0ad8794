"""Each stream's own random numbers, and picking the next character of a batch of rows.

Each stream has its own random generator: SplitMix64 seeded with the stream's
seed. Draw number ``k`` of that generator is a pure function of (seed, k)
(``uniforms``), so the whole batch's draws come from one vectorised call, and a
stream's k-th character sees the same uniform number whether it runs alone or
among hundreds of others. The uniform then picks a character by inverse CDF
over the stream's own filtered distribution (the sampler graph, sampler.py):
the draw consumes exactly one number per character, so nothing another stream
does can shift it.

Every row is computed from its own values alone (a row never takes a
different code path because of another row's parameters), which is what makes
seeded output independent of the batch.
"""

from __future__ import annotations

import functools

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
_ONE, _S11, _S27, _S30, _S31 = (np.uint64(k) for k in (1, 11, 27, 30, 31))


def seed_array(seeds: list[int]) -> np.ndarray:
    """Python ints (any size) -> uint64 [n], taken modulo 2**64."""
    return np.array([s & _MASK64 for s in seeds], dtype=np.uint64)


def uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Draw number ``counters[i]`` (0-based) of SplitMix64(seeds[i]), as float64 in [0, 1).

    seeds uint64 [n], counters int [n] -> float64 [n]. SplitMix64's state after
    k + 1 draws is seed + (k + 1) * golden, so any draw is one mix away.
    """
    # In place on one buffer: this runs every step for the whole batch. Array arithmetic on uint64
    # wraps modulo 2**64 (as SplitMix64 wants) without a warning.
    z = counters.astype(np.uint64)
    z += _ONE
    z *= _GOLDEN
    z += seeds
    z ^= z >> _S30
    z *= _MIX1
    z ^= z >> _S27
    z *= _MIX2
    z ^= z >> _S31
    z >>= _S11
    out = z.astype(np.float64)
    out *= 1.0 / (1 << 53)
    return out


def sample(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    u: np.ndarray,
) -> np.ndarray:
    """Next token of each row, on the CPU, through the one sampler graph (sampler.py).

    logits float32 [n, V]; temperature float [n] (0 = greedy); top_k int [n]
    (0 = off); top_p float [n] in (0, 1] (1 = off); u float [n] in [0, 1),
    each row's own uniform draw. Returns int64 [n].
    """
    return _cpu_sampler().sample(logits, temperature, top_k, top_p, u).ids[:, 0]


@functools.cache
def _cpu_sampler():
    from charrnn.service.sampler import Sampler  # onnxruntime: imported by the callers that sample

    return Sampler()
