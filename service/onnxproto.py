"""A small ONNX graph writer for the service's own graphs.

The service runs without the ``onnx`` package, yet needs graphs of its own: one
to prove that a CUDA session really works (device probe), two that gather and
join rows of the recurrent state on the GPU, and the sampler (sampler.py),
which runs on the model's device. They are written here as raw protobuf bytes
(field numbers from onnx/onnx.proto), which onnxruntime loads directly.
``Graph`` builds a graph of several nodes with constants and attributes.
"""

from __future__ import annotations

import struct

import numpy as np

FLOAT = 1  # TensorProto.FLOAT
BOOL = 9  # TensorProto.BOOL
INT32 = 6  # TensorProto.INT32
INT64 = 7  # TensorProto.INT64
_ELEM = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64, np.dtype(np.int32): INT32,
         np.dtype(np.bool_): BOOL}
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7  # AttributeProto.AttributeType
_IR_VERSION = 8
_OPSET = 13


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are written as their two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes | str | int) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes and strings."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _attribute(name: str, value) -> bytes:
    if isinstance(value, float):
        return _field(1, name) + _varint(2 << 3 | 5) + struct.pack("<f", value) + _field(20, _ATTR_FLOAT)
    if isinstance(value, (list, tuple)):
        return _field(1, name) + b"".join(_field(8, int(v)) for v in value) + _field(20, _ATTR_INTS)
    return _field(1, name) + _field(3, int(value)) + _field(20, _ATTR_INT)


def _tensor(name: str, value: np.ndarray) -> bytes:
    """TensorProto: dims, data type, name, little-endian raw data."""
    dims = b"".join(_field(1, int(d)) for d in value.shape)  # none for a scalar
    data = value.astype(value.dtype.newbyteorder("<")).tobytes(order="C")
    return dims + _field(2, _ELEM[value.dtype]) + _field(8, name) + _field(9, data)


class Graph:
    """Nodes, constants, inputs and outputs of one graph; ``model()`` is the serialized ModelProto.

        g = Graph("sampler")
        x = g.input("x", FLOAT, 2)
        y = g.node("Exp", [x])
        g.output(y, "y", FLOAT, 2)
    """

    def __init__(self, name: str):
        self.name = name
        self._nodes: list[bytes] = []
        self._inputs: list[bytes] = []
        self._outputs: list[bytes] = []
        self._constants: list[bytes] = []
        self._count = 0

    def input(self, name: str, elem_type: int, rank: int) -> str:
        self._inputs.append(_value_info(name, elem_type, rank))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A constant tensor (an initializer); a Python number becomes a scalar."""
        name = f"c{len(self._constants)}"
        self._constants.append(_tensor(name, np.asarray(value, dtype)))
        return name

    def node(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs) -> str | tuple[str, ...]:
        """Adds ``op_type(inputs)``; returns its output name (or names, when ``outputs`` > 1)."""
        names = tuple(f"t{self._count}_{i}" for i in range(outputs))
        self._count += 1
        body = b"".join(_field(1, i) for i in inputs) + b"".join(_field(2, o) for o in names)
        body += _field(4, op_type)
        body += b"".join(_field(5, _attribute(k, v)) for k, v in attrs.items())
        self._nodes.append(body)
        return names[0] if outputs == 1 else names

    def output(self, value: str, name: str, elem_type: int, rank: int) -> None:
        """Names graph output ``name`` as ``value`` (through an Identity node)."""
        body = _field(1, value) + _field(2, name) + _field(4, "Identity")
        self._nodes.append(body)
        self._outputs.append(_value_info(name, elem_type, rank))

    def model(self, opset: int = _OPSET) -> bytes:
        graph = b"".join(_field(1, n) for n in self._nodes) + _field(2, self.name)
        graph += b"".join(_field(5, t) for t in self._constants)
        graph += b"".join(_field(11, v) for v in self._inputs)
        graph += b"".join(_field(12, v) for v in self._outputs)
        return _field(1, _IR_VERSION) + _field(7, graph) + _field(8, _field(1, "") + _field(2, opset))


def _value_info(name: str, elem_type: int, rank: int) -> bytes:
    # TypeProto.Tensor: elem_type, then a shape of `rank` symbolic dimensions (dim_param).
    dims = b"".join(_field(1, _field(2, f"{name}_{i}")) for i in range(rank))
    tensor_type = _field(1, elem_type) + _field(2, dims)
    return _field(1, name) + _field(2, _field(1, tensor_type))


def _node(op_type: str, inputs: list[str], outputs: list[str], axis: int | None = None) -> bytes:
    body = b"".join(_field(1, i) for i in inputs) + b"".join(_field(2, o) for o in outputs)
    body += _field(4, op_type)
    if axis is not None:
        attr = _field(1, "axis") + _field(3, axis) + _field(20, _ATTR_INT)
        body += _field(5, attr)
    return body


def graph_model(
    op_type: str,
    inputs: list[tuple[str, int, int]],
    outputs: list[tuple[str, int, int]],
    axis: int | None = None,
) -> bytes:
    """Serialized ModelProto of one node ``op_type(inputs) -> outputs``; (name, elem type, rank)."""
    graph = _field(1, _node(op_type, [v[0] for v in inputs], [v[0] for v in outputs], axis))
    graph += _field(2, f"charrnn_{op_type.lower()}")
    graph += b"".join(_field(11, _value_info(*v)) for v in inputs)
    graph += b"".join(_field(12, _value_info(*v)) for v in outputs)
    opset = _field(1, "") + _field(2, _OPSET)
    return _field(1, _IR_VERSION) + _field(7, graph) + _field(8, opset)


def identity_model() -> bytes:
    """x -> x (float): the smallest graph a provider can be asked to run."""
    return graph_model("Identity", [("x", FLOAT, 1)], [("y", FLOAT, 1)])


def gather_rows_model() -> bytes:
    """state [L, B, H], rows int64 [n] -> state[:, rows, :] [L, n, H]."""
    return graph_model("Gather", [("state", FLOAT, 3), ("rows", INT64, 1)], [("out", FLOAT, 3)], axis=1)


def concat_rows_model() -> bytes:
    """a [L, B1, H], b [L, B2, H] -> [L, B1 + B2, H]."""
    return graph_model("Concat", [("a", FLOAT, 3), ("b", FLOAT, 3)], [("out", FLOAT, 3)], axis=1)
