"""What crosses between the front-ends and the engine cores: msgpack maps whose arrays travel as raw bytes.

Every message is one msgpack map with a type field ``t``; numpy arrays inside
are packed as an extension (dtype, shape, bytes), so a step's ids for thousands
of streams are one memory copy, not a list of Python ints. The message types
(docs/engine.md has the whole exchange):

front-end -> core
    hello     a front-end announces itself (``primary``: it records the metrics)
    work      admissions (``add``: one map per new stream) and cancels (``cancel``: front-end rows)
    drain     no new streams; exit once idle          (from the supervisor)
    stop      end every stream now and exit          (from the supervisor)
    gone      a front-end process died: free its slots (from the supervisor)

core -> front-end
    loaded    the model file loaded; the trial step runs now (to the supervisor, which watches it like any step)
    up        the trial step passed: the model's metadata properties; the core serves (to the supervisor)
    refused   the model file cannot be served: the reason (to the supervisor)
    out       per step, this front-end's rows and their new ids (and log-probabilities when asked); ends;
              load; to the primary, metric deltas; its last one has ``failed``: the reason the engine is exiting
"""

from __future__ import annotations

import msgpack
import numpy as np

_NDARRAY = 1  # msgpack extension type of a numpy array


def _default(obj):
    if isinstance(obj, np.ndarray):
        obj = np.ascontiguousarray(obj)
        return msgpack.ExtType(_NDARRAY, msgpack.packb((obj.dtype.str, obj.shape, obj.tobytes())))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send {type(obj).__name__}")


def _ext(code: int, data: bytes):
    if code != _NDARRAY:
        return msgpack.ExtType(code, data)
    dtype, shape, raw = msgpack.unpackb(data)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


def pack(message: dict) -> bytes:
    return msgpack.packb(message, default=_default)


def unpack(data: bytes) -> dict:
    """The message; its arrays are read-only views of ``data``."""
    return msgpack.unpackb(data, ext_hook=_ext, strict_map_key=False)
