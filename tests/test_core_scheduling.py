"""The core's scheduling without sockets or onnxruntime: a stub model, the real Core, its Outbox read directly.

The stub is a counter: its state holds each row's last character, and its logits put all the weight on the next
character of the vocabulary, so every stream's text is known in advance (the oracle): after prime p it is
vocab[p+1], vocab[p+2], ... whatever the batch, the queue or the slot. The tests drive Core.add / Core.round /
Core.cancel as the core process does (one character a call: the K-step graph needs a model file), with more
streams than slots, and read each stream's characters and end
from the messages its front-end would get.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from charrnn.modelfile import ModelMetadata
from charrnn.service import protocol
from charrnn.service.core import Core
from charrnn.service.sampler import Picked
from testkit.stubmodel import NumpyState

VOCAB = tuple("\nabcdefghijklmnopqrstuvwxyz")
V = len(VOCAB)


class CounterModel(NumpyState):
    """What the core sees of a model: the next character is always the one after the last, greedily."""

    def __init__(self, device: str = "cpu"):
        self.metadata = ModelMetadata(vocab=VOCAB, cell="lstm", layers=1, hidden=1, val_loss=float("nan"),
                                      train_steps=0, corpus_sha256="")
        self.name, self.version, self.label, self.device = "counter", 1, "counter@1", device
        self.device_path = device == "cuda"  # the core's CUDA batch policy
        self.calls = 0

    def run(self, tokens: np.ndarray, state):
        self.calls += 1
        nxt = (tokens + 1) % V  # [B, T]
        logits = np.full((*tokens.shape, V), -30.0, np.float32)
        np.put_along_axis(logits, nxt[..., None], 30.0, axis=2)
        return logits, (tokens[:, -1][None, :, None].astype(np.float32),)

    def sample(self, logits, temperature, top_k, top_p, u, controls=None):
        scores = logits.reshape(len(logits), -1, V)[:, -1, :].copy()
        if controls is not None and getattr(controls, "bias", None) is not None:
            scores = scores + controls.bias
        return Picked(np.argmax(scores, axis=1)[:, None].astype(np.int64))

    def decode(self, tokens, state, temperature, top_k, top_p, u, controls=None):
        logits, state = self.run(tokens, state)
        return self.sample(logits, temperature, top_k, top_p, u, controls), state


def ids(text: str) -> np.ndarray:
    return np.array([VOCAB.index(c) for c in text], np.int64)


def expected(prime: str, n: int) -> str:
    last = VOCAB.index(prime[-1])
    return "".join(VOCAB[(last + 1 + i) % V] for i in range(n))


class Front:
    """One front-end's view: each row's ids and end, from the core's messages."""

    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}
        self.ends: dict[int, protocol.End] = {}

    def read(self, out: protocol.Out | None) -> None:
        if out is None:
            return
        for step in out.steps:
            ids = step.ids.reshape(len(step.rows), -1)  # [n, K]: a row's first ``count`` are its
            count = step.count if step.count is not None else np.full(len(step.rows), ids.shape[1])
            for r, i, c in zip(step.rows.tolist(), ids.tolist(), count.tolist()):
                assert r not in self.ends, f"row {r} got a character after its end"
                self.ids.setdefault(r, []).extend(i[:c])
        for end in out.ends:
            assert end.row not in self.ends, f"row {end.row} ended twice"
            self.ends[end.row] = end

    def text(self, row: int) -> str:
        return "".join(VOCAB[i] for i in self.ids.get(row, []))


def drive(core: Core, fronts: dict[int, Front], rounds: int = 2000, until=None) -> None:
    for _ in range(rounds):
        core.round(0.0)
        for fe, out in core.outbox.pop_all().items():
            fronts[fe].read(out)
        if until is not None and until():
            return
        if not core.busy:
            return


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # "cuda": the stub only takes the core's device path
def test_more_streams_than_slots_all_finish_with_their_own_text(device):
    model = CounterModel(device)
    core = Core(model, max_active=4, max_queue=64, decode_steps=1)
    rng = random.Random(7)
    fronts = {0: Front(), 1: Front()}
    want = {}
    for row in range(30):
        fe = row % 2
        prime = "".join(rng.choice(VOCAB[1:]) for _ in range(rng.randint(1, 9)))
        n = rng.randint(1, 12)
        want[(fe, row)] = expected(prime, n)
        core.add(fe, [protocol.Admit(kind="generate", row=row, prime=ids(prime), max_chars=n, seed=row)], 0.0)
    assert core.load[0] + core.load[1] == 30
    drive(core, fronts)
    for (fe, row), text in want.items():
        assert fronts[fe].text(row) == text, (fe, row)
        assert fronts[fe].ends[row].reason == "length"
    assert core.load == (0, 0) and not core.busy


def test_a_full_queue_refuses_with_the_capacity_message():
    core = Core(CounterModel(), max_active=2, max_queue=1, decode_steps=1)
    front = Front()
    core.add(0, [protocol.Admit(kind="generate", row=r, prime=ids("ab"), max_chars=3) for r in range(4)], 0.0)
    front.read(core.outbox.pop_all().get(0))
    assert [front.ends[3].code, front.ends[3].reason] == ["RESOURCE_EXHAUSTED", "queue_full"]
    assert "is at capacity: all 2 batch slots are busy" in front.ends[3].message
    drive(core, {0: front})
    assert [front.text(r) for r in range(3)] == [expected("ab", 3)] * 3


def test_end_precedence_a_stop_on_the_last_character_is_a_stop_not_a_length():
    core = Core(CounterModel(), max_active=2, max_queue=8, decode_steps=1)
    front = Front()
    # From "a": b c d e. A stop "de" completes on the 4th character, which is also max_chars.
    core.add(0, [protocol.Admit(kind="generate", row=0, prime=ids("a"), max_chars=4, stops=[list(ids("de"))]),
                 protocol.Admit(kind="generate", row=1, prime=ids("a"), max_chars=4, stops=[list(ids("zz"))])], 0.0)
    drive(core, {0: front})
    assert (front.ends[0].reason, front.ends[0].stop) == ("stop", 0)
    assert front.ends[1].reason == "length"


def test_cancel_and_deadline_end_streams_and_free_their_slots():
    core = Core(CounterModel(), max_active=2, max_queue=8, decode_steps=1)
    front = Front()
    core.add(0, [protocol.Admit(kind="generate", row=0, prime=ids("a"), max_chars=10_000),
                 protocol.Admit(kind="generate", row=1, prime=ids("a"), max_chars=10_000, deadline=-1.0),
                 protocol.Admit(kind="generate", row=2, prime=ids("q"), max_chars=5)], 0.0)
    drive(core, {0: front}, rounds=5)
    core.cancel(0, [0], 0.0)
    drive(core, {0: front})
    assert front.ends[0].code == "CANCELLED"
    assert front.ends[1].code == "DEADLINE_EXCEEDED"
    assert front.text(2) == expected("q", 5) and front.ends[2].reason == "length"
    assert not core.busy


def test_a_dead_frontend_frees_its_slots_and_its_queue_for_the_others():
    core = Core(CounterModel(), max_active=2, max_queue=8, decode_steps=1)
    fronts = {0: Front(), 1: Front()}
    core.add(0, [protocol.Admit(kind="generate", row=r, prime=ids("a"), max_chars=10_000) for r in range(4)], 0.0)
    core.add(1, [protocol.Admit(kind="generate", row=9, prime=ids("m"), max_chars=6)], 0.0)
    drive(core, fronts, rounds=3)
    core.drop_frontend(0, 0.0)
    drive(core, fronts)
    assert fronts[1].text(9) == expected("m", 6) and fronts[1].ends[9].reason == "length"
    assert not core.busy
