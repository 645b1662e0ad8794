"""A few-line ONNX graph writer for the service's own helper graphs.

The service runs without the ``onnx`` package, yet needs three tiny graphs of
its own: one to prove that a CUDA session really works (device probe), and two
that gather and join rows of the recurrent state on the GPU, so the state never
leaves the device between steps. They are written here as raw protobuf bytes
(field numbers from onnx/onnx.proto), which onnxruntime loads directly.
"""

from __future__ import annotations

FLOAT = 1  # TensorProto.FLOAT
INT64 = 7  # TensorProto.INT64
_ATTR_INT = 2  # AttributeProto.INT
_IR_VERSION = 8
_OPSET = 13


def _varint(n: int) -> bytes:
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
