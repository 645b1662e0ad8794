"""Batches for truncated backpropagation through time, as char-rnn cuts them.

A token stream is split into ``total`` contiguous lanes of equal length. A
training window holds characters ``[cursor, cursor + length]`` of every lane
this process owns, and the next window starts where it ended, so the recurrent
state at the end of one window is the right start for the next. Under torchrun
each rank owns its own block of lanes.

``Windows`` decides where each epoch starts and how long each window is: fixed
(``seq_len``, from the lane heads) or varied the way AWD-LSTM varies them.
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
        self.windows = self.lane_len // seq_len  # windows of seq_len before the lanes are used up
        self.starts = (np.arange(first, first + count) * self.lane_len)[:, None]  # [count, 1]

    def fits(self, cursor: int, length: int) -> bool:
        """Whether a window of ``length`` from ``cursor`` still lies inside every lane."""
        return cursor + length <= self.lane_len

    def read(self, cursor: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of the window at ``cursor`` characters into every lane, each int64 [count, length]."""
        chunk = self.tokens[self.starts + cursor + np.arange(length + 1)[None, :]].astype(np.int64)  # [count, length+1]
        return chunk[:, :-1], chunk[:, 1:]

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``i`` of the fixed cut (``seq_len`` characters each, from the lane heads)."""
        return self.read(i * self.seq_len, self.seq_len)


class Windows:
    """Where every epoch starts in the lanes and how long every training window is.

    Fixed by default: each epoch from the lane heads, each window ``seq_len`` long.
    Varied, as AWD-LSTM (Merity et al., 2017) varies them, so that a character is
    not always at the same place in its window and the model never learns the cut:

    - ``epoch_offset``: each epoch starts a random number of characters, in
      [0, seq_len), into the lanes.
    - ``sd``, ``half_prob``: each window's length is drawn from N(seq_len, sd), or
      with probability ``half_prob`` from N(seq_len / 2, sd), then clipped to
      [min(5, seq_len), 2 * seq_len]. The step's learning rate is scaled by
      length / seq_len (see the loop), so a short window moves the weights less.

    The draws come from a generator of their own seeded with the run's seed, the
    same on every rank (so ranks agree on each length, hence on the learning rate);
    its state is part of last.pt. Fixed windows draw nothing.
    """

    def __init__(self, seq_len: int, epoch_offset: bool = False, sd: float = 0.0, half_prob: float = 0.0, seed: int = 0):
        self.seq_len, self.epoch_offset, self.sd, self.half_prob = seq_len, epoch_offset, sd, half_prob
        self.varied = bool(sd or half_prob)
        self.shortest, self.longest = min(5, seq_len), 2 * seq_len if self.varied else seq_len
        # The most characters of a lane one epoch needs: its largest offset, then its longest window.
        self.reach = (seq_len - 1 if epoch_offset else 0) + self.longest
        self.rng = np.random.default_rng(seed)

    def epoch_start(self) -> int:
        """The cursor a new epoch starts at."""
        return int(self.rng.integers(self.seq_len)) if self.epoch_offset else 0

    def next_length(self) -> int:
        """The length of the next training window, in characters."""
        if not self.varied:
            return self.seq_len
        mean = self.seq_len / 2 if self.rng.random() < self.half_prob else self.seq_len
        length = round(self.rng.normal(mean, self.sd)) if self.sd else round(mean)
        return min(max(length, self.shortest), self.longest)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def train_lanes(train: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world: int = 1,
                reach: int | None = None) -> Lanes:
    """This rank's lanes of the training split; a split too short for one epoch is an error.

    ``reach`` is the most characters of a lane an epoch needs (``Windows.reach``; seq_len when fixed).
    """
    reach = reach or seq_len
    need = batch_size * world * reach + 1
    if len(train) < need:
        raise CorpusError(
            f"--data: the training split has {len(train)} characters; one batch of --batch-size {batch_size}"
            f"{f' x {world} ranks' if world > 1 else ''} x --seq-len {seq_len}"
            f"{f' (varied: up to {reach} characters into a lane)' if reach > seq_len else ''}"
            f" needs at least {need} (use more text or a smaller --batch-size / --seq-len)"
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
