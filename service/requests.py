"""A request before and after its checks: what the front-ends hand over, and what the engine accepts.

``GenerateFields`` and ``ScoreFields`` are a caller's request as sent, with no
transport in them: gRPC (``validation.generate_fields``) and HTTP
(``http_api``) each turn theirs into one, and validation reads nothing else
(TGI's GenerateRequest before its ValidGenerateRequest).
``validation.validate_request`` builds every ``GenerationRequest`` a server
handles, so an unvalidated request cannot reach the engine's queue. The
engine client derives the samples of a request with n > 1 from it
(``dataclasses.replace`` of the seed), and bench/standin.py builds its own for
a stand-in engine with no server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class GenerateFields:
    """A Generate request's fields as the caller sent them, unchecked (the proto's names and meanings)."""

    model: str = ""
    prime: str = ""
    max_chars: int = 0
    temperature: float | None = None  # None: not sent (1)
    top_k: int = 0
    top_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: not sent (one is drawn)
    request_id: str = ""
    logprobs: int = 0
    n: int = 0
    logit_bias: dict[str, float] = field(default_factory=dict)
    allowed_chars: str = ""
    regex: str = ""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0
    resume_text: str = ""


@dataclass(frozen=True)
class ScoreFields:
    """A Score request's fields as the caller sent them, unchecked."""

    model: str = ""
    prime: str = ""
    text: str = ""
    top_logprobs: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # >= 0; 0 means greedy (argmax)
    top_k: int = 0  # 0 means off; otherwise sample among the k most likely characters
    top_p: float = 1.0  # in (0, 1]; 1 means off (the proto's 0 is mapped to 1)
    seed: int = 0  # seed of this stream's own generator (always set; drawn when the client gave none)


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    MATCH_COMPLETE = "match_complete"  # the text completely matches the regex; no character extends it


@dataclass(frozen=True)
class Controls:
    """What a request asks of the sampler beyond temperature, top-k and top-p (validation.py checks it)."""

    bias: np.ndarray | None = None  # float32 [V]: logit_bias, and -inf outside allowed_chars; None: none
    regex: str = ""  # the generated text must match it (constraints.py)
    allowed: str = ""  # allowed_chars, also part of the regex's automaton
    presence: float = 0.0  # presence_penalty
    frequency: float = 0.0  # frequency_penalty
    repetition: float = 1.0  # repetition_penalty (1 = off)


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
    logprobs: int = 0  # alternatives per character in the log-probabilities; 0 = none
    n: int = 1  # samples; sample i draws with seed + i
    controls: Controls | None = None
    # A resumed stream (resume_text): the characters the caller already has, as ids, read after the prime and
    # counted as generated; and, when they already end the stream, how (no new character is drawn).
    resume_ids: np.ndarray | None = None  # int64 [R], R <= max_chars; None: a fresh stream
    resumed_end: FinishReason | None = None


@dataclass(frozen=True)
class ScoreJob:
    """A validated Score request: the model reads ``tokens`` and reports the text's log-probabilities."""

    request_id: str
    prime: str
    text: str
    tokens: np.ndarray  # int64 [len(prime) or 1, then len(text)]: the prime's ids (a newline for ""), the text's
    top: int  # alternatives per character
    deadline: float | None = None
    arrived: float = 0.0


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
    resumed_chars: int = 0  # characters of resume_text continued from (counted in generated_chars)


@dataclass
class GenerationResult:
    finish_reason: FinishReason
    stats: GenerationStats
    score: object | None = None  # a ScoreJob's answer: protocol.ScoreResult
