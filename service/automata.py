"""Character automata stepped for the whole batch at once: ``state = trans[state, id]``.

A stream's stop sequences become one Aho-Corasick automaton over the model's
vocabulary. All the automata of a batch live in one table (``AutomatonTable``),
each at its own offset, and every row holds a global state, so a step of
thousands of streams is one gather (``step``), and what a row needs to know
comes from arrays indexed by its state:

- ``accept[state]``: 1 + the index (in the request) of the stop sequence that
  ends here, the longest when several do; 0 when none;
- ``depth[state]``: how many of the last characters could still grow into a
  stop sequence: the front-end holds them back from the reader until they
  cannot.

State 0 is a one-state automaton that never matches: rows without stop
sequences sit there. Tables of automata that no row uses any more are dropped
when they outweigh the live ones.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np


@dataclass(frozen=True)
class Automaton:
    trans: np.ndarray  # int32 [S, V]: next state, local numbering (0 = the start)
    accept: np.ndarray  # int32 [S]: 1 + stop index matched on entering the state, 0 = none (constraints.py: 1 = done)
    depth: np.ndarray  # int32 [S]: characters that may still begin a stop sequence
    mask: np.ndarray | None = None  # bool [S, V]: the characters allowed next (constraints.py); None: all

    @property
    def states(self) -> int:
        return len(self.accept)


def stop_automaton(stops: Sequence[Sequence[int | None]], vocab_size: int) -> Automaton:
    """Aho-Corasick over token ids. A ``None`` id (a character outside the vocabulary) can never be
    generated: its stop sequence is kept only up to it, as a prefix that can never complete."""
    children: list[dict[int, int]] = [{}]
    terminal = [0]
    depth = [0]
    for index, stop in enumerate(stops):
        node, complete = 0, True
        for token in stop:
            if token is None:
                complete = False
                break
            nxt = children[node].get(token)
            if nxt is None:
                nxt = len(children)
                children[node][token] = nxt
                children.append({})
                terminal.append(0)
                depth.append(depth[node] + 1)
            node = nxt
        if complete and not terminal[node]:
            terminal[node] = index + 1
    n = len(children)
    trans = np.zeros((n, vocab_size), np.int32)
    accept = np.zeros(n, np.int32)
    fail = [0] * n
    queue = collections.deque()
    for token, child in children[0].items():
        trans[0, token] = child
        queue.append(child)
    accept[0] = 0
    while queue:  # breadth first: a node's failure link is settled before its children's
        node = queue.popleft()
        # The longest stop ending here: the node's own, else the longest ending at its failure link.
        accept[node] = terminal[node] or accept[fail[node]]
        trans[node] = trans[fail[node]]
        for token, child in children[node].items():
            fail[child] = trans[fail[node], token] if node else 0
            trans[node, token] = child
            queue.append(child)
    return Automaton(trans=trans, accept=accept, depth=np.array(depth, np.int32))


class AutomatonTable:
    """Every automaton in use by a batch in one array, so a step of all rows is one gather."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        null = Automaton(np.zeros((1, vocab_size), np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32),
                         np.ones((1, vocab_size), bool))
        self._parts: dict[Hashable, list] = {}  # key -> [automaton, offset, rows using it]
        self._live_states = 1  # states of the automata some row uses, the null one included
        self._build({(): [null, 0, 1]})

    def _build(self, parts: dict) -> None:
        offset = 0
        for part in parts.values():
            part[1] = offset
            offset += part[0].states
        self._parts = parts
        self.trans = np.concatenate([p[0].trans + p[1] for p in parts.values()])  # [S, V] global states
        self.accept = np.concatenate([p[0].accept for p in parts.values()])
        self.depth = np.concatenate([p[0].depth for p in parts.values()])
        self.mask = np.concatenate([_mask(p[0], self.vocab_size) for p in parts.values()])  # [S, V] bool

    def start(self, key: Hashable, make) -> int:
        """The global start state of automaton ``key`` for one more row; ``make()`` builds it when new."""
        part = self._parts.get(key)
        if part is None:
            automaton = make()
            part = self._parts[key] = [automaton, len(self.accept), 0]
            self.trans = np.concatenate([self.trans, automaton.trans + part[1]])
            self.accept = np.concatenate([self.accept, automaton.accept])
            self.depth = np.concatenate([self.depth, automaton.depth])
            self.mask = np.concatenate([self.mask, _mask(automaton, self.vocab_size)])
            self._live_states += automaton.states
        part[2] += 1
        return part[1]

    @property
    def in_use(self) -> bool:
        """Some row has stop sequences (else every row is in state 0 and a step changes nothing)."""
        return self._live_states > 1

    def release(self, key: Hashable) -> None:
        """One row of automaton ``key`` left; unused automata are dropped at the next ``collect``."""
        part = self._parts[key]
        part[2] -= 1
        if part[2] == 0 and key != ():
            self._live_states -= part[0].states

    def collect(self, states: np.ndarray, keys: Sequence[Hashable]) -> np.ndarray:
        """Drops unused automata once they hold more states than the live ones; returns the rows' states
        (``states`` [n] of rows using ``keys`` [n]) renumbered for the new table."""
        if len(self.accept) - self._live_states <= max(self._live_states, 4096):
            return states
        old = {key: part[1] for key, part in self._parts.items()}
        self._build({key: part for key, part in self._parts.items() if part[2] > 0 or key == ()})
        moved = np.array([self._parts[k][1] - old[k] for k in keys], np.int32)
        return states + moved

    def step(self, states: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Next global state of each row: int32 [n] states, int [n] ids -> int32 [n]."""
        return self.trans[states, ids]


def _mask(automaton: Automaton, vocab_size: int) -> np.ndarray:
    return automaton.mask if automaton.mask is not None else np.ones((automaton.states, vocab_size), bool)
