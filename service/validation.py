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
from charrnn.service.constraints import RegexError, compile_regex
from charrnn.service.requests import (
    Controls,
    FinishReason,
    GenerateFields,
    GenerationRequest,
    SamplingParams,
    ScoreFields,
    ScoreJob,
)
from charrnn.v1 import generator_pb2

MAX_TEMPERATURE = 100.0
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 64  # characters per stop sequence
MAX_REQUEST_ID_CHARS = 128
MAX_SHOWN_CHARS = 10  # offending prime characters named in one message
MAX_LOGPROBS = 20  # alternatives per character (logprobs, top_logprobs)
MAX_BIAS = 100.0  # |logit_bias| per character
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's and vLLM's range)
MAX_REPETITION = 10.0


@dataclass(frozen=True)
class Limits:
    """Server-wide caps on one request (flags of charrnn-serve)."""

    max_chars: int = 10000  # largest max_chars a request may ask for (--max-chars)
    max_prime_chars: int = 4096  # longest prime, in characters (--max-prime-chars)
    max_n: int = 32  # most samples one request may ask for (--max-n)
    max_regex_states: int = 1000  # largest automaton a regex may make (--max-regex-states)
    max_score_chars: int = 10000  # longest text a Score request may send (--max-score-chars)


class Shown:
    """A value that an error message shows as written, a description rather than the value itself ("a list of 2
    prompts"); InvalidArgument shows other values with repr."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def request_id_of(req: GenerateFields | ScoreFields | generator_pb2.GenerateRequest) -> str:
    """The request's own id when it is valid, or a new one when it is empty."""
    rid = req.request_id
    if not rid:
        return uuid.uuid4().hex[:16]
    if len(rid) > MAX_REQUEST_ID_CHARS or not all(" " <= ch <= "~" for ch in rid):
        raise errors.InvalidArgument(
            "request_id", rid, f"at most {MAX_REQUEST_ID_CHARS} printable ASCII characters"
        )
    return rid


def generate_fields(req: generator_pb2.GenerateRequest) -> GenerateFields:
    """A gRPC GenerateRequest as the transport-neutral request validation reads."""
    return GenerateFields(
        model=req.model, prime=req.prime, max_chars=req.max_chars,
        temperature=req.temperature if req.HasField("temperature") else None, top_k=req.top_k, top_p=req.top_p,
        stop=tuple(req.stop), seed=req.seed if req.HasField("seed") else None, request_id=req.request_id,
        logprobs=req.logprobs, n=req.n, logit_bias=dict(req.logit_bias), allowed_chars=req.allowed_chars,
        regex=req.regex, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, resume_text=req.resume_text)


def score_fields(req: generator_pb2.ScoreRequest) -> ScoreFields:
    """A gRPC ScoreRequest as the transport-neutral request validation reads."""
    return ScoreFields(model=req.model, prime=req.prime, text=req.text, top_logprobs=req.top_logprobs,
                       request_id=req.request_id)


def check_max_chars(max_chars: int, limits: Limits) -> None:
    """The rule of max_chars, for any integer (HTTP's max_tokens may be -5 or past the proto's uint32): the same
    message for every value out of range."""
    if not 1 <= max_chars <= limits.max_chars:
        hint = "the server's --max-chars sets the upper bound" if max_chars > limits.max_chars else ""
        raise errors.InvalidArgument("max_chars", max_chars, f"in [1, {limits.max_chars}]", hint)


def validate_request(
    req: GenerateFields,
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
    if not isinstance(req, GenerateFields):  # a protobuf would read as one whose optional fields are all set
        raise TypeError(f"validate_request takes GenerateFields (generate_fields of a protobuf), got {type(req)}")
    rid = request_id if request_id is not None else request_id_of(req)

    check_max_chars(req.max_chars, limits)

    prime = req.prime
    if len(prime) > limits.max_prime_chars:
        raise errors.InvalidArgument(
            "prime",
            Shown(f"{len(prime)} characters"),
            f"at most {limits.max_prime_chars} characters long",
            "the server's --max-prime-chars sets the limit",
        )
    _in_vocabulary("prime", prime, metadata)
    prime_ids = np.array(metadata.encode(prime), dtype=np.int64)  # "" reads a newline (see the proto)

    temperature = float(req.temperature) if req.temperature is not None else 1.0
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
        shown = Shown(f"{len(req.stop)} sequences")
        raise errors.InvalidArgument("stop", shown, f"at most {MAX_STOP_SEQUENCES} sequences")
    for i, seq in enumerate(req.stop):
        if not 1 <= len(seq) <= MAX_STOP_CHARS:
            shown = seq if not seq else Shown(f"{len(seq)} characters")
            rule = f"a non-empty string of at most {MAX_STOP_CHARS} characters"
            raise errors.InvalidArgument(f"stop[{i}]", shown, rule)

    seed = int(req.seed) if req.seed is not None else secrets.randbits(63)

    if req.logprobs > MAX_LOGPROBS:
        raise errors.InvalidArgument("logprobs", req.logprobs, f"in [0, {MAX_LOGPROBS}] (0 means off)")
    n = max(1, int(req.n))
    if n > limits.max_n:
        raise errors.InvalidArgument("n", req.n, f"in [0, {limits.max_n}] (0 or 1 means one sample)",
                                     "the server's --max-n sets the upper bound")
    controls = _controls(req, metadata, limits)
    resume_ids, resumed_end = _resume(req, metadata, limits, n)

    return GenerationRequest(
        request_id=rid,
        prime=prime,
        prime_ids=prime_ids,
        max_chars=int(req.max_chars),
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        stop=tuple(req.stop),
        deadline=deadline,
        arrived=now,
        logprobs=int(req.logprobs),
        n=n,
        controls=controls,
        resume_ids=resume_ids,
        resumed_end=resumed_end,
    )


def _resume(req: GenerateFields, metadata: ModelMetadata, limits: Limits,
            n: int) -> tuple[np.ndarray | None, FinishReason | None]:
    """The resume_text's ids, and how the stream ends at once when the text already ends it (None: it goes on).
    Refuses a text the request cannot have produced: too long, outside the vocabulary, holding a stop sequence
    (the stream would have ended there, without returning it), or leaving the regex's language."""
    text = req.resume_text
    if not text:
        return None, None
    if n > 1:
        raise errors.InvalidArgument("resume_text", Shown(f"{len(text)} characters"),
                                     f"empty when n > 1 (got n {n}): resume each sample as a request of its own, "
                                     "with n 1, the seed its first message reported and its own text")
    if len(text) > req.max_chars:
        raise errors.InvalidArgument("resume_text", Shown(f"{len(text)} characters"),
                                     f"at most max_chars ({req.max_chars}) characters long")
    _in_vocabulary("resume_text", text, metadata)
    if req.allowed_chars and (outside := [ch for ch in text if ch not in req.allowed_chars]):
        raise errors.InvalidArgument("resume_text", Shown(f"{len(text)} characters, {describe_char(outside[0])} "
                                                          "outside allowed_chars"),
                                     "text the request's allowed_chars can have produced")
    for stop in req.stop:
        if stop in text:
            raise errors.InvalidArgument("resume_text", Shown(f"{len(text)} characters holding the stop sequence "
                                                              f"{stop!r} at {text.index(stop)}"),
                                         "text the stream can have sent: a stop sequence ends it, unsent")
    ids = [metadata.index[ch] for ch in text]
    end = FinishReason.LENGTH if len(text) == req.max_chars else None
    if req.regex:
        automaton = compile_regex(req.regex, metadata.vocab, limits.max_regex_states, req.allowed_chars)
        state = 0
        for i, token in enumerate(ids):
            if not automaton.mask[state, token]:
                raise errors.InvalidArgument("resume_text", Shown(f"{len(text)} characters, leaving the regex at "
                                                                  f"{i} ({describe_char(text[i])})"),
                                             "text the request's regex can have produced")
            state = int(automaton.trans[state, token])
        if automaton.accept[state]:
            end = FinishReason.MATCH_COMPLETE
    return np.array(ids, np.int64), end


def _controls(req: GenerateFields, metadata: ModelMetadata, limits: Limits) -> Controls | None:
    """The request's logit bias, allowed characters, regex and penalties, checked; None when it has none."""
    index = metadata.index
    bias = None
    for key, value in sorted(req.logit_bias.items()):
        if len(key) != 1:
            raise errors.InvalidArgument("logit_bias key", key, "exactly one character")
        if key not in index:
            raise errors.InvalidArgument("logit_bias key", Shown(describe_char(key)),
                                         f"a character of the model's vocabulary ({metadata.vocab_size} characters)")
        if not (math.isfinite(value) and -MAX_BIAS <= value <= MAX_BIAS):
            raise errors.InvalidArgument(f"logit_bias[{key!r}]", float(value), f"in [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
        if bias is None:
            bias = np.zeros(metadata.vocab_size, np.float32)
        bias[index[key]] = value
    allowed = req.allowed_chars
    if allowed:
        _in_vocabulary("allowed_chars", allowed, metadata)
        bias = np.zeros(metadata.vocab_size, np.float32) if bias is None else bias
        outside = np.ones(metadata.vocab_size, bool)
        outside[[index[ch] for ch in allowed]] = False
        bias[outside] = -np.inf  # never drawn
    if req.regex:
        if req.stop:
            raise errors.InvalidArgument("stop", Shown(f"{len(req.stop)} sequences"),
                                         "empty when regex is set (put the end into the regex)")
        try:
            compile_regex(req.regex, metadata.vocab, limits.max_regex_states, allowed)
        except RegexError as e:
            raise errors.InvalidArgument("regex", req.regex, str(e)) from None
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = float(getattr(req, name))
        if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
            raise errors.InvalidArgument(name, value, f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 means off)")
        penalties[name] = value
    repetition = float(req.repetition_penalty) or 1.0
    if not (math.isfinite(repetition) and 0.0 < repetition <= MAX_REPETITION):
        raise errors.InvalidArgument("repetition_penalty", float(req.repetition_penalty),
                                     f"in (0, {MAX_REPETITION:g}] (0 or 1 means off)")
    if bias is None and not req.regex and not any(penalties.values()) and repetition == 1.0:
        return None
    return Controls(bias=bias, regex=req.regex, allowed=allowed, presence=penalties["presence_penalty"],
                    frequency=penalties["frequency_penalty"], repetition=repetition)


def _in_vocabulary(field: str, text: str, metadata: ModelMetadata) -> None:
    """Refuses ``text`` naming the characters of it outside the vocabulary (the first MAX_SHOWN_CHARS)."""
    index = metadata.index
    outside = list(dict.fromkeys(ch for ch in text if ch not in index))  # distinct, in order of appearance
    if outside:
        shown = ", ".join(describe_char(ch) for ch in outside[:MAX_SHOWN_CHARS])
        if len(outside) > MAX_SHOWN_CHARS:
            shown += f" and {len(outside) - MAX_SHOWN_CHARS} more"
        raise errors.InvalidArgument(
            field,
            Shown(f"{len(outside)} character{'s' if len(outside) > 1 else ''} outside it: {shown}"),
            f"made of characters in the model's vocabulary ({metadata.vocab_size} characters)",
        )


def validate_score(req: ScoreFields, metadata: ModelMetadata, limits: Limits, *, now: float,
                   deadline: float | None, request_id: str) -> ScoreJob:
    """Checks a ScoreRequest: the prime as for Generate, the text's length and characters, top_logprobs."""
    if len(req.prime) > limits.max_prime_chars:
        raise errors.InvalidArgument("prime", Shown(f"{len(req.prime)} characters"),
                                     f"at most {limits.max_prime_chars} characters long",
                                     "the server's --max-prime-chars sets the limit")
    _in_vocabulary("prime", req.prime, metadata)
    if not 1 <= len(req.text) <= limits.max_score_chars:
        shown = req.text if not req.text else Shown(f"{len(req.text)} characters")
        raise errors.InvalidArgument("text", shown, f"1 to {limits.max_score_chars} characters long",
                                     "the server's --max-score-chars sets the limit")
    _in_vocabulary("text", req.text, metadata)
    if req.top_logprobs > MAX_LOGPROBS:
        raise errors.InvalidArgument("top_logprobs", req.top_logprobs, f"in [0, {MAX_LOGPROBS}]")
    tokens = metadata.encode(req.prime) + metadata.encode(req.text)
    return ScoreJob(request_id=request_id, prime=req.prime, text=req.text,
                    tokens=np.array(tokens, np.int64), top=int(req.top_logprobs), deadline=deadline, arrived=now)
