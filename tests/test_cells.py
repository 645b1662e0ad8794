"""cells.lower_cells: the exporter's LSTM / GRU / RNN operators as MatMul and element-wise nodes, one step.

The lowered model must give the operator's logits and state to float32 rounding, for every cell, with one and
two layers and an embedding narrower than the hidden size; the K-step graph built from it must draw the
operator graph's ids wherever no uniform falls within rounding of a boundary (all of them, in practice, on
these peaked models); a node it cannot lower is refused with its reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from charrnn.exporter.export import export_model
from charrnn.service.cells import lower_cells
from charrnn.service.decode_graph import DecodeGraph
from charrnn.service.sampling import uniforms
from testkit.modelfactory import DEFAULT_VOCAB, make_model

V = len(DEFAULT_VOCAB)
SHAPES = [("lstm", 2, 16, 0), ("lstm", 1, 24, 8), ("gru", 2, 16, 0), ("gru", 1, 12, 6), ("rnn", 2, 8, 0)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}-embed{s[3]}")
def exported(request, tmp_path_factory):
    cell, layers, hidden, embed = request.param
    model = make_model(cell=cell, layers=layers, hidden=hidden, embed_dim=embed, seed=layers * 10 + hidden)
    with torch.no_grad():
        model.head.weight.mul_(6.0)  # peaked logits, so that greedy and sampled rows differ
    path = tmp_path_factory.mktemp("cells") / f"{cell}.onnx"
    export_model(model, list(DEFAULT_VOCAB), path, corpus_sha256="0" * 64, check=False)
    return path, layers, hidden


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_lowered_step_gives_the_operators_logits_and_state(exported):
    path, layers, hidden = exported
    model = onnx.load(str(path))
    lowered = lower_cells(model)
    ops = {n.op_type for n in lowered.graph.node}
    assert not ops & {"LSTM", "GRU", "RNN"} and "MatMul" in ops
    want, got = session(model), session(lowered)
    rng = np.random.default_rng(layers * hidden)
    for batch in (1, 5, 64):
        feeds = {"tokens": rng.integers(0, V, (batch, 1)).astype(np.int64)}
        for i in want.get_inputs()[1:]:
            feeds[i.name] = (0.7 * rng.standard_normal((layers, batch, hidden))).astype(np.float32)
        for a, b in zip(want.run(None, feeds), got.run(None, feeds)):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)


def test_the_lowered_k_step_graph_draws_the_operator_graphs_ids(exported):
    path, layers, hidden = exported
    batch, steps = 32, 6
    op, lowered = DecodeGraph(path, steps, threads=1), DecodeGraph(path, steps, threads=1, lowered=True)
    rng = np.random.default_rng(7)
    seeds = rng.integers(0, 2**63, batch).astype(np.uint64)
    u = np.stack([uniforms(seeds, np.full(batch, k)) for k in range(steps)], axis=1).astype(np.float32)
    temperature = rng.choice([0.0, 0.5, 1.0], batch).astype(np.float32)
    ids = rng.integers(0, V, batch).astype(np.int64)
    state = tuple((0.5 * rng.standard_normal((layers, batch, hidden))).astype(np.float32)
                  for _ in op.state_inputs)
    top_k, top_p = np.zeros(batch, np.int64), np.ones(batch, np.float32)
    a, sa = op.run(ids, state, temperature, top_k, top_p, u)
    b, sb = lowered.run(ids, state, temperature, top_k, top_p, u)
    assert np.array_equal(a, b)
    for x, y in zip(sa, sb):
        np.testing.assert_allclose(y, x, atol=1e-4)


def _model_with(node: onnx.NodeProto, hidden: int = 4) -> onnx.ModelProto:
    w = helper.make_tensor("W", onnx.TensorProto.FLOAT, [1, 4 * hidden, 3], np.zeros(12 * hidden))
    r = helper.make_tensor("R", onnx.TensorProto.FLOAT, [1, 4 * hidden, hidden], np.zeros(4 * hidden * hidden))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 2, 3]),
                                            helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [1, 2, hidden]),
                                            helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 2, hidden])],
                              [helper.make_tensor_value_info("Y_h", onnx.TensorProto.FLOAT, [1, 2, hidden])],
                              initializer=[w, r])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("attrs, inputs, why", [
    ({"direction": "bidirectional"}, ["X", "W", "R", "", "", "h", "c"], "only forward"),
    ({"clip": 3.0}, ["X", "W", "R", "", "", "h", "c"], "clip"),
    ({"activations": ["Relu", "Tanh", "Tanh"]}, ["X", "W", "R", "", "", "h", "c"], "activations"),
    ({}, ["X", "W", "R", "", "", "", "c"], "initial state"),
])
def test_a_cell_it_cannot_lower_is_refused_with_the_reason(attrs, inputs, why):
    node = helper.make_node("LSTM", inputs, ["", "Y_h"], hidden_size=4, **attrs)
    with pytest.raises(ValueError, match=why):
        lower_cells(_model_with(node))
