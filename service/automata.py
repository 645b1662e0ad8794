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
sequences sit there. The table also keeps each row's state and which
automaton it uses, so that one object counts the rows of every automaton and
drops those no row uses once they outweigh the live ones (the memory of a
server that sees a new stop set or regex with every request stays flat).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

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


SLACK_STATES = 4096  # states of unused automata a table keeps for reuse, beyond as many as are live


@dataclass
class _Part:
    automaton: Automaton
    offset: int  # its start state in the table
    rows: int  # rows using it


class AutomatonTable:
    """Every automaton the rows of a batch use, in one array, and each row's state in it.

    The table owns both, so that it alone counts which automata are in use and
    renumbers the rows when it drops the others. ``state[row]`` is the global
    state of a row (0: the row has no automaton; it never moves). Automata no
    row uses stay in the table (a request that repeats a stop set or a regex
    pays nothing) until they hold more states than ``max(live states, slack)``:
    then they are dropped at once, so the table's memory is bounded by the
    automata in use, whatever the number of distinct sets a server sees.
    """

    def __init__(self, vocab_size: int, capacity: int, slack: int | None = None):
        self.vocab_size = vocab_size
        self.slack = SLACK_STATES if slack is None else slack
        self.state = np.zeros(capacity, np.int32)  # [capacity] global state of each row
        # [capacity] the first global state of each row's automaton (0: none). Dropping unused automata
        # renumbers the rest: a state taken before (a K-step call's, under overlap) is ``state - offset``
        # local to its automaton, and ``local + offset`` again after (batch.py).
        self.offset = np.zeros(capacity, np.int32)
        self._key: list[Hashable | None] = [None] * capacity  # [capacity] each row's automaton, None: none
        null = Automaton(np.zeros((1, vocab_size), np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32),
                         np.ones((1, vocab_size), bool))
        self._parts: dict[Hashable, _Part] = {None: _Part(null, 0, 0)}
        self._rows = 0  # rows with an automaton
        self._live_states = 1  # states of the automata some row uses, the null one included
        self._build()

    def _build(self) -> None:
        offset = 0
        for part in self._parts.values():
            part.offset = offset
            offset += part.automaton.states
        parts = list(self._parts.values())
        self.trans = np.concatenate([p.automaton.trans + p.offset for p in parts])  # [S, V] global states
        self.accept = np.concatenate([p.automaton.accept for p in parts])  # [S]
        self.depth = np.concatenate([p.automaton.depth for p in parts])  # [S]
        self.mask = np.concatenate([_mask(p.automaton, self.vocab_size) for p in parts])  # [S, V] bool

    @property
    def states(self) -> int:
        """States in the table, used or not (its memory is this times V times 9 bytes)."""
        return len(self.accept)

    @property
    def in_use(self) -> bool:
        """Some row has an automaton (else every row is in state 0 and a step changes nothing)."""
        return self._rows > 0

    def start(self, row: int, key: Hashable, make: Callable[[], Automaton]) -> None:
        """Row ``row`` (which has none) starts automaton ``key``; ``make()`` builds it when the table lacks it."""
        part = self._parts.get(key)
        if part is None:
            automaton = make()
            part = self._parts[key] = _Part(automaton, self.states, 0)
            self.trans = np.concatenate([self.trans, automaton.trans + part.offset])
            self.accept = np.concatenate([self.accept, automaton.accept])
            self.depth = np.concatenate([self.depth, automaton.depth])
            self.mask = np.concatenate([self.mask, _mask(automaton, self.vocab_size)])
        if part.rows == 0:
            self._live_states += part.automaton.states
        part.rows += 1
        self._rows += 1
        self._key[row] = key
        self.state[row] = self.offset[row] = part.offset

    def release(self, rows) -> None:
        """``rows`` (ints) ended: back to state 0; automata that none uses are dropped when they outweigh the rest."""
        if not self._rows:  # the usual batch without stop sequences (or regexes): every row is in state 0
            return
        for row in np.atleast_1d(rows).tolist():
            key = self._key[row]
            if key is None:
                continue
            part = self._parts[key]
            part.rows -= 1
            if part.rows == 0:
                self._live_states -= part.automaton.states
            self._rows -= 1
            self._key[row] = None
            self.state[row] = self.offset[row] = 0
        if self.states - self._live_states > max(self._live_states, self.slack):
            self._collect()

    def _collect(self) -> None:
        """Drops the automata no row uses and renumbers the rows' states for the smaller table."""
        old = {key: part.offset for key, part in self._parts.items()}
        self._parts = {key: part for key, part in self._parts.items() if part.rows > 0 or key is None}
        self._build()
        for row, key in enumerate(self._key):
            if key is not None:
                self.state[row] += self._parts[key].offset - old[key]
                self.offset[row] = self._parts[key].offset

    def move(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Rows compacted from ``src`` to ``dst`` (slots.py): their automata and states follow."""
        for a, b in zip(src, dst):
            self._key[b], self._key[a] = self._key[a], None
            self.state[b], self.state[a] = self.state[a], 0
            self.offset[b], self.offset[a] = self.offset[a], 0

    def replay(self, row: int, ids: np.ndarray) -> None:
        """Row ``row`` reads ``ids`` (int [T]) one after another: the text a resumed stream already has."""
        state = int(self.state[row])
        if not state:  # no automaton: state 0 never moves
            return
        for token in ids.tolist():
            state = int(self.trans[state, token])
        self.state[row] = state

    def walk(self, state: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The states that rows in ``state`` [n] reach after each of their ``ids`` [n, K] (int32 [n, K]), one
        gather over all rows per step; the rows' own states are left as they were."""
        states = np.empty(ids.shape, np.int32)
        for k in range(ids.shape[1]):
            state = states[:, k] = self.trans[state, ids[:, k]]
        return states

    def step(self, rows, ids: np.ndarray) -> np.ndarray:
        """``rows`` (a slice or int64 [n]) drew ``ids`` [n]: their next global states, kept and returned (int32 [n])."""
        states = self.trans[self.state[rows], ids]
        self.state[rows] = states
        return states


def _mask(automaton: Automaton, vocab_size: int) -> np.ndarray:
    return automaton.mask if automaton.mask is not None else np.ones((automaton.states, vocab_size), bool)
