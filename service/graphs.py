"""The service's own small ONNX graphs, built with the ``onnx`` package.

Besides the model file, the service runs graphs of its own: one that proves a
CUDA session really works (the device probe, runtime.py), two that gather and
join rows of the recurrent state on the GPU and the identity again to copy it into
a bound buffer (cudaops.py), and the sampler
(sampler.py), which runs on the model's device. They are built with
onnx.helper, checked by onnx.checker (with shape inference) and handed to
onnxruntime as serialized bytes. ``Graph`` builds a graph of several nodes with
constants and attributes.

Importing onnx costs about 0.7 s of CPU (most of it ml_dtypes, which onnx
imports), so runtime.py and sampler.py import this module only when they build
a graph: a front-end process never does, and never pays it.
"""

from __future__ import annotations

import numpy as np
from onnx import checker, helper, numpy_helper

IR_VERSION = 8  # onnxruntime has read it since 1.10
OPSET = 13


def _elem(dtype) -> int:
    """TensorProto element type of a numpy dtype (np.float32 -> FLOAT)."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _value_info(name: str, dtype, rank: int):
    # A tensor of `rank` symbolic dimensions, named <name>_0, <name>_1, ...
    return helper.make_tensor_value_info(name, _elem(dtype), [f"{name}_{i}" for i in range(rank)])


def _serialized(graph) -> bytes:
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])
    checker.check_model(model, full_check=True)
    return model.SerializeToString()


class Graph:
    """Nodes, constants, inputs and outputs of one graph; ``model()`` is the serialized ModelProto.

        g = Graph("sampler")
        x = g.input("x", np.float32, 2)
        y = g.node("Exp", [x])
        g.output(y, "y", np.float32, 2)
    """

    def __init__(self, name: str):
        self.name = name
        self._nodes: list = []
        self._inputs: list = []
        self._outputs: list = []
        self._constants: list = []
        self._count = 0

    def input(self, name: str, dtype, rank: int) -> str:
        self._inputs.append(_value_info(name, dtype, rank))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A constant tensor (an initializer); a Python number becomes a scalar."""
        name = f"c{len(self._constants)}"
        self._constants.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs) -> str | tuple[str, ...]:
        """Adds ``op_type(inputs)``; returns its output name (or names, when ``outputs`` > 1)."""
        names = tuple(f"t{self._count}_{i}" for i in range(outputs))
        self._count += 1
        self._nodes.append(helper.make_node(op_type, inputs, names, **attrs))
        return names[0] if outputs == 1 else names

    def cast(self, value: str, dtype) -> str:
        """``value`` as ``dtype`` (np.float32, np.int64)."""
        return self.node("Cast", [value], to=_elem(dtype))

    def output(self, value: str, name: str, dtype, rank: int) -> None:
        """Names graph output ``name`` as ``value`` (through an Identity node)."""
        self._nodes.append(helper.make_node("Identity", [value], [name]))
        self._outputs.append(_value_info(name, dtype, rank))

    def model(self) -> bytes:
        return _serialized(helper.make_graph(self._nodes, self.name, self._inputs, self._outputs,
                                             initializer=self._constants))


def _one_node(op_type: str, inputs: list[tuple], outputs: list[tuple], **attrs) -> bytes:
    """Serialized ModelProto of one node ``op_type(inputs) -> outputs``; each (name, dtype, rank)."""
    node = helper.make_node(op_type, [v[0] for v in inputs], [v[0] for v in outputs], **attrs)
    return _serialized(helper.make_graph([node], f"charrnn_{op_type.lower()}", [_value_info(*v) for v in inputs],
                                         [_value_info(*v) for v in outputs]))


def identity_model(rank: int = 1) -> bytes:
    """x -> y = x (float, of ``rank``): the smallest graph a provider can be asked to run; at rank 3 with y bound
    to a buffer of its own, a copy of the state into the fixed buffers of a bound K-step call (cudaops.py)."""
    return _one_node("Identity", [("x", np.float32, rank)], [("y", np.float32, rank)])


def gather_rows_model() -> bytes:
    """state [L, B, H], rows int64 [n] -> state[:, rows, :] [L, n, H]."""
    return _one_node("Gather", [("state", np.float32, 3), ("rows", np.int64, 1)], [("out", np.float32, 3)], axis=1)


def concat_rows_model() -> bytes:
    """a [L, B1, H], b [L, B2, H] -> [L, B1 + B2, H]."""
    return _one_node("Concat", [("a", np.float32, 3), ("b", np.float32, 3)], [("out", np.float32, 3)], axis=1)
