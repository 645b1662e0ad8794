"""Character-level constraints: a regular expression as an automaton over the model's vocabulary.

``interegular`` turns the expression into a finite automaton over character
classes (the same library outlines uses for guided decoding); here it becomes a
table over token ids, the form automata.py steps for the whole batch:

- ``trans[state, id]``: the next state (a dead state that no character leaves);
- ``mask[state, id]``: the characters that keep a complete match reachable;
- ``accept[state]``: 1 when the text so far is a complete match that no
  character can extend (the stream ends there with MATCH_COMPLETE), else 0.

Compiled automata are kept per (expression, vocabulary), least recently used
first out, so a request that repeats an expression pays nothing.
"""

from __future__ import annotations

import collections
import functools
import re

import interegular
import numpy as np

from charrnn.service.automata import Automaton

MAX_PATTERN_CHARS = 1000  # longer expressions are refused before they are parsed


class RegexError(ValueError):
    """The expression cannot constrain generation: the message says why (for '<field> must be <rule>')."""


@functools.lru_cache(maxsize=256)
def compile_regex(pattern: str, vocab: tuple[str, ...], max_states: int, allowed: str = "") -> Automaton:
    """The automaton of ``pattern`` over ``vocab`` (see the module docstring); raises RegexError.

    ``allowed``: if not empty, the only characters that may be generated (allowed_chars): the others
    lead nowhere, and a pattern that needs them is unsatisfiable."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RegexError(f"at most {MAX_PATTERN_CHARS} characters long")
    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as e:  # noqa: BLE001 - interegular raises its own types for what it cannot parse
        # interegular's InvalidSyntax often carries no message; Python's re names what is wrong and where.
        try:
            re.compile(pattern)
        except re.error as r:
            why = f"{r.msg} at position {r.pos}"
        else:  # re takes it: a feature interegular lacks (its message says which), or its stricter syntax
            where = getattr(e.__context__, "index", None)  # where interegular's parser stopped
            why = str(e) or (f"cannot be read at position {where}" if where is not None else "")
            why = f"{type(e).__name__}: {why}" if why else type(e).__name__
        raise RegexError(f"a regular expression interegular can parse ({why})") from None
    states = sorted(fsm.states)
    if len(states) > max_states:
        raise RegexError(f"an expression whose automaton has at most {max_states} states (--max-regex-states); "
                         f"this one has {len(states)}")
    number = {s: i for i, s in enumerate(states)}
    dead = len(states)
    n, v = len(states) + 1, len(vocab)
    trans = np.full((n, v), dead, np.int32)
    classes = [fsm.alphabet[ch] for ch in vocab]  # the class of each vocabulary character
    usable = [not allowed or ch in allowed for ch in vocab]
    for s, row in fsm.map.items():
        for token, cls in enumerate(classes):
            nxt = row.get(cls) if usable[token] else None
            if nxt is not None:
                trans[number[s], token] = number[nxt]
    final = np.zeros(n, bool)
    for s in fsm.finals:
        final[number[s]] = True
    live = _live(trans, final)  # states from which a complete match is still reachable
    start = number[fsm.initial]
    if not live[start]:
        raise RegexError(f"an expression some text over the model's vocabulary ({v} characters) can match")
    mask = live[trans]  # [n, V]: the character leads to a live state
    complete = final & ~mask.any(axis=1)
    if complete[start]:  # only the empty text matches: nothing could ever be generated
        raise RegexError(f"an expression some non-empty text over the model's vocabulary ({v} characters) can match; "
                         f"this one matches only the empty text")
    # Renumber so that the start is state 0, as automata.AutomatonTable expects of every automaton.
    order = np.array([start] + [i for i in range(n) if i != start], np.int64)
    inverse = np.empty(n, np.int64)
    inverse[order] = np.arange(n)
    return Automaton(trans=inverse[trans[order]].astype(np.int32), accept=complete[order].astype(np.int32),
                     depth=np.zeros(n, np.int32), mask=mask[order])


def _live(trans: np.ndarray, final: np.ndarray) -> np.ndarray:
    """States that reach a final state: backwards from the finals over the transitions."""
    n = len(final)
    parents = collections.defaultdict(set)
    for s in range(n):
        for t in set(trans[s].tolist()):
            parents[t].add(s)
    live = final.copy()
    todo = list(np.flatnonzero(final).tolist())
    while todo:
        t = todo.pop()
        for s in parents[t]:
            if not live[s]:
                live[s] = True
                todo.append(s)
    return live
