"""The messages between front-ends and engine cores (service/protocol.py): typed, round-tripped, merged."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from charrnn.service import protocol
from charrnn.service.requests import Controls


def test_every_message_comes_back_as_the_struct_it_was():
    admit = protocol.Admit(kind="generate", row=3, prime=np.array([1, 2, 3], np.int64), max_chars=40, seed=2**63,
                           stops=[[1, -1]], controls=Controls(bias=np.zeros(4, np.float32), regex="a+"),
                           resumed=1)
    work = protocol.decode_to_core(protocol.encode(protocol.Work(add=[admit], cancel=[7])))
    assert isinstance(work, protocol.Work) and work.cancel == [7]
    got = work.add[0]
    assert (got.kind, got.row, got.max_chars, got.seed, got.stops, got.resumed) == ("generate", 3, 40, 2**63,
                                                                                     [[1, -1]], 1)
    assert got.prime.dtype == np.int64 and got.prime.tolist() == [1, 2, 3]
    assert got.controls.regex == "a+" and got.controls.bias.dtype == np.float32
    end = protocol.End(row=1, code="OK", reason="score", score=protocol.ScoreResult(
        np.zeros(2, np.float32), np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float32)))
    out = protocol.decode_to_frontend(protocol.encode(protocol.Out(
        steps=[protocol.Step(np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int32))], ends=[end], load=(1, 2))))
    assert isinstance(out, protocol.Out) and out.load == (1, 2) and out.busy is None
    assert out.ends[0].score.top_ids.shape == (2, 3) and out.steps[0].hold is None
    for message in (protocol.Hello(fe=2, primary=True), protocol.Drain(), protocol.Stop(), protocol.Gone(fe=1)):
        assert protocol.decode_to_core(protocol.encode(message)) == message
    for message in (protocol.Loaded(), protocol.Up(props={"a": "b"}), protocol.Refused(reason="no")):
        assert protocol.decode_to_frontend(protocol.encode(message)) == message


def test_a_side_refuses_a_message_meant_for_the_other():
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_to_core(protocol.encode(protocol.Out()))
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_to_frontend(protocol.encode(protocol.Hello(fe=0)))


def test_a_later_message_merges_into_one_that_waits():
    """What a lagging front-end gets: every step and end in order, the newest load and busy, deltas added."""
    first = protocol.Out(steps=[protocol.Step(np.array([0], np.int32), np.array([5], np.int32))],
                         ends=[protocol.End(row=0, code="OK", reason="length")], load=(4, 1), busy=True,
                         stats=protocol.StatsDelta(histograms={"step": (np.array([1, 0]), 0.5)}, cache_hits=1))
    early = protocol.Out(steps=[protocol.Step(np.array([1], np.int32), np.array([6], np.int32))])  # says no load
    later = protocol.Out(ends=[protocol.End(row=1, code="CANCELLED", reason="cancelled")], load=(2, 0), busy=False,
                         stats=protocol.StatsDelta(histograms={"step": (np.array([0, 2]), 1.0),
                                                               "batch": (np.array([3, 0]), 3.0)}, cache_misses=2))
    first.merge(early)
    assert first.load == (4, 1) and first.busy is True
    first.merge(later)
    assert [s.ids.tolist() for s in first.steps] == [[5], [6]] and [e.row for e in first.ends] == [0, 1]
    assert first.load == (2, 0) and first.busy is False
    counts, total = first.stats.histograms["step"]
    assert counts.tolist() == [1, 2] and total == 1.5 and first.stats.histograms["batch"][1] == 3.0
    assert (first.stats.cache_hits, first.stats.cache_misses) == (1, 2)
