"""Batches for truncated backpropagation through time, as char-rnn cuts them.

A token stream is split into ``total`` contiguous lanes of equal length. Batch
``i`` holds characters ``[i*T, (i+1)*T]`` of every lane this process owns, so
consecutive batches continue each lane and the recurrent state at the end of
one batch is the right start for the next. Under torchrun each rank owns its
own block of lanes.
"""

from __future__ import annotations

import numpy as np

from .corpus import CorpusError


class Lanes:
    """Lanes ``first .. first+count-1`` of ``total`` over ``tokens``, read ``seq_len`` characters at a time."""

    def __init__(self, tokens: np.ndarray, seq_len: int, count: int, first: int = 0, total: int | None = None):
        total = total or count
        self.tokens, self.seq_len, self.count = tokens, seq_len, count
        self.lane_len = (len(tokens) - 1) // total  # input positions per lane (targets are one further)
        self.windows = self.lane_len // seq_len  # batches before the lanes are used up
        self.starts = (np.arange(first, first + count) * self.lane_len)[:, None]  # [count, 1]
        self.offsets = np.arange(seq_len + 1)[None, :]  # [1, T+1]

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of batch ``i``, each int64 [count, seq_len]."""
        chunk = self.tokens[self.starts + i * self.seq_len + self.offsets].astype(np.int64)  # [count, T+1]
        return chunk[:, :-1], chunk[:, 1:]


def train_lanes(train: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world: int = 1) -> Lanes:
    """This rank's lanes of the training split; a split too short for one batch is an error."""
    need = batch_size * world * seq_len + 1
    if len(train) < need:
        raise CorpusError(
            f"--data: the training split has {len(train)} characters; one batch of --batch-size {batch_size}"
            f"{f' x {world} ranks' if world > 1 else ''} x --seq-len {seq_len} needs at least {need}"
            " (use more text or a smaller --batch-size / --seq-len)"
        )
    return Lanes(train, seq_len, batch_size, first=rank * batch_size, total=batch_size * world)


VAL_LANES = 64  # validation lanes, whatever the training batch: runs of any batch size compare on one cut


def val_lanes(val: np.ndarray, seq_len: int) -> Lanes:
    """The validation split as ``VAL_LANES`` lanes; fewer when the split is short."""
    count = min(VAL_LANES, (len(val) - 1) // seq_len)
    if count < 1:
        raise CorpusError(
            f"--data: the validation split (last 10%) has {len(val)} characters; one window of"
            f" --seq-len {seq_len} needs at least {seq_len + 1} (use more text or a smaller --seq-len)"
        )
    return Lanes(val, seq_len, count)
