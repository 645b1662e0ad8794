"""The validated form of a generation request: what the engine accepts.

Only ``validation.validate_request`` builds a ``GenerationRequest``, so an
unvalidated request cannot reach the engine's queue.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # >= 0; 0 means greedy (argmax)
    top_k: int = 0  # 0 means off; otherwise sample among the k most likely characters
    top_p: float = 1.0  # in (0, 1]; 1 means off (the proto's 0 is mapped to 1)
    seed: int = 0  # seed of this stream's own generator (always set; drawn when the client gave none)


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prime: str  # what the client sent (may be "")
    prime_ids: np.ndarray  # int64 [T >= 1]: the prime as token ids (a newline when prime is "")
    max_chars: int  # >= 1
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    deadline: float | None = None  # time.monotonic() by which the stream must end
    arrived: float = 0.0  # time.monotonic() when the request arrived


@dataclass
class GenerationStats:
    model: str = ""  # "name@version"
    prime_chars: int = 0
    generated_chars: int = 0
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    total_seconds: float = 0.0
    stop_sequence: str = ""
    seed: int = 0


@dataclass
class GenerationResult:
    finish_reason: FinishReason
    stats: GenerationStats
