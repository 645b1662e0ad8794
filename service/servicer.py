"""The gRPC servicer: protobuf in, a validated request to the engine, text chunks out.

It only converts and maps: the model repository resolves names, validation.py
checks fields, the engine generates. Every error kind maps to one gRPC status in
STATUS_FOR, and the same code (with the error's reason) labels charrnn_requests_total. This module
imports neither torch nor onnxruntime (tests/test_server.py checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from charrnn.service import errors
from charrnn.service.logs import REQUEST_ID
from charrnn.service.metrics import Metrics
from charrnn.service.tracing import Tracing
from charrnn.service.requests import FinishReason, GenerateFields, GenerationStats, ScoreFields
from charrnn.service.validation import (
    Limits,
    generate_fields,
    request_id_of,
    score_fields,
    validate_request,
    validate_score,
)
from charrnn.v1 import generator_pb2 as pb
from charrnn.v1 import generator_pb2_grpc

# errors.CharrnnError.code -> the status the client sees (the codes are gRPC's own status names).
STATUS_FOR: dict[str, grpc.StatusCode] = {code: grpc.StatusCode[code] for code in errors.CODES}

FINISH_REASON_PB = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.MATCH_COMPLETE: pb.FINISH_REASON_MATCH_COMPLETE,
}

DEADLINE_SLACK_SECONDS = 0.25  # a cancel this close to the deadline counts as DEADLINE_EXCEEDED
# (the server learns the deadline when the call arrives, after the client started its timer: on a
# loaded machine that lag reaches a good fraction of a second, and the client's cancel comes first)
NO_MODEL_LABEL = ""  # `model` label of requests that never resolved to a model (bounded: names are not echoed)


class UndecodableRequest:
    """Bytes on a method path that do not parse as its request message (corrupt, invalid UTF-8, cut off)."""

    def __init__(self, message: str, size: int, reason: str):
        self.message = message  # "charrnn.v1.GenerateRequest"
        self.size = size  # bytes received
        self.reason = reason.rpartition(": ")[2]  # protobuf's reason, without its "Error parsing ..." prefix

    def __repr__(self) -> str:  # the "got <value>" of the InvalidArgument message
        return f"{self.size} bytes that do not parse ({self.reason})"

    def error(self) -> errors.InvalidArgument:
        return errors.InvalidArgument("request", self, f"a {self.message} in protobuf wire format")


def _parser(message_type):
    """A request deserializer that never raises: grpc answers a raising one with UNKNOWN and its traceback text."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return UndecodableRequest(name, len(data), str(e))

    return parse


def add_generator_to_server(servicer: "GeneratorServicer", server) -> None:
    """generator_pb2_grpc.add_GeneratorServicer_to_server, with requests parsed by _parser."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_parser(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, request_deserializer=_parser(pb.ScoreRequest),
            response_serializer=pb.ScoreResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=_parser(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["Generator"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class Call(Protocol):
    """What the servicer needs of a call, whichever front-end carries it: grpc.aio.ServicerContext has it, and
    so does service/http_api.py's HttpCall."""

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None when it set none."""

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Runs ``callback(call)`` when the call ends: finished, failed, or its client gone."""

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        """The caller's metadata (gRPC) or headers (HTTP): where a W3C traceparent arrives."""


def _generate_level(code: str) -> int:
    """How loud a refused Generate is: overload and unavailability are an operator's business."""
    return logging.WARNING if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") else logging.INFO


@dataclass
class _Outcome:
    """What one Generate or Score call did, for its metrics, its log line and its span."""

    model: str = NO_MODEL_LABEL
    code: str = "CANCELLED"  # until proven otherwise: a call that just stops was cancelled
    reason: str = "cancelled"  # errors.OUTCOMES: the `reason` label
    prime_chars: int = 0
    sent_chars: int = 0
    first_char_at: float | None = None
    deadline: float | None = None  # time.monotonic() of the client's deadline, as it reached the server
    # for its span (service/tracing.py)
    label: str | None = None  # name@version
    seed: int | None = None
    n: int | None = None
    max_chars: int | None = None
    finish_reason: str | None = None  # of sample 0
    stats: GenerationStats | None = None  # of sample 0
    arrived: float = 0.0  # time.monotonic() when the call arrived
    request_id: str = ""
    scored: bool = False  # a Score call: its span says what it scored

    def span_attributes(self) -> dict:
        if self.scored:
            return {"charrnn.model": self.label, "charrnn.scored_chars": self.prime_chars}
        return {"charrnn.model": self.label, "charrnn.prime_chars": self.prime_chars,
                "charrnn.generated_chars": self.sent_chars, "charrnn.seed": self.seed, "charrnn.n": self.n,
                "charrnn.max_chars": self.max_chars, "charrnn.finish_reason": self.finish_reason}


def _char_logprobs(entries: list) -> list[pb.CharLogprob]:
    return [pb.CharLogprob(char=c, logprob=lp, top=[pb.Alternative(char=a, logprob=v) for a, v in top])
            for c, lp, top in entries]


def _chunk(text: str, stream, label: str) -> pb.GenerateResponse:
    """One message of new text (with its log-probabilities when asked) of one sample; the sample's first
    message also says its seed and model version (what resuming it takes)."""
    first = _first_fields(stream, label)
    if stream.request.logprobs:
        return pb.GenerateResponse(text=text, index=stream.index, logprobs=_char_logprobs(stream.logprobs), **first)
    return pb.GenerateResponse(text=text, index=stream.index, **first)


def _last(stream, label: str) -> pb.GenerateResponse:
    result = stream.result
    return pb.GenerateResponse(finish_reason=FINISH_REASON_PB[result.finish_reason], stats=stats_to_pb(result.stats),
                               index=stream.index, **_first_fields(stream, label))


def _first_fields(stream, label: str) -> dict:
    """{seed, model} for the sample's first message, {} for the others."""
    if stream.told:
        return {}
    stream.told = True
    return {"seed": stream.request.sampling.seed, "model": label}


def _resumed_end(gen, label: str) -> pb.GenerateResponse:
    """The one message of a resumed stream whose resume_text already ends it: no new character."""
    resumed = len(gen.resume_ids)
    stats = GenerationStats(model=label, prime_chars=len(gen.prime), generated_chars=resumed, seed=gen.sampling.seed,
                            resumed_chars=resumed)
    return pb.GenerateResponse(finish_reason=FINISH_REASON_PB[gen.resumed_end], stats=stats_to_pb(stats),
                               seed=gen.sampling.seed, model=label)


async def _merged(streams: list, outcome: "_Outcome", label: str):
    """The messages of n samples as they come, each sample's last message with its own stats; the first
    error ends the call."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream) -> None:
        try:
            async for text in stream:
                await queue.put((stream, _chunk(text, stream, label), len(text)))
            await queue.put((stream, _last(stream, label), None))
        except errors.CharrnnError as e:
            await queue.put((stream, e, None))

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(streams)
        while left:
            _, item, chars = await queue.get()
            if isinstance(item, errors.CharrnnError):
                raise item
            if chars is None:
                left -= 1
            else:
                outcome.sent_chars += chars
            yield item
    finally:
        for t in tasks:
            t.cancel()


def _identify(request) -> tuple[str, errors.InvalidArgument | None]:
    """The request's id (set for its log lines), or a made-up one and the error that the call ends with when
    the request cannot be read or its request_id breaks the rules."""
    try:
        if isinstance(request, UndecodableRequest):
            raise request.error()
        rid, error = request_id_of(request), None
    except errors.InvalidArgument as e:
        rid, error = uuid.uuid4().hex[:16], e
    # Each gRPC call runs in its own task, with its own copy of the context: no reset needed.
    REQUEST_ID.set(rid)
    return rid, error


def score_to_pb(label: str, vocab: tuple[str, ...], job, score) -> pb.ScoreResponse:
    """``score``: the core's protocol.ScoreResult for ``job``."""
    lp = score.lp.astype(np.float64)
    entries = [pb.CharLogprob(char=ch, logprob=float(v),
                              top=[pb.Alternative(char=vocab[t], logprob=float(a)) for t, a in zip(ids, alts)])
               for ch, v, ids, alts in zip(job.text, lp.tolist(), score.top_ids.tolist(), score.top_lp.tolist())]
    total = float(lp.sum())
    nats = -total / len(job.text)
    return pb.ScoreResponse(model=label, logprobs=entries, total_logprob=total, nats_per_char=nats,
                            bits_per_char=nats / math.log(2))


def stats_to_pb(stats: GenerationStats) -> pb.GenerationStats:
    return pb.GenerationStats(
        model=stats.model,
        prime_chars=stats.prime_chars,
        generated_chars=stats.generated_chars,
        queue_seconds=stats.queue_seconds,
        prefill_seconds=stats.prefill_seconds,
        decode_seconds=stats.decode_seconds,
        total_seconds=stats.total_seconds,
        stop_sequence=stats.stop_sequence,
        seed=stats.seed,
        resumed_chars=stats.resumed_chars,
    )


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    """charrnn.v1.Generator over a ModelRepository (service/repository.py)."""

    def __init__(self, repository, metrics: Metrics, limits: Limits, log: logging.Logger, frontend: int = 0,
                 tracing: Tracing | None = None):
        self.repository = repository
        self.tracing = tracing  # OpenTelemetry spans of each call, when OTEL_* asks (tracing.from_env)
        self.frontend = frontend  # which front-end process this is (its log lines say so)
        self.metrics = metrics
        self.limits = limits
        self.log = log
        self.draining = False  # set at SIGTERM: new streams are refused with UNAVAILABLE

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            fields = request if isinstance(request, UndecodableRequest) else generate_fields(request)
            async for response in self.generate(fields, context):
                yield response
        except errors.CharrnnError as e:
            await context.abort(STATUS_FOR[e.code], e.message)

    @contextlib.asynccontextmanager
    async def _handled(self, method: str, request, call: Call, refused_level: Callable[[str], int],
                       record: Callable[[_Outcome, float], None]) -> AsyncIterator[_Outcome]:
        """The one wrapper of a Generate or Score call, for every front-end: identifies the request (its id on every
        log line), opens its span, refuses it while draining; inside, the call fills the outcome and sets
        ``code`` "OK" when it succeeds. A CharrnnError is logged at ``refused_level(code)`` and raised with the
        message the client is told; anything else is logged and raised as INTERNAL naming the request id. A call
        that just stops (a CancelledError, or the front-end closing it) stays CANCELLED, or DEADLINE_EXCEEDED
        when it stopped at the client's deadline. ``record`` counts it either way, then the span ends."""
        outcome = _Outcome(arrived=time.monotonic())
        rid, rid_error = _identify(request)
        outcome.request_id = rid
        span = None
        if self.tracing is not None:
            span = self.tracing.start(f"charrnn.v1.Generator/{method}", call.invocation_metadata(), outcome.arrived,
                                      {"charrnn.request_id": rid, "charrnn.frontend": self.frontend})
        try:
            if rid_error is not None:
                raise rid_error
            if self.draining:
                raise errors.draining()
            yield outcome
        except errors.CharrnnError as e:
            outcome.code, outcome.reason = e.code, e.reason
            if self.draining and e.code == "UNAVAILABLE":
                e = errors.Unavailable(errors.SHUTTING_DOWN, e.reason)
            self.log.log(refused_level(e.code), "%s refused: %s", method.lower(), e.message,
                         extra={"code": e.code, "frontend": self.frontend})
            raise e from None
        except Exception:
            outcome.code, outcome.reason = "INTERNAL", "internal"
            self.log.exception("%s failed", method.lower())
            raise errors.CharrnnError(f"internal error (request_id {rid}); see the server log") from None
        finally:
            # The client's own deadline timer usually fires a moment before our copy of the deadline (noted at
            # arrival): a cancel that close to it is the deadline.
            near = outcome.deadline is not None and time.monotonic() >= outcome.deadline - DEADLINE_SLACK_SECONDS
            if outcome.code == "CANCELLED" and near:
                outcome.code, outcome.reason = "DEADLINE_EXCEEDED", "deadline"
            record(outcome, outcome.arrived)
            if span is not None:
                self.tracing.end(span, outcome.code, outcome.span_attributes(), outcome.stats)

    async def generate(self, request: GenerateFields | UndecodableRequest,
                       call: Call) -> AsyncIterator[pb.GenerateResponse]:
        """Generate for any front-end (gRPC here, HTTP in service/http_api.py), each having turned its request into
        the transport-neutral GenerateFields: the responses, or a CharrnnError
        (logged and counted already) whose code and message are what the client is told."""
        async with self._handled("Generate", request, call, _generate_level, self._record) as outcome:
            async for response in self._generate(request, call, outcome.arrived, outcome.request_id, outcome):
                yield response
            outcome.code, outcome.reason = "OK", "ok"

    async def _generate(self, request, call: Call, arrived: float, rid: str, outcome: _Outcome):
        entry = self.repository.resolve(request.model)
        outcome.model = entry.name
        remaining = call.time_remaining()
        deadline = arrived + remaining if remaining is not None else None
        outcome.deadline = deadline
        outcome.label = f"{entry.name}@{entry.version}"
        gen = validate_request(
            request, entry.model.metadata, self.limits, now=arrived, deadline=deadline, request_id=rid
        )
        outcome.seed, outcome.n, outcome.max_chars = gen.sampling.seed, gen.n, gen.max_chars
        self.log.debug("generate", extra={"model": f"{entry.name}@{entry.version}", "max_chars": gen.max_chars})
        if gen.resumed_end is not None:
            outcome.finish_reason = gen.resumed_end.value
            yield _resumed_end(gen, outcome.label)
            return
        streams = entry.engine.submit_all(gen)
        outcome.prime_chars = len(gen.prime)  # read by the engine from here on
        # A client that goes away (or whose deadline passes) frees its batch slots within one engine step.
        call.add_done_callback(lambda _call: [s.cancel() for s in streams])
        try:
            if len(streams) == 1:
                stream = streams[0]
                async for chunk in stream:
                    outcome.sent_chars += len(chunk)
                    yield _chunk(chunk, stream, outcome.label)
                yield _last(stream, outcome.label)
            else:
                async for response in _merged(streams, outcome, outcome.label):
                    yield response
        finally:
            outcome.first_char_at = min((s.first_char_at for s in streams if s.first_char_at is not None),
                                        default=None)
            if streams[0].result is not None:
                outcome.stats = streams[0].result.stats
                outcome.finish_reason = streams[0].result.finish_reason.value
            for s in streams:
                if s.result is None:
                    s.cancel()

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        try:
            return await self.score(request if isinstance(request, UndecodableRequest) else score_fields(request),
                                    context)
        except errors.CharrnnError as e:
            await context.abort(STATUS_FOR[e.code], e.message)

    async def score(self, request: ScoreFields | UndecodableRequest, call: Call) -> pb.ScoreResponse:
        """Score for any front-end: the response, or a CharrnnError (logged and counted already)."""
        async with self._handled("Score", request, call, lambda code: logging.INFO, self._record_score) as outcome:
            outcome.scored = True
            arrived, rid = outcome.arrived, outcome.request_id
            entry = self.repository.resolve(request.model)
            outcome.model, outcome.label = entry.name, f"{entry.name}@{entry.version}"
            remaining = call.time_remaining()
            outcome.deadline = deadline = arrived + remaining if remaining is not None else None
            job = validate_score(request, entry.model.metadata, self.limits, now=arrived, deadline=deadline,
                                 request_id=rid)
            stream = entry.engine.submit_all(job)[0]
            call.add_done_callback(lambda _call: stream.cancel())
            async for _ in stream:
                pass
            response = score_to_pb(f"{entry.name}@{entry.version}", entry.model.metadata.vocab, job,
                                   stream.result.score)
            outcome.code, outcome.reason, outcome.prime_chars = "OK", "ok", len(job.text)
            return response

    def _record_score(self, outcome: _Outcome, arrived: float) -> None:
        m = self.metrics
        m.score_requests.labels(outcome.model, outcome.code, outcome.reason).inc()
        if outcome.code == "OK":
            m.scored_chars.labels(outcome.model).inc(outcome.prime_chars)

    def _record(self, outcome: _Outcome, arrived: float) -> None:
        m, model = self.metrics, outcome.model
        m.requests.labels(model, outcome.code, outcome.reason).inc()
        seconds = time.monotonic() - arrived
        if model != NO_MODEL_LABEL:
            m.request_duration.labels(model).observe(seconds)
            m.prime_chars.labels(model).inc(outcome.prime_chars)
            m.generated_chars.labels(model).inc(outcome.sent_chars)
            if outcome.first_char_at is not None:
                m.time_to_first_char.labels(model).observe(max(0.0, outcome.first_char_at - arrived))
        if outcome.code in ("OK", "CANCELLED"):
            self.log.info(
                "generate %s", outcome.code.lower(),
                extra={"model": model, "chars": outcome.sent_chars, "seconds": round(seconds, 4),
                       "frontend": self.frontend},
            )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error().message)
        infos = []
        for e in sorted(self.repository.entries(), key=lambda e: (e.name, e.version)):
            meta = e.model.metadata
            infos.append(
                pb.ModelInfo(
                    name=e.name,
                    version=e.version,
                    latest=e.latest,
                    is_default=e.is_default,
                    cell=meta.cell,
                    layers=meta.layers,
                    hidden=meta.hidden,
                    vocab_size=meta.vocab_size,
                    validation_loss=meta.val_loss,
                    train_steps=meta.train_steps,
                    corpus_sha256=meta.corpus_sha256,
                    format_version=meta.format_version,
                    device=e.model.device,
                    state=e.state.value,
                )
            )
        return pb.ListModelsResponse(models=infos)
