"""What a stand-in for a model needs besides its step: the state operations of runtime.LoadedModel, on numpy.

A stub model (tests/test_core_scheduling.py) or a timed stand-in (bench/standin.py) keeps its recurrent state as
a tuple of float32 arrays [layers, batch, hidden], as LoadedModel does on the CPU, and inherits these.
"""

from __future__ import annotations

import numpy as np


class NumpyState:
    """zero_state, gather, concat, place, resize and state_numpy over a state of ``STATE_SHAPE`` per row."""

    STATE_SHAPE = (1, 1)  # (layers, hidden)

    def zero_state(self, batch: int):
        layers, hidden = self.STATE_SHAPE
        return (np.zeros((layers, batch, hidden), np.float32),)

    def gather(self, state, rows):
        return tuple(np.take(s, rows, axis=1) for s in state)

    def concat(self, states):
        return states[0] if len(states) == 1 else tuple(np.concatenate(p, axis=1) for p in zip(*states))

    def place(self, state, slots, rows):
        for target, source in zip(state, rows):
            target[:, slots, :] = source
        return state

    def resize(self, state, batch):
        have = state[0].shape[1]
        if batch <= have:
            return tuple(np.ascontiguousarray(s[:, :batch]) for s in state)
        return self.concat([state, self.zero_state(batch - have)])

    def state_numpy(self, state):
        return state
