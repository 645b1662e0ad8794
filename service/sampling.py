"""Picking the next character of every stream in a batch at once: temperature, top-k, top-p, seeds.

Each stream has its own random generator: SplitMix64 seeded with the stream's
seed. Draw number ``k`` of that generator is a pure function of (seed, k)
(``uniforms``), so the whole batch's draws come from one vectorised call, and a
stream's k-th character sees the same uniform number whether it runs alone or
among hundreds of others. The uniform then picks a character by inverse CDF
over the stream's own filtered distribution: the draw consumes exactly one
number per character, so nothing another stream does can shift it.

Every row is computed from its own values alone (a row never takes a
different code path because of another row's parameters), which is what makes
seeded output independent of the batch.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def seed_array(seeds: list[int]) -> np.ndarray:
    """Python ints (any size) -> uint64 [n], taken modulo 2**64."""
    return np.array([s & _MASK64 for s in seeds], dtype=np.uint64)


def uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Draw number ``counters[i]`` (0-based) of SplitMix64(seeds[i]), as float64 in [0, 1).

    seeds uint64 [n], counters int [n] -> float64 [n]. SplitMix64's state after
    k + 1 draws is seed + (k + 1) * golden, so any draw is one mix away.
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design
        z = seeds + (counters.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    u: np.ndarray,
) -> np.ndarray:
    """Next token of each row.

    logits float32 [n, V]; temperature float [n] (0 = greedy); top_k int [n]
    (0 = off); top_p float [n] in (0, 1] (1 = off); u float64 [n] in [0, 1),
    each row's own uniform draw. Returns int64 [n].
    """
    n, vocab = logits.shape
    greedy = temperature <= 0
    filtered = ~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))
    plain = ~greedy & ~filtered
    if plain.all():  # the usual batch: every row samples the full vocabulary, no row subsets to copy
        return _sample_plain(logits, temperature, u)
    out = np.empty(n, dtype=np.int64)
    if greedy.any():
        out[greedy] = np.argmax(logits[greedy], axis=1)
    if plain.any():
        out[plain] = _sample_plain(logits[plain], temperature[plain], u[plain])
    if filtered.any():
        out[filtered] = _sample_filtered(logits[filtered], temperature[filtered], top_k[filtered], top_p[filtered], u[filtered])
    return out


def _scaled(logits: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """logits / temperature as a new float32 [m, V] array (float32 keeps numpy's exp and cumsum fast)."""
    return logits.astype(np.float32) / temperature.astype(np.float32)[:, None]


def _softmax_weights(z: np.ndarray, axis: int = 1) -> np.ndarray:
    """Unnormalised softmax along ``axis`` of float32 z, in place (the largest weight of each row is 1)."""
    z -= z.max(axis=axis, keepdims=True)
    return np.exp(z, out=z)


def _pick(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse CDF: the first character whose cumulative weight exceeds u * total. [V, m] -> [m].

    ``weights`` is transposed, one column per row of the batch: the running sum
    then goes down the columns, all rows at once (numpy's cumsum along a row is
    a loop per row), with the same additions in the same order, so the same bits.
    That character always has weight (one without weight repeats the sum before
    it), unless u * total rounds up to the total: then the last one with weight is taken.
    """
    cdf = _running_sum(weights)
    target = (u * cdf[-1]).astype(np.float32)
    pick = np.count_nonzero(cdf <= target, axis=0)
    over = np.flatnonzero(pick >= weights.shape[0])
    if len(over):
        tail = weights[:, over] > 0  # [V, k]
        pick[over] = weights.shape[0] - 1 - np.argmax(tail[::-1], axis=0)
    return pick


def _running_sum(w: np.ndarray) -> np.ndarray:
    """np.cumsum(w, axis=0) of float32 [V, m], bit for bit: each column summed in order, first to last.

    numpy accumulates along the first axis one column at a time (about 1 ms at
    m = 4096, V = 65); past ~128 columns, V vector additions over all columns
    at once are several times faster and do the same additions in the same order.
    """
    if w.shape[1] < 128:
        return np.cumsum(w, axis=0)
    out = np.empty_like(w)
    out[0] = w[0]
    for i in range(1, len(w)):
        np.add(out[i - 1], w[i], out=out[i])
    return out


def _sample_plain(logits: np.ndarray, temperature: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Full-vocabulary sampling at a temperature, in vocabulary order.

    Works on the transposed logits [V, m]: the copy that scaling needs anyway
    also turns them, so the max, the running sum and the count run across rows.
    """
    zt = np.empty(logits.shape[::-1], np.float32)  # [V, m]
    np.divide(logits.T, temperature.astype(np.float32), out=zt)
    return _pick(_softmax_weights(zt, axis=0), u)


def _sample_filtered(
    logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """Top-k then top-p over the characters sorted by probability (ties: lower index first)."""
    z = _scaled(logits, temperature)
    order = np.argsort(-z, axis=1, kind="stable")  # [m, V], most likely first
    w = _softmax_weights(np.take_along_axis(z, order, axis=1))
    rank = np.arange(z.shape[1])[None, :]
    k = np.where(top_k > 0, top_k, z.shape[1])
    w[rank >= k[:, None]] = 0.0
    # Nucleus: keep the most likely characters until their mass reaches top_p
    # (the first character is always kept: the mass before it is 0 < top_p).
    p = w / w.sum(axis=1, keepdims=True)
    mass_before = np.cumsum(p, axis=1) - p
    w[mass_before >= top_p.astype(np.float32)[:, None]] = 0.0
    pick = _pick(np.ascontiguousarray(w.T), u)
    return order[np.arange(len(pick)), pick]
