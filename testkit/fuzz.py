"""Fuzzing Generate: Hypothesis draws every GenerateRequest field, a hand-made encoder puts it on the wire.

The protobuf library refuses to build a request with invalid UTF-8 or a
wrongly typed field, so requests are encoded here field by field (varints,
fixed32 floats, length-delimited strings) and sent as raw bytes on the method
path with identity serializers. That reaches the server with lone surrogates,
undecodable bytes, 64-bit values in 32-bit fields, NaN and infinities, unknown
fields, wrong wire types and cut-off messages. Every answer must be OK or a
documented status (never INTERNAL or UNKNOWN); an OK stream must stay within
its max_chars and the model's vocabulary and end with stats; health must stay
SERVING throughout.
"""

from __future__ import annotations

import collections
import math
import struct
import time

import grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from testkit import probes
from charrnn.v1 import generator_pb2 as pb

METHOD = "/charrnn.v1.Generator/Generate"
VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5  # protobuf wire types
UINT64_MAX = 2**64 - 1
MODELS = ("", "tiny", "tiny@1", "other", "other@1", "tiny@2", "nope", "tiny@0", "tiny@01", "tiny@-1", "TINY", ".",
          "..", "../tiny", "../../etc/passwd", "/etc/passwd", "tiny/1", "tiny/../other", "..%2ftiny", "%2e%2e",
          "tiny\x00", "tiny@1\x00", "tiny@1@1", "tiny@99999999999999999999999", "\\..\\tiny", "a" * 129, "tiny ")


# ---- the wire format, by hand ----

def varint(n: int) -> bytes:
    """Base-128 varint of n >= 0 (values past 64 bits make an over-long, malformed varint)."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def field_bytes(number: int, payload: bytes) -> bytes:
    return tag(number, LEN) + varint(len(payload)) + payload


def field_varint(number: int, value: int) -> bytes:
    return tag(number, VARINT) + varint(value)


def field_float(number: int, bits: bytes) -> bytes:
    return tag(number, FIXED32) + bits


# ---- strategies ----

def _text_bytes(alphabet: str) -> st.SearchStrategy[bytes]:
    """Bytes of a string field: in-vocabulary text, any Unicode (lone surrogates too), or raw bytes."""
    return st.one_of(
        st.text(alphabet=alphabet, max_size=200),
        st.text(st.characters(exclude_categories=()), max_size=200),  # includes lone surrogates
        st.text(alphabet=alphabet, min_size=3000, max_size=6000),  # longer than --max-prime-chars
    ).map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=200)


def _float_bits() -> st.SearchStrategy[bytes]:
    specials = st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, 3.4e38, 100.0,
                                100.00001, 1.0, 1.0000001, -1.0, 0.5])
    finite = st.floats(width=32, allow_nan=True, allow_infinity=True)
    return st.one_of(specials, finite).map(lambda x: struct.pack("<f", x)) | st.binary(min_size=4, max_size=4)


def _number() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 300), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, UINT64_MAX]),
                     st.integers(0, UINT64_MAX))


def _valid_fields(vocab: str) -> dict[str, st.SearchStrategy]:
    """A strategy per field that the server accepts (so the stream itself is exercised)."""
    f32 = lambda lo, hi: st.floats(lo, hi, width=32).map(lambda x: struct.pack("<f", x))  # noqa: E731
    return {
        "model": st.sampled_from(["", "tiny", "tiny@1", "other"]).map(str.encode),
        "prime": st.text(alphabet=vocab, max_size=100).map(str.encode),
        "max_chars": st.integers(1, 64),
        "temperature": f32(0.0, 2.0) | st.sampled_from([struct.pack("<f", 0.0), struct.pack("<f", 100.0)]),
        "top_k": st.integers(0, 70),
        "top_p": f32(0.0, 1.0),
        "seed": _number(),
        "stop": st.lists(st.text(alphabet=vocab, min_size=1, max_size=64).map(str.encode), max_size=16),
        "request_id": st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=128)
        .map(str.encode),
    }


def _wild_fields(vocab: str) -> dict[str, st.SearchStrategy]:
    """A strategy per field that goes past every rule: any bytes, any numbers, thousands of stop strings."""
    stop_item = st.text(alphabet=vocab, max_size=70).map(str.encode) | _text_bytes(vocab)
    many = st.tuples(stop_item, st.sampled_from([17, 100, 2000, 5000])).map(lambda t: [t[0]] * t[1])
    return {
        "model": st.sampled_from(MODELS).map(str.encode) | _text_bytes(vocab),
        "prime": _text_bytes(vocab),
        "max_chars": _number(),
        "temperature": _float_bits(),
        "top_k": _number(),
        "top_p": _float_bits(),
        "seed": _number(),
        "stop": st.lists(stop_item, max_size=20) | many,
        "request_id": st.sampled_from([b"a" * 128, b"a" * 129, b"tab\t", b"\xff"]) | _text_bytes(vocab),
    }


FIELDS = ("model", "prime", "max_chars", "temperature", "top_k", "top_p", "seed", "stop", "request_id")
DAMAGE = ("truncate", "unknown_field", "wrong_wire_type", "garbage", "overlong_varint", "group")


@st.composite
def requests(draw, vocab: str) -> dict:
    """One request as the fields it sets (None: left out, as proto3 allows) plus damage to its bytes.

    A third of the cases are valid, a third break one field, a third are wild
    throughout; one case in five also has its bytes damaged.
    """
    valid, wild = _valid_fields(vocab), _wild_fields(vocab)
    mode = draw(st.sampled_from(["valid", "one_wild", "wild"]))
    odd_one = draw(st.sampled_from(FIELDS))
    case = {}
    for name in FIELDS:
        use_wild = mode == "wild" or (mode == "one_wild" and name == odd_one)
        strategy = wild[name] if use_wild else valid[name]
        if name == "stop":
            case[name] = draw(strategy)
        elif name == "max_chars" and not use_wild:
            case[name] = draw(strategy)  # required: 0 would be refused
        else:
            case[name] = draw(st.none() | strategy)
    case["damage"] = draw(st.sampled_from(("none",) * 24 + DAMAGE))
    case["damage_at"] = draw(st.integers(0, 2**16))
    case["garbage"] = draw(st.binary(min_size=1, max_size=64))
    return case


def encode(case: dict) -> bytes:
    """The request's wire bytes, then the case's damage applied."""
    parts = []
    for number, name in ((1, "model"), (2, "prime"), (9, "request_id")):
        if case[name] is not None:
            parts.append(field_bytes(number, case[name]))
    for number, name in ((3, "max_chars"), (5, "top_k"), (7, "seed")):
        if case[name] is not None:
            parts.append(field_varint(number, case[name]))
    for number, name in ((4, "temperature"), (6, "top_p")):
        if case[name] is not None:
            parts.append(field_float(number, case[name]))
    parts.extend(field_bytes(8, s) for s in case["stop"])
    data = b"".join(parts)
    damage, at = case["damage"], case["damage_at"] % (len(data) + 1)
    if damage == "truncate":
        return data[:at]
    if damage == "unknown_field":
        return data + field_varint(1000, case["damage_at"]) + field_bytes(77, case["garbage"])
    if damage == "wrong_wire_type":  # max_chars as a string, prime as a varint
        return data + field_bytes(3, case["garbage"]) + field_varint(2, case["damage_at"])
    if damage == "garbage":
        return data[:at] + case["garbage"] + data[at:]
    if damage == "overlong_varint":  # 11 continuation bytes: longer than any 64-bit varint
        return data + tag(3, VARINT) + b"\xff" * 11 + b"\x01"
    if damage == "group":  # deprecated group wire types, unbalanced
        return data + tag(5, START_GROUP) + case["garbage"]
    return data


# ---- running ----

class Fuzzer:
    """Sends cases to one server and checks each answer; ``tally`` counts the outcomes."""

    def __init__(self, target: str, vocab: str, max_chars_limit: int, timeout: float = 30.0):
        self.target = target
        self.max_chars_limit = max_chars_limit  # the server's --max-chars
        self.vocab = set(vocab)
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
        self.call = self.channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        self.tally: collections.Counter = collections.Counter()
        self.sent = 0

    def close(self) -> None:
        self.channel.close()

    def check(self, data: bytes, max_chars: int | None) -> str:
        """Sends one request; returns its status name, raising AssertionError if the answer breaks a promise."""
        self.sent += 1
        text, last = "", None
        try:
            for raw in self.call(data, timeout=self.timeout):
                last = pb.GenerateResponse.FromString(raw)
                text += last.text
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            assert code in probes.DOCUMENTED, f"{code}: {e.details()}"
            if code == "INVALID_ARGUMENT":  # "<field> must be <rule>, got <value>"
                assert " must be " in (e.details() or ""), f"INVALID_ARGUMENT without a rule: {e.details()!r}"
        self.tally[code] += 1
        if code == "OK":
            assert last is not None and last.HasField("stats") and last.finish_reason != 0, "OK stream without stats"
            bound = min(max_chars, self.max_chars_limit) if max_chars is not None else self.max_chars_limit
            assert len(text) <= bound, f"{len(text)} characters for max_chars {max_chars}"
            outside = set(text) - self.vocab
            assert not outside, f"characters outside the vocabulary: {sorted(outside)!r}"
        if self.sent % 250 == 0:
            assert probes.health_status(self.target) == "SERVING", "health left SERVING"
        return code


def run_fuzz(target: str, vocab: str, max_chars_limit: int, cases: int, random_seed: int = 0) -> dict:
    """Sends ``cases`` Hypothesis cases (plus a few fixed ones); the first broken promise ends it, shrunk.

    ``max_chars_limit`` is the server's --max-chars (keep it small: every OK stream generates up to it).
    """
    fuzzer = Fuzzer(target, vocab, max_chars_limit)
    fixed = [b"\xff\xff\xff", b"\x12\x02\xc3\x28\x18\x05", b"", b"\x08", b"\x18" + b"\xff" * 11,
             b"\x0a\xff\xff\xff\xff\x0f"]
    started = time.monotonic()
    failure = ""

    @seed(random_seed)
    @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(case=requests(vocab))
    def one(case):
        # A uint32 field keeps the low 32 bits of a longer varint; damage may hide or repeat the field.
        known = case["damage"] in ("none", "unknown_field", "overlong_varint", "group")
        max_chars = (case["max_chars"] or 0) % 2**32 if known else None
        fuzzer.check(encode(case), max_chars)

    try:
        for data in fixed:
            fuzzer.check(data, None)
        one()
    except AssertionError as e:
        failure = f"{e}\n" + "\n".join(getattr(e, "__notes__", []))
    finally:
        fuzzer.close()
    health = probes.health_status(target)
    return {
        "seed": random_seed,
        "cases": fuzzer.sent,
        "codes": dict(sorted(fuzzer.tally.items())),
        "failure": failure,
        "health_after": health,
        "seconds": round(time.monotonic() - started, 1),
    }
