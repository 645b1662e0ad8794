"""Stop sequences as the engine sees them: an automaton over token ids that says what to hold back and what ends.

The core steps every row's automaton (automata.py) once per character; the
front-end releases all but the last ``depth`` characters, and on a match cuts
the stop sequence. ``feed`` plays both sides for one stream, character by
character, as the engine would.
"""

from __future__ import annotations

import string

import numpy as np
import pytest

from charrnn.service.automata import AutomatonTable, stop_automaton

VOCAB = string.ascii_letters + " !\n"
INDEX = {ch: i for i, ch in enumerate(VOCAB)}


def feed(text: str, stops: tuple[str, ...]) -> tuple[list[str], str | None, str]:
    """(text released after each character, the stop that matched, all text the reader gets)."""
    table = AutomatonTable(len(VOCAB), capacity=1)
    ids = tuple(tuple(INDEX.get(ch) for ch in s) for s in stops)
    if stops:
        table.start(0, ids, lambda: stop_automaton(ids, len(VOCAB)))
    released, pending, stop = [], "", None
    for ch in text:
        state = table.step(slice(0, 1), np.array([INDEX[ch]]))
        pending += ch
        matched = int(table.accept[state[0]])
        if matched:
            stop = stops[matched - 1]
            released.append(pending[: len(pending) - len(stop)])
            return released, stop, "".join(released)
        hold = int(table.depth[state[0]])
        released.append(pending[: len(pending) - hold])
        pending = pending[len(pending) - hold:]
    return released, stop, "".join(released) + pending  # held text is real output when no stop matched


@pytest.mark.parametrize(
    "text, stops, want_text, want_stop",
    [
        ("hello\n\nworld", ("\n\n",), "hello", "\n\n"),
        ("abcabd", ("abd",), "abc", "abd"),  # a false start is released once it cannot match
        ("xab", ("ab", "b"), "x", "ab"),  # both end here: the longer one is cut
        ("xb", ("ab", "b"), "x", "b"),
        ("no stop here", ("END",), "no stop here", None),
        ("ends with EN", ("END",), "ends with EN", None),  # held text is released at the end
        ("stop", ("stop",), "", "stop"),
        ("aab", ("ab",), "a", "ab"),  # the failure link: "aa" is no prefix, its tail "a" is
    ],
)
def test_the_stop_sequence_ends_the_text_and_is_not_returned(text, stops, want_text, want_stop):
    _, stop, got = feed(text, stops)
    assert (got, stop) == (want_text, want_stop)


def test_only_characters_that_could_start_a_stop_are_held_back():
    released, _, _ = feed("abxa!", ("ab!",))
    # 'a' may start "ab!", "ab" too; 'x' breaks it; the last 'a' is held again until '!' shows it is not "ab!".
    assert released == ["", "", "abx", "", "a!"]


def test_a_stream_without_stops_releases_every_character_at_once():
    released, stop, got = feed("plain", ())
    assert released == list("plain") and stop is None and got == "plain"


def test_a_stop_with_a_character_outside_the_vocabulary_never_matches():
    _, stop, got = feed("abab", ("ab\x01",))
    assert stop is None and got == "abab"


def _key(*words: str) -> tuple:
    return tuple(tuple(INDEX[c] for c in w) for w in words)


def _start(table: AutomatonTable, row: int, key: tuple) -> None:
    table.start(row, key, lambda: stop_automaton(key, len(VOCAB)))


def test_rows_with_different_stops_share_one_table():
    table = AutomatonTable(len(VOCAB), capacity=4)
    keys = [_key(word) for word in ("abc", "bca", "cab")]
    for row, k in enumerate(keys):
        _start(table, row, k)
    table.start(3, keys[0], lambda: pytest.fail("an automaton in the table is built once"))
    assert table.state[3] == table.state[0] and len(set(table.state[:3].tolist())) == 3
    for ch in "ab":
        state = table.step(slice(0, 4), np.full(4, INDEX[ch]))
    assert table.depth[state].tolist() == [2, 1, 0, 2]  # "ab" of abc; "b" of bca; nothing of cab; abc again


def test_a_stop_set_used_again_after_its_rows_ended_is_stepped():
    """The bug of a count kept apart from its rows: a set's second use left the table believing no row used it."""
    table = AutomatonTable(len(VOCAB), capacity=2)
    key = _key("ab")
    for use in range(3):
        _start(table, 0, key)
        assert table.in_use, f"use {use}"
        table.step(slice(0, 1), np.array([INDEX["a"]]))
        state = table.step(slice(0, 1), np.array([INDEX["b"]]))
        assert table.accept[state[0]] == 1, f"use {use}"
        table.release([0])
        assert not table.in_use and table.state[0] == 0


def test_unused_automata_are_dropped_and_live_rows_renumbered():
    table = AutomatonTable(len(VOCAB), capacity=3, slack=100)
    live = _key("abc")
    _start(table, 0, live)
    table.step(slice(0, 1), np.array([INDEX["a"]]))  # row 0 is one character into "abc"
    for i in range(300):  # each request its own stop set, as callers send them
        k = _key("a" * 10, VOCAB[i % len(VOCAB)] + VOCAB[i // len(VOCAB)] * 9)  # 300 distinct sets
        _start(table, 1 + i % 2, k)
        table.release([1 + i % 2])
        # live: the null automaton and "abc" (5 states); kept unused: at most the slack; one new set: 21 at most
        assert table.states <= 5 + 100 + 21, f"the table grew to {table.states} states at request {i}"
    state = table.step(slice(0, 1), np.array([INDEX["b"]]))
    assert table.depth[state[0]] == 2, "row 0's state survived the renumbering"
    state = table.step(slice(0, 1), np.array([INDEX["c"]]))
    assert table.accept[state[0]] == 1


def test_rows_moved_by_compaction_keep_their_automata():
    table = AutomatonTable(len(VOCAB), capacity=3)
    _start(table, 2, _key("ab"))
    table.step(slice(2, 3), np.array([INDEX["a"]]))
    table.move([2], [0])
    assert table.state[2] == 0
    state = table.step(np.array([0]), np.array([INDEX["b"]]))
    assert table.accept[state[0]] == 1
    table.release([0])
    assert not table.in_use
