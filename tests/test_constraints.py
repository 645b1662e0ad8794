"""The regex automaton (service/constraints.py) against Python's own `re`, on random texts and walks."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.service.constraints import RegexError, compile_regex

VOCAB = tuple("\n abcemnosxyzABC019-.")
PATTERNS = [r"[A-Z][a-z]+\n", r"(yes|no|maybe)", r"a{3,5}b", r"(ab)+", r"[0-9]{2,3}-[0-9]{4}", r"x*y?z",
            r"(a|b)*c", r"[^\n]{1,4}\."]


def walk(automaton, text: str) -> tuple[int, bool]:
    """(state after text, whether every character was allowed on the way)."""
    state, ok = 0, True
    for ch in text:
        ok = ok and bool(automaton.mask[state, VOCAB.index(ch)])
        state = int(automaton.trans[state, VOCAB.index(ch)])
    return state, ok


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=VOCAB, max_size=8))
def test_a_matching_text_is_never_masked(pattern, text):
    automaton = compile_regex(pattern, VOCAB, 1000)
    _, ok = walk(automaton, text)
    if re.fullmatch(pattern, text):
        assert ok, (pattern, text)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_masked_walk_to_completion_is_a_match(pattern):
    automaton = compile_regex(pattern, VOCAB, 1000)
    rng = random.Random(0)
    completed = 0
    for _ in range(200):
        state, text = 0, ""
        for _ in range(30):
            allowed = [i for i in range(len(VOCAB)) if automaton.mask[state, i]]
            assert allowed, (pattern, text)  # a live state always has a way on
            i = rng.choice(allowed)
            text += VOCAB[i]
            state = int(automaton.trans[state, i])
            if automaton.accept[state]:
                assert re.fullmatch(pattern, text), (pattern, text)
                completed += 1
                break
    if pattern not in (r"(ab)+",):  # (ab)+ never completes: "ab" can always be extended
        assert completed > 0


def test_allowed_chars_prune_the_automaton():
    automaton = compile_regex(r"[a-c]+\n", VOCAB, 1000, allowed="a\n")
    state, ok = walk(automaton, "aaa\n")
    assert ok and automaton.accept[state]
    assert not walk(automaton, "b")[1]


@pytest.mark.parametrize("pattern,words", [
    ("[0-9]*x", None),  # fine: x is in the vocabulary
    ("[q]+", "can match"),  # no q in the vocabulary
    ("[q]*", "only the empty text"),
    ("(", "interegular"),
    ("a" * 1001, "at most 1000"),
])
def test_unsatisfiable_or_bad_patterns_are_refused_saying_why(pattern, words):
    if words is None:
        compile_regex(pattern, VOCAB, 1000)
        return
    with pytest.raises(RegexError, match=re.escape(words)):
        compile_regex(pattern, VOCAB, 1000)


def test_too_many_states_is_refused_with_the_count():
    with pytest.raises(RegexError, match=r"at most 5 states.*this one has \d+"):
        compile_regex(r"[0-9]{20}", VOCAB, 5)
