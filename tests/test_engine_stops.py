"""Stop sequences inside one stream: what is held back, what is cut, what is released."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.service.requests import FinishReason, GenerationRequest, SamplingParams
from charrnn.service.streams import Stream


def feed(text: str, stops: tuple[str, ...]) -> tuple[list[str], str | None, str]:
    """Pushes ``text`` one character at a time; returns (chunks released after each char, stop, text at the end)."""
    req = GenerationRequest(request_id="r", prime="", prime_ids=np.zeros(1, np.int64), max_chars=len(text) or 1,
                            sampling=SamplingParams(), stop=stops)
    stream = Stream(req, engine=None, mailbox=None, label="m@1")
    released, stop = [], None
    for ch in text:
        stop = stream.push(ch)
        released.append(stream._take())
        if stop is not None:
            break
    if stop is None:
        stream.finish(FinishReason.LENGTH, 0.0)
    else:
        stream.finish(FinishReason.STOP_SEQUENCE, 0.0, stop=stop)
    return released, stop, "".join(released) + stream._take()


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
