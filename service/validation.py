"""The one place that turns a GenerateRequest into a GenerationRequest, or refuses it.

Every rule raises ``errors.InvalidArgument`` with a message of the form
"<field> must be <rule>, got <value>" (plus the flag that changes a server limit),
before any model work is done. The engine accepts only what this module builds.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass

import numpy as np

from charrnn.modelfile import ModelMetadata, describe_char
from charrnn.service import errors
from charrnn.service.requests import GenerationRequest, SamplingParams
from charrnn.v1 import generator_pb2

MAX_TEMPERATURE = 100.0
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 64  # characters per stop sequence
MAX_REQUEST_ID_CHARS = 128
MAX_SHOWN_CHARS = 10  # offending prime characters named in one message


@dataclass(frozen=True)
class Limits:
    """Server-wide caps on one request (flags of charrnn-serve)."""

    max_chars: int = 10000  # largest max_chars a request may ask for (--max-chars)
    max_prime_chars: int = 4096  # longest prime, in characters (--max-prime-chars)


class _Shown:
    """A value that an error message shows as written (InvalidArgument shows other values with repr)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def request_id_of(req: generator_pb2.GenerateRequest) -> str:
    """The request's own id when it is valid, or a new one when it is empty."""
    rid = req.request_id
    if not rid:
        return uuid.uuid4().hex[:16]
    if len(rid) > MAX_REQUEST_ID_CHARS or not all(" " <= ch <= "~" for ch in rid):
        raise errors.InvalidArgument(
            "request_id", rid, f"at most {MAX_REQUEST_ID_CHARS} printable ASCII characters"
        )
    return rid


def validate_request(
    req: generator_pb2.GenerateRequest,
    metadata: ModelMetadata,
    limits: Limits,
    *,
    now: float,
    deadline: float | None,
    request_id: str | None = None,
) -> GenerationRequest:
    """Checks every field against ``metadata`` (the model) and ``limits`` (the server).

    ``now`` is the request's arrival (time.monotonic()); ``deadline`` the monotonic
    time by which the stream must end, or None. ``request_id`` is the id already
    chosen by the caller (made up here when None).
    """
    rid = request_id if request_id is not None else request_id_of(req)

    if not 1 <= req.max_chars <= limits.max_chars:
        hint = "the server's --max-chars sets the upper bound" if req.max_chars > limits.max_chars else ""
        raise errors.InvalidArgument("max_chars", req.max_chars, f"in [1, {limits.max_chars}]", hint)

    prime = req.prime
    if len(prime) > limits.max_prime_chars:
        raise errors.InvalidArgument(
            "prime",
            _Shown(f"{len(prime)} characters"),
            f"at most {limits.max_prime_chars} characters long",
            "the server's --max-prime-chars sets the limit",
        )
    index = metadata.index
    outside = list(dict.fromkeys(ch for ch in prime if ch not in index))  # distinct, in order of appearance
    if outside:
        shown = ", ".join(describe_char(ch) for ch in outside[:MAX_SHOWN_CHARS])
        if len(outside) > MAX_SHOWN_CHARS:
            shown += f" and {len(outside) - MAX_SHOWN_CHARS} more"
        raise errors.InvalidArgument(
            "prime",
            _Shown(f"{len(outside)} character{'s' if len(outside) > 1 else ''} outside it: {shown}"),
            f"made of characters in the model's vocabulary ({metadata.vocab_size} characters)",
        )
    prime_ids = np.array(metadata.encode(prime), dtype=np.int64)  # "" reads a newline (see the proto)

    temperature = float(req.temperature) if req.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise errors.InvalidArgument(
            "temperature", temperature, f"a finite number in [0, {MAX_TEMPERATURE:g}] (0 means greedy)"
        )

    top_p = float(req.top_p)
    if not (math.isfinite(top_p) and 0.0 <= top_p <= 1.0):
        raise errors.InvalidArgument("top_p", top_p, "in [0, 1] (0 or 1 means off)")
    if top_p == 0.0:
        top_p = 1.0

    # top_k at or above the vocabulary size keeps every character: the same as off.
    top_k = int(req.top_k) if req.top_k < metadata.vocab_size else 0

    if len(req.stop) > MAX_STOP_SEQUENCES:
        shown = _Shown(f"{len(req.stop)} sequences")
        raise errors.InvalidArgument("stop", shown, f"at most {MAX_STOP_SEQUENCES} sequences")
    for i, seq in enumerate(req.stop):
        if not 1 <= len(seq) <= MAX_STOP_CHARS:
            shown = seq if not seq else _Shown(f"{len(seq)} characters")
            rule = f"a non-empty string of at most {MAX_STOP_CHARS} characters"
            raise errors.InvalidArgument(f"stop[{i}]", shown, rule)

    seed = int(req.seed) if req.HasField("seed") else secrets.randbits(63)

    return GenerationRequest(
        request_id=rid,
        prime=prime,
        prime_ids=prime_ids,
        max_chars=int(req.max_chars),
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        stop=tuple(req.stop),
        deadline=deadline,
        arrived=now,
    )
