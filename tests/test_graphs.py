"""The service's own graphs built with onnx.helper (graphs.py) are the ones onnxproto.py wrote by hand."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from charrnn.service import graphs, onnxproto, sampler


class HandWritten(onnxproto.Graph):
    """onnxproto.Graph behind graphs.Graph's interface: numpy dtypes in, the old encoder's bytes out."""

    def input(self, name, dtype, rank):
        return super().input(name, onnxproto._ELEM[np.dtype(dtype)], rank)

    def output(self, value, name, dtype, rank):
        super().output(value, name, onnxproto._ELEM[np.dtype(dtype)], rank)

    def cast(self, value, dtype):
        return self.node("Cast", [value], to=onnxproto._ELEM[np.dtype(dtype)])


VARIANTS = [(c, f) for c in (False, True) for f in (False, True)]


def _old_sampler(monkeypatch, controlled, filtered) -> bytes:
    with monkeypatch.context() as m:
        m.setattr(graphs, "Graph", HandWritten)
        return sampler._graph(controlled, filtered)


@pytest.mark.parametrize("controlled,filtered", VARIANTS)
def test_sampler_graph_is_byte_for_byte_the_hand_written_one(monkeypatch, controlled, filtered):
    assert sampler._graph(controlled, filtered) == _old_sampler(monkeypatch, controlled, filtered)


@pytest.mark.parametrize("name", ["identity_model", "gather_rows_model", "concat_rows_model"])
def test_one_node_graphs_are_byte_for_byte_the_hand_written_ones(name):
    assert getattr(graphs, name)() == getattr(onnxproto, name)()


@pytest.mark.parametrize("controlled,filtered", VARIANTS)
def test_sampler_graph_picks_as_the_hand_written_one_on_random_inputs(monkeypatch, controlled, filtered):
    new = ort.InferenceSession(sampler._graph(controlled, filtered), providers=sampler.CPU)
    old = ort.InferenceSession(_old_sampler(monkeypatch, controlled, filtered), providers=sampler.CPU)
    rng = np.random.default_rng(7)
    for rows, vocab in ((1, 2), (5, 65), (32, 97)):
        feeds = {
            "logits": rng.normal(0, 3, (rows, 1, vocab)).astype(np.float32),
            "temperature": rng.choice([0.0, 0.5, 1.0, 1.7], rows).astype(np.float32),
            "top_k": rng.choice([0, 1, 3, vocab], rows).astype(np.int64),
            "top_p": rng.choice([0.3, 0.9, 1.0], rows).astype(np.float32),
            "u": rng.random(rows, dtype=np.float32),
        }
        if controlled:
            feeds.update(bias=rng.normal(0, 1, (rows, vocab)).astype(np.float32),
                         counts=rng.integers(0, 3, (rows, vocab)).astype(np.float32),
                         presence=rng.random(rows, dtype=np.float32), frequency=rng.random(rows, dtype=np.float32),
                         repetition=(1 + rng.random(rows, dtype=np.float32)), n_top=np.array([min(3, vocab)]))
        for a, b in zip(new.run(None, feeds), old.run(None, feeds), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
