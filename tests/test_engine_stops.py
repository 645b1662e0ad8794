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
    table = AutomatonTable(len(VOCAB))
    ids = tuple(tuple(INDEX.get(ch) for ch in s) for s in stops)
    state = np.array([table.start(ids, lambda: stop_automaton(ids, len(VOCAB)))], np.int32)
    released, pending, stop = [], "", None
    for ch in text:
        state = table.step(state, np.array([INDEX[ch]]))
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


def test_rows_with_different_stops_share_one_table_and_unused_automata_are_dropped():
    table = AutomatonTable(len(VOCAB))
    keys = [tuple(tuple(INDEX[c] for c in f"{w}") for w in (word,)) for word in ("abc", "bca", "cab")]
    starts = [table.start(k, lambda k=k: stop_automaton(k, len(VOCAB))) for k in keys]
    again = table.start(keys[0], lambda: pytest.fail("an automaton in use is built once"))
    assert again == starts[0] and len(set(starts)) == 3
    state = np.array(starts, np.int32)
    for ch in "ab":
        state = table.step(state, np.full(3, INDEX[ch]))
    assert table.depth[state].tolist() == [2, 1, 0]  # "ab" of abc; "b" of bca; nothing of cab
    for k in keys:
        table.release(k)
    table.release(keys[0])
    # Nothing is live but the null automaton: a big enough table is rebuilt, the rows' states renumbered.
    for i in range(300):
        k = ((INDEX["a"],) * 20, (i % len(VOCAB),) * 20)
        table.start(k, lambda k=k: stop_automaton(k, len(VOCAB)))
        table.release(k)
    before = len(table.accept)
    assert table.collect(np.zeros(0, np.int32), []).shape == (0,)
    assert len(table.accept) < before
