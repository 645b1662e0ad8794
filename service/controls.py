"""The controls of a batch's rows: logit bias, allowed characters, regex, penalties, log-probabilities.

Each is a per-slot value or row of the batch, so a step that uses them is a
few array operations over the batch, computed for every row from its own
values alone (seeded text does not depend on the other rows). A batch where
no row uses any runs the sampler's plain graph and pays nothing here
(``in_use``). The [slots, V] arrays are made when a row first needs them.

- ``sampler_controls(rows)``: the controlled sampler graph's inputs for those
  rows: the static bias (logit_bias, -inf outside allowed_chars) with -inf
  where the row's regex state forbids a character, the counts of characters
  generated (for the penalties), and how many alternatives to return;
- ``advance(rows, ids)``: counts and regex states after a step; returns the
  rows whose text now completely matches their regex (they end). After a
  K-step call the graph's counts come in through ``set_counts``, and the
  batch walks the regex states over the K ids itself (batch.py).
"""

from __future__ import annotations

import numpy as np

from charrnn.service.automata import AutomatonTable
from charrnn.service.constraints import compile_regex
from charrnn.service.decode_graph import AutomatonInputs, allowed_bias
from charrnn.service.requests import Controls
from charrnn.service.sampler import SamplerInputs


class ControlRows:
    def __init__(self, capacity: int, vocab: tuple[str, ...], max_regex_states: int = 100_000):
        self.capacity, self.vocab = capacity, vocab
        self.max_regex_states = max_regex_states  # validation enforces the server's limit; this one is a backstop
        v = len(vocab)
        self.used = np.zeros(capacity, bool)  # the row uses some control
        self.logprobs = np.zeros(capacity, np.int64)  # alternatives wanted (0: none)
        self.presence = np.zeros(capacity, np.float32)
        self.frequency = np.zeros(capacity, np.float32)
        self.repetition = np.ones(capacity, np.float32)
        self.penalised = np.zeros(capacity, bool)
        self.regexes = AutomatonTable(v, capacity)  # each row's regex automaton and state (0: no regex)
        self._allowed, self._allowed_of = None, None  # regexes.mask as the K-step graph's -inf table, and its source
        self._bias: np.ndarray | None = None  # float32 [capacity, V]
        self._counts: np.ndarray | None = None  # float32 [capacity, V]
        self._active = 0  # rows holding a control

    @property
    def in_use(self) -> bool:
        return self._active > 0

    def _matrix(self, name: str) -> np.ndarray:
        if getattr(self, name) is None:
            setattr(self, name, np.zeros((self.capacity, len(self.vocab)), np.float32))
        return getattr(self, name)

    def start(self, slot: int, logprobs: int, controls) -> None:
        """A new stream in ``slot`` with ``logprobs`` alternatives and ``controls`` (requests.Controls, or None)."""
        c = controls or Controls()  # none: the defaults, which change nothing
        bias, regex = c.bias, c.regex
        presence, frequency, repetition = float(c.presence), float(c.frequency), float(c.repetition)
        self.logprobs[slot] = logprobs
        self.presence[slot], self.frequency[slot], self.repetition[slot] = presence, frequency, repetition
        self.penalised[slot] = bool(presence or frequency or repetition != 1.0)
        if bias is not None:
            self._matrix("_bias")[slot] = bias
        elif self._bias is not None:
            self._bias[slot] = 0.0
        if self.penalised[slot]:
            self._matrix("_counts")[slot] = 0.0
        if regex:
            key = (regex, c.allowed)
            self.regexes.start(slot, key, lambda: compile_regex(key[0], self.vocab, self.max_regex_states, key[1]))
        used = bool(logprobs or bias is not None or regex or self.penalised[slot])
        self.used[slot] = used
        self._active += used

    def free(self, slots) -> None:
        for slot in np.atleast_1d(slots).tolist():
            if self.used[slot]:
                self._active -= 1
                self.used[slot] = False
        self.regexes.release(slots)

    def replay(self, slot: int, ids: np.ndarray) -> None:
        """A resumed stream in ``slot`` already generated ``ids`` (int [T]): its penalty counts and regex state
        are as if it had drawn them here."""
        if self.penalised[slot]:
            np.add.at(self._counts[slot], ids, 1.0)
        self.regexes.replay(slot, ids)

    def move(self, src: list[int], dst: list[int]) -> None:
        """Slots compacted from ``src`` to ``dst`` (slots.py): their controls follow."""
        if not len(src):  # the usual round: nothing moved
            return
        for name in ("used", "logprobs", "presence", "frequency", "repetition", "penalised"):
            array = getattr(self, name)
            array[dst] = array[src]
        for matrix in (self._bias, self._counts):
            if matrix is not None:
                matrix[dst] = matrix[src]
        self.regexes.move(src, dst)
        for a in src:
            self.used[a] = False

    def sampler_controls(self, rows, regex_mask: bool = True) -> SamplerInputs | None:
        """The controlled graph's inputs for ``rows`` (a slice or int64 [n]), or None when none of them uses any.
        ``regex_mask``: each row's regex forbids characters in its bias (False: the K-step graph adds it at each
        step from ``automaton_inputs``)."""
        if not self._active or not self.used[rows].any():
            return None
        n = len(self.used[rows])
        bias = self._bias[rows].copy() if self._bias is not None else np.zeros((n, len(self.vocab)), np.float32)
        states = self.regexes.state[rows]
        if regex_mask and states.any():
            bias[~self.regexes.mask[states]] = -np.inf
        counts = self._counts[rows] if self._counts is not None else np.zeros((n, len(self.vocab)), np.float32)
        return SamplerInputs(bias=bias, counts=np.ascontiguousarray(counts), presence=self.presence[rows],
                               frequency=self.frequency[rows], repetition=self.repetition[rows],
                               n_top=max(1, int(self.logprobs[rows].max())))

    def automaton_inputs(self, rows) -> AutomatonInputs:
        """The regex table and each of ``rows``' state in it, as the K-step graph takes them (rows without a
        regex are in state 0, which allows every character and never moves)."""
        table = self.regexes
        if self._allowed_of is not table.mask:  # the table changed (an automaton came or went): convert it again
            self._allowed, self._allowed_of = allowed_bias(table.mask), table.mask
        return AutomatonInputs(transitions=table.trans, allowed=self._allowed, state=table.state[rows])

    def set_counts(self, rows, counts: np.ndarray) -> None:
        """``rows``' penalty counts after a K-step call: the graph's ``counts_out`` [n, V]."""
        if self._counts is not None:
            self._counts[rows] = counts

    def advance(self, rows, ids: np.ndarray) -> np.ndarray | None:
        """After ``rows`` drew ``ids``: penalty counts and regex states move on. Returns a bool [n] of the rows
        whose text is now a complete match of their regex that no character extends, or None."""
        if not self._active:
            return None
        if self._counts is not None and self.penalised[rows].any():
            index = np.arange(self.capacity)[rows]
            self._counts[index, ids] += self.penalised[index]
        if not self.regexes.in_use or not self.regexes.state[rows].any():
            return None
        states = self.regexes.step(rows, ids)
        return self.regexes.accept[states] > 0
