"""The output side of a front-end (service/output.py), without sockets: hand-made core messages in, text out.

Each test builds an OutputProcessor over a small vocabulary, adds streams as
the engine client does, feeds it protocol.Out messages as a core would send
them, and reads what each stream's reader would get (Stream.take) and how it
ended.
"""

from __future__ import annotations

import string

import numpy as np
import pytest

from charrnn.modelfile import ModelMetadata
from charrnn.service import errors, protocol
from charrnn.service.output import PENDING, OutputProcessor
from charrnn.service.requests import FinishReason, GenerationRequest, SamplingParams
from charrnn.service.streams import Stream

VOCAB = string.ascii_lowercase + " \n"
ID = {ch: i for i, ch in enumerate(VOCAB)}


class _Mailbox:
    def post(self, streams) -> None:  # the loop's side: nothing waits here
        pass


def metadata() -> ModelMetadata:
    return ModelMetadata(vocab=tuple(VOCAB), cell="lstm", layers=1, hidden=8, val_loss=float("nan"), train_steps=0,
                         corpus_sha256="0" * 64)


def request(stop=(), logprobs=0, seed=5) -> GenerationRequest:
    return GenerationRequest(request_id="t", prime="a", prime_ids=np.array([0]), max_chars=100,
                             sampling=SamplingParams(seed=seed), stop=tuple(stop), logprobs=logprobs)


@pytest.fixture
def out() -> OutputProcessor:
    return OutputProcessor("m@1", metadata())


def add(out: OutputProcessor, req: GenerationRequest) -> Stream:
    stream = Stream(req, _Mailbox(), lambda s: None)
    with out.lock:
        stream.row = out.add(stream)
    return stream


def step(rows, text_per_row, hold=None, logprobs=None) -> protocol.Step:
    ids = np.array([ID[ch] for ch in text_per_row], np.int32)
    return protocol.Step(np.array(rows, np.int32), ids, None if hold is None else np.array(hold, np.int32), logprobs)


def end(row, code="OK", reason="length", stop=-1, generated=0) -> protocol.End:
    return protocol.End(row=row, code=code, reason=reason, stop=stop, generated=generated, admitted=1.0, first=1.5,
                        last=2.0)


def test_a_first_character_goes_out_at_once_and_the_rest_at_the_flush(out):
    a, b = add(out, request()), add(out, request())
    woken = out.apply(protocol.Out(steps=[step([a.row, b.row], "hx")]), now=1.0, flush=False)
    assert woken == [a, b] and (a.pop_all(), b.pop_all()) == ("h", "x")
    assert out.apply(protocol.Out(steps=[step([a.row, b.row], "iy"), step([a.row], " ")]), 1.1, flush=False) == []
    assert a.pop_all() == "" and b.pop_all() == ""  # not due yet: no message per character
    out.apply(protocol.Out(), 1.2, flush=True)
    assert (a.pop_all(), b.pop_all()) == ("i ", "y")


def test_held_characters_wait_and_a_matched_stop_is_cut(out):
    s = add(out, request(stop=("the",)))
    out.apply(protocol.Out(steps=[step([s.row], "x", hold=[0])]), 1.0, flush=True)
    out.apply(protocol.Out(steps=[step([s.row], "t", hold=[1]), step([s.row], "h", hold=[2])]), 1.1, flush=True)
    assert s.pop_all() == "x"  # "th" may begin "the": held back
    woken = out.apply(protocol.Out(steps=[step([s.row], "e", hold=[0])], ends=[end(s.row, reason="stop", stop=0,
                                                                                   generated=4)]), 1.2, flush=False)
    assert woken == [s] and s.pop_all() == "" and s.done
    assert s.result.finish_reason == FinishReason.STOP_SEQUENCE and s.result.stats.stop_sequence == "the"
    assert s.result.stats.generated_chars == 4 and s.result.stats.model == "m@1"


def test_held_text_is_released_at_an_end_by_length_and_dropped_at_an_error(out):
    ok, bad = add(out, request(stop=("ab",))), add(out, request(stop=("ab",)))
    out.apply(protocol.Out(steps=[step([ok.row, bad.row], "za", hold=[0, 1])]), 1.0, flush=True)
    assert (ok.pop_all(), bad.pop_all()) == ("z", "")
    out.apply(protocol.Out(steps=[step([ok.row], "a", hold=[1])], ends=[end(ok.row, generated=2)]), 1.1, False)
    assert ok.pop_all() == "a" and ok.result.finish_reason == FinishReason.LENGTH
    out.apply(protocol.Out(ends=[end(bad.row, code="UNAVAILABLE", reason="engine")]), 1.2, False)
    assert bad.pop_all() == "" and bad.done and bad.result is None  # the held "a" is not text the caller gets


def test_a_hold_longer_than_what_came_holds_what_came(out):
    """A resumed stream's first holds count characters of resume_text, which this front-end never had."""
    s = add(out, request(stop=("abc",)))
    out.apply(protocol.Out(steps=[step([s.row], "b", hold=[2])]), 1.0, flush=True)  # "a" of resume_text + "b"
    out.apply(protocol.Out(steps=[step([s.row], "x", hold=[0])]), 1.1, flush=True)
    assert s.pop_all() == "bx"


def test_log_probabilities_go_out_with_their_characters(out):
    s = add(out, request(logprobs=2))
    lp = protocol.Logprobs(np.array([[-0.5]], np.float32), np.array([[[ID["q"], ID["r"]]]], np.int32),
                           np.array([[[-0.5, -1.5]]], np.float32))
    out.apply(protocol.Out(steps=[step([s.row], "q", logprobs=lp)]), 1.0, flush=True)
    assert s.pop_all() == "q"
    assert s.logprobs == [("q", -0.5, [("q", -0.5), ("r", -1.5)])]


def test_one_decode_call_brings_k_characters_a_row_and_a_row_that_ended_keeps_its_count(out):
    """A K-step call's Step: ids [n, K]; ``count`` says how many a row that ended inside the call keeps."""
    a, b = add(out, request(logprobs=1)), add(out, request(stop=("yz",)))
    ids = np.array([[ID[c] for c in "abcd"], [ID[c] for c in "wxab"]], np.int32)
    chosen = -np.arange(8, dtype=np.float32).reshape(2, 4)
    lp = protocol.Logprobs(chosen, ids[:, :, None].copy(), chosen[:, :, None].copy())
    woken = out.apply(protocol.Out(steps=[protocol.Step(np.array([a.row, b.row], np.int32), ids, np.array([0, 0], np.int32),
                                                        lp, np.array([4, 4], np.int32))]), 1.0, flush=False)
    assert woken == [a, b] and (a.pop_all(), b.pop_all()) == ("abcd", "wxab")
    assert a.logprobs == [(c, -float(i), [(c, -float(i))]) for i, c in enumerate("abcd")]
    # The next call: a keeps 2 of its 4 (it ended at its length), b all 4 with the last two held back.
    ids = np.array([[ID[c] for c in "efgh"], [ID[c] for c in " qyz"]], np.int32)
    out.apply(protocol.Out(steps=[protocol.Step(np.array([a.row, b.row], np.int32), ids, np.array([0, 2], np.int32),
                                                None, np.array([2, 4], np.int32))],
                           ends=[end(a.row, generated=6), end(b.row, reason="stop", stop=0, generated=8)]), 1.1, False)
    assert a.pop_all() == "ef" and a.result.finish_reason == FinishReason.LENGTH
    assert b.pop_all() == " q" and b.result.finish_reason == FinishReason.STOP_SEQUENCE


def test_a_full_row_is_handed_over_without_waiting_for_the_flush(out):
    s = add(out, request())
    for k in range(PENDING + 3):
        out.apply(protocol.Out(steps=[step([s.row], "ab"[k % 2])]), 1.0 + k, flush=False)
    assert len(s.pop_all()) >= PENDING  # the first character at once, then a whole row


def test_rows_are_reused_and_failing_all_ends_every_stream(out):
    a = add(out, request())
    out.apply(protocol.Out(ends=[end(a.row)]), 1.0, False)
    b = add(out, request())
    assert b.row == a.row and not out.owns(a) and out.owns(b) and out.live == 1
    assert out.fail_all(errors.Unavailable("gone", "engine")) == [b] and out.live == 0 and b.done
