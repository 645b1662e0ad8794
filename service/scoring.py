"""Score requests inside the engine core: a text's log-probabilities, read like a prime.

A score runs through the batch's prefill (batch.py), one call of at most
MAX_PREFILL_STEPS characters per round beside the decode steps, from a zero
state: the model reads the prime and the text but for its last character, and
the logits at each position give the log-probability of the next character
(computed on the host in float64 from the model's float32 logits). It holds a
batch slot while it runs, so it counts against the engine's limits like a
stream.
"""

from __future__ import annotations

import numpy as np

from charrnn.service import protocol
from charrnn.service.runtime import LoadedModel


class ScoreRun:
    """One text being scored: the tokens still to read and the log-probabilities so far."""

    def __init__(self, model: LoadedModel, slot: int, tokens: np.ndarray, text_chars: int, top: int):
        self.slot, self.top = slot, top
        self.tokens = tokens  # int64 [prime, then text]: the prime's ids (the start token for "") and the text's
        self.first = len(tokens) - text_chars - 1  # the position whose logits score the text's first character
        self.read = 0  # tokens fed so far
        self.state = model.zero_state(1)
        self.parts: list[np.ndarray] = []  # log-softmax rows [k, V] of the positions that score the text

    @property
    def done(self) -> bool:
        return self.read >= len(self.tokens) - 1

    def advance(self, model: LoadedModel, steps: int) -> None:
        """Reads up to ``steps`` more tokens (one model call)."""
        end = min(len(self.tokens) - 1, self.read + steps)
        logits, self.state = model.run(self.tokens[None, self.read:end], self.state)  # [1, k, V]
        keep = max(self.first - self.read, 0)
        if keep < end - self.read:
            z = logits[0, keep:].astype(np.float64)
            z -= z.max(axis=1, keepdims=True)
            self.parts.append(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))
        self.read = end

    def result(self) -> protocol.ScoreResult:
        """The text's n characters' log-probabilities (float32 [n]) and their ``top`` alternatives ([n, top])."""
        logp = np.concatenate(self.parts)  # [n, V]
        targets = self.tokens[self.first + 1:]
        order = np.argsort(-logp, axis=1, kind="stable")[:, : self.top]  # ties: the lower index first
        return protocol.ScoreResult(lp=logp[np.arange(len(targets)), targets].astype(np.float32),
                                    top_ids=order.astype(np.int32),
                                    top_lp=np.take_along_axis(logp, order, axis=1).astype(np.float32))
