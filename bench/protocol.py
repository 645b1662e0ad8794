"""Encoding and decoding the core's per-call message: typed msgspec structs against msgpack over dicts.

    python -m bench.protocol [--streams 1,128,1024] [--repeat 2000]

The message is what a core sends a front-end for one call of the engine: one
Step (rows, ids, hold) for ``streams`` rows and a few ends. The baseline, in
the same run, is the encoding the service used before service/protocol.py:
msgpack maps with the arrays as msgpack extensions, and ends as positional
lists. Each row is the median of 5 batches of ``repeat`` round trips.
"""

from __future__ import annotations

import argparse
import statistics
import time

import msgpack
import numpy as np

from charrnn.service import protocol


def _default(obj):
    if isinstance(obj, np.ndarray):
        obj = np.ascontiguousarray(obj)
        return msgpack.ExtType(1, msgpack.packb((obj.dtype.str, obj.shape, obj.tobytes())))
    raise TypeError(type(obj).__name__)


def _ext(code: int, data: bytes):
    dtype, shape, raw = msgpack.unpackb(data)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


def messages(streams: int) -> tuple[protocol.Out, dict]:
    rows = np.arange(streams, dtype=np.int32)
    ids = (rows * 7 % 65).astype(np.int32)
    hold = np.zeros(streams, np.int32)
    ends = [protocol.End(row=i, code="OK", reason="length", generated=300, admitted=1.0, first=1.01, last=2.0)
            for i in range(4)]
    typed = protocol.Out(steps=[protocol.Step(rows, ids, hold)], ends=ends, load=(streams, 0), busy=True)
    plain = {"t": "out", "steps": [(rows, ids, hold, None)], "load": (streams, 0), "busy": True,
             "ends": [[e.row, e.code, e.reason, e.message, e.stop, e.generated, e.admitted, e.first, e.last, 0]
                      for e in ends]}
    return typed, plain


def timed(round_trip, repeat: int) -> float:
    """Median microseconds of one encode + decode."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            round_trip()
        runs.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", default="1,128,1024")
    p.add_argument("--repeat", type=int, default=2000)
    a = p.parse_args()
    print("One core-to-front-end message per call, encode + decode, median of 5 x "
          f"{a.repeat} (`python -m bench.protocol --streams {a.streams} --repeat {a.repeat}`)\n")
    print("| streams | msgpack over dicts (before) | msgspec structs | ratio | bytes before | bytes now |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in [int(x) for x in a.streams.split(",")]:
        typed, plain = messages(n)
        typed_bytes, plain_bytes = protocol.encode(typed), msgpack.packb(plain, default=_default)
        assert protocol.decode_to_frontend(typed_bytes).steps[0].ids.tolist() == typed.steps[0].ids.tolist()
        before = timed(lambda: msgpack.unpackb(msgpack.packb(plain, default=_default), ext_hook=_ext,
                                               strict_map_key=False), a.repeat)
        now = timed(lambda: protocol.decode_to_frontend(protocol.encode(typed)), a.repeat)
        print(f"| {n} | {before:.1f} µs | {now:.1f} µs | {now / before:.2f}x | {len(plain_bytes)} | "
              f"{len(typed_bytes)} |")


if __name__ == "__main__":
    main()
