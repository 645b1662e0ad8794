"""A model's recurrent operators lowered to MatMul and element-wise nodes, for one step at a time.

The exporter writes ONNX's ``LSTM``, ``GRU`` and ``RNN`` operators (one per
layer, forward, the default activations, no peepholes, no clipping). Their
kernels are opaque to onnxruntime's graph tooling: on CUDA the LSTM operator's
cuDNN path sets up descriptors and copies host arrays on each call, which may
not survive a CUDA graph capture. ``lower_cells`` rewrites each such node,
for an input of one time step, into the cell's own arithmetic (ONNX's
definitions, gate orders i-o-f-c for LSTM and z-r-h for GRU):

- LSTM: ``g = x W^T + h R^T + Wb + Rb``; ``c' = σ(f) c + σ(i) tanh(c~)``;
  ``h' = σ(o) tanh(c')``;
- GRU (``linear_before_reset`` as the exporter writes it, 1, or 0);
- RNN: ``h' = tanh(x W^T + h R^T + Wb + Rb)``.

Input and recurrent weights are joined into one [in + H, gates] matrix, so a
layer is one MatMul of ``[x, h]``, and the two biases are added once. The
node's three outputs keep their names and shapes ([1, 1, B, H] and
[1, B, H] twice), so the rest of the graph does not change. The arithmetic is
the operator's but the kernels are not: results agree to float32 rounding,
not bit for bit (tests/test_cells.py), so a seeded stream served by a lowered
graph may draw a different character where a uniform falls within rounding of
a boundary. The engine does not use it; ``bench.kstep --lowered`` measures it
against the operator (on a GPU, also under CUDA graphs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

CELLS = ("LSTM", "GRU", "RNN")
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def lower_cells(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose LSTM / GRU / RNN nodes are MatMul and element-wise nodes, valid for inputs
    of one time step (the decode step's); raises ValueError on a node this does not lower (bidirectional,
    other activations, clipping, peepholes, sequence lengths)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, added = [], []
    for node in graph.node:
        if node.op_type not in CELLS:
            nodes.append(node)
            continue
        cell = _Cell(node, inits, len(added))
        nodes.extend(cell.nodes)
        added.extend(cell.initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    onnx.checker.check_model(out)
    return out


class _Cell:
    """The nodes and initializers that replace one recurrent node."""

    def __init__(self, node: onnx.NodeProto, inits: dict, serial: int):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        activations = [a.decode() if isinstance(a, bytes) else a for a in attrs.pop("activations", [])]
        if activations and activations != DEFAULT_ACTIVATIONS[node.op_type]:
            raise ValueError(f"{node.name or node.op_type}: activations {activations} are not lowered (only "
                             f"{DEFAULT_ACTIVATIONS[node.op_type]})")
        for name in ("activation_alpha", "activation_beta", "clip"):
            if name in attrs:
                raise ValueError(f"{node.name or node.op_type}: attribute {name} is not lowered")
        if attrs.get("direction", b"forward") not in (b"forward", "forward"):
            raise ValueError(f"{node.name or node.op_type}: only forward cells are lowered")
        if attrs.get("layout", 0):
            raise ValueError(f"{node.name or node.op_type}: only layout 0 is lowered")
        inputs = list(node.input) + [""] * (8 - len(node.input))
        if inputs[4]:
            raise ValueError(f"{node.name or node.op_type}: sequence_lens is not lowered")
        if node.op_type == "LSTM" and inputs[7]:
            raise ValueError(f"{node.name or node.op_type}: peepholes are not lowered")
        if not inputs[5]:
            raise ValueError(f"{node.name or node.op_type}: an initial state is needed")
        self.op, self.prefix = node.op_type, f"lowered{serial}/{node.name or node.op_type}/"
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        w = numpy_helper.to_array(inits[inputs[1]])[0]  # [gates * H, in]
        r = numpy_helper.to_array(inits[inputs[2]])[0]  # [gates * H, H]
        hidden = r.shape[1]
        gates = w.shape[0] // hidden
        b = numpy_helper.to_array(inits[inputs[3]])[0] if inputs[3] else np.zeros(2 * gates * hidden, np.float32)
        wb, rb = b[: gates * hidden], b[gates * hidden:]
        self.axis0 = self.const("axis0", np.array([0], np.int64))
        x = self.node("Squeeze", [inputs[0], self.axis0])  # [B, in]
        h = self.node("Squeeze", [inputs[5], self.axis0])  # [B, H]
        y = getattr(self, f"_{self.op.lower()}")(x, h, w, r, wb, rb, hidden, attrs, inputs)
        h_new, c_new = y if isinstance(y, tuple) else (y, None)
        outputs = list(node.output) + [""] * (3 - len(node.output))
        if outputs[0]:
            self.node("Unsqueeze", [h_new, self.const("axes01", np.array([0, 1], np.int64))], outputs[0])
        if outputs[1]:
            self.node("Unsqueeze", [h_new, self.axis0], outputs[1])
        if outputs[2]:
            self.node("Unsqueeze", [c_new, self.axis0], outputs[2])

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or f"{self.prefix}{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        full = self.prefix + name
        if all(t.name != full for t in self.initializers):
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), full))
        return full

    def joined(self, x: str, h: str, w: np.ndarray, r: np.ndarray, bias: np.ndarray, name: str) -> str:
        """x W^T + h R^T + bias as one MatMul of [x, h] and one Add."""
        xh = self.node("Concat", [x, h], axis=1)
        weight = self.const(name, np.concatenate([w.T, r.T]).astype(np.float32))
        return self.node("Add", [self.node("MatMul", [xh, weight]), self.const(name + "_bias", bias.astype(np.float32))])

    def split(self, g: str, n: int, hidden: int) -> list[str]:
        """The ``n`` gates of ``g`` [B, n * H], each [B, H] (Slice: the same nodes at every opset)."""
        axis = self.const("axis1", np.array([1], np.int64))
        return [self.node("Slice", [g, self.const(f"start{i}", np.array([i * hidden], np.int64)),
                                    self.const(f"end{i}", np.array([(i + 1) * hidden], np.int64)), axis])
                for i in range(n)]

    def _lstm(self, x, h, w, r, wb, rb, hidden, attrs, inputs):
        if not inputs[6]:
            raise ValueError("LSTM: an initial cell state is needed")
        c = self.node("Squeeze", [inputs[6], self.axis0])
        i, o, f, cand = self.split(self.joined(x, h, w, r, wb + rb, "wr"), 4, hidden)
        c_new = self.node("Add", [self.node("Mul", [self.node("Sigmoid", [f]), c]),
                                  self.node("Mul", [self.node("Sigmoid", [i]), self.node("Tanh", [cand])])])
        h_new = self.node("Mul", [self.node("Sigmoid", [o]), self.node("Tanh", [c_new])])
        return h_new, c_new

    def _gru(self, x, h, w, r, wb, rb, hidden, attrs, inputs):
        H = hidden
        zr = self.joined(x, h, w[: 2 * H], r[: 2 * H], wb[: 2 * H] + rb[: 2 * H], "wr_zr")
        z, rr = (self.node("Sigmoid", [g]) for g in self.split(zr, 2, H))
        xh = self.node("Add", [self.node("MatMul", [x, self.const("w_h", w[2 * H:].T.astype(np.float32))]),
                               self.const("wb_h", wb[2 * H:].astype(np.float32))])
        rh_weight = self.const("r_h", r[2 * H:].T.astype(np.float32))
        if attrs.get("linear_before_reset", 0):  # r (h R^T + Rb)
            hh = self.node("Mul", [rr, self.node("Add", [self.node("MatMul", [h, rh_weight]),
                                                         self.const("rb_h", rb[2 * H:].astype(np.float32))])])
        else:  # (r h) R^T + Rb
            hh = self.node("Add", [self.node("MatMul", [self.node("Mul", [rr, h]), rh_weight]),
                                   self.const("rb_h", rb[2 * H:].astype(np.float32))])
        cand = self.node("Tanh", [self.node("Add", [xh, hh])])
        one_minus_z = self.node("Sub", [self.const("one", np.array(1.0, np.float32)), z])
        return self.node("Add", [self.node("Mul", [one_minus_z, cand]), self.node("Mul", [z, h])])

    def _rnn(self, x, h, w, r, wb, rb, hidden, attrs, inputs):
        return self.node("Tanh", [self.joined(x, h, w, r, wb + rb, "wr")])
