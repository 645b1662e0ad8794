"""Samples from one prime at several temperatures, to see what temperature does to the text.

All temperatures run together as one batch (one lane each, steps = 1 per
character), and every lane draws from its own generator seeded with the same
seed, so the only difference between two lanes is their temperature and the
whole sweep repeats exactly for a given seed. The draws are the service's own
(``charrnn.service.sampling``: the k-th character of a stream uses draw k of
its seed's generator), so a lane is the text a seeded ``Generate`` request
with the same prime and temperature asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from charrnn import modelfile as mf
from charrnn.inspector.trace import InspectedModel, InspectError, encode, zero_state
from charrnn.service import sampling

MAX_CHARS = 100_000  # characters per sample


@dataclass(frozen=True)
class Sample:
    temperature: float  # 0 means greedy
    text: str  # the generated characters, without the prime


def parse_temperatures(raw: str) -> tuple[float, ...]:
    """"0.2,0.5,1" -> (0.2, 0.5, 1.0); each must be a finite number in [0, 100]."""
    values = []
    for part in raw.split(","):
        try:
            t = float(part)
        except ValueError:
            raise InspectError(f"--temperatures must be numbers separated by commas, got {raw!r}") from None
        if not (math.isfinite(t) and 0 <= t <= 100):
            raise InspectError(f"--temperatures must each be in [0, 100] (0 = greedy), got {part.strip()!r}")
        values.append(t)
    return tuple(values)


def sweep(
    model: InspectedModel, prime: str, temperatures: tuple[float, ...], *, seed: int = 0, chars: int = 300
) -> tuple[Sample, ...]:
    """One sample of ``chars`` characters after ``prime`` per temperature ("" reads what the service reads for it)."""
    if not temperatures:
        raise InspectError("--temperatures must name at least one temperature, got none")
    if not 1 <= chars <= MAX_CHARS:
        raise InspectError(f"--chars must be in [1, {MAX_CHARS}], got {chars}")
    if not 0 <= seed < 2**64:
        raise InspectError(f"--seed must be in [0, 2**64), got {seed}")
    meta = model.meta
    # An empty prime reads the same start token as the service (ModelMetadata.encode).
    prime_ids = encode(prime, meta, what="--prime")[1] if prime else np.array(meta.encode(""), np.int64)
    B = len(temperatures)
    feeds = zero_state(meta, B)
    out_names = [mf.OUTPUT_LOGITS, *(o for _, o in meta.state_names())]
    seeds = sampling.seed_array([seed] * B)  # uint64 [B]
    temps = np.array(temperatures, np.float64)  # [B]
    top_k, top_p = np.zeros(B, np.int64), np.ones(B)  # both off: temperature alone shapes the draw
    tokens = np.tile(prime_ids, (B, 1))  # [B, len(prime)]: the prime in one call (prefill)
    drawn = np.empty((B, chars), np.int64)
    for step in range(chars):
        feeds[mf.INPUT_TOKENS] = tokens
        results = model.session.run(out_names, feeds)
        for (name_in, _), value in zip(meta.state_names(), results[1:]):
            feeds[name_in] = value  # [L, B, H]
        u = sampling.uniforms(seeds, np.full(B, step))  # draw number ``step`` of each lane's generator
        drawn[:, step] = sampling.sample(results[0][:, -1], temps, top_k, top_p, u)  # from logits [B, V]
        tokens = drawn[:, step : step + 1]  # [B, 1]
    return tuple(Sample(t, "".join(meta.vocab[i] for i in drawn[b])) for b, t in enumerate(temperatures))


def format_sweep(samples: tuple[Sample, ...], prime: str, width: int = 72) -> str:
    """The samples one after another, each under a header naming its temperature."""
    parts = []
    for s in samples:
        name = "greedy" if s.temperature == 0 else f"{s.temperature:g}"
        header = f"── temperature {name} "
        parts.append(header + "─" * max(0, width - len(header)))
        parts.append(prime + s.text)
        parts.append("")
    return "\n".join(parts)
