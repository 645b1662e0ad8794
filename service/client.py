"""Python clients of the charrnn service: `GeneratorClient` (blocking) and `AsyncGeneratorClient` (asyncio).

    from charrnn.service.client import GeneratorClient
    with GeneratorClient("localhost:50051") as client:
        stream = client.generate("ROMEO:", max_chars=300, temperature=0.8, seed=1)
        for text in stream:
            print(text, end="", flush=True)
        print(stream.finish_reason, stream.stats.generated_chars)

Errors from the server raise ServiceError with the gRPC status and the server's message; a value that
a request field cannot carry (a negative max_chars or seed) raises FieldError before anything is sent.
"""

from __future__ import annotations

from typing import AsyncIterator, Iterator, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from charrnn.service.tls import channel_credentials
from charrnn.v1 import generator_pb2 as pb
from charrnn.v1 import generator_pb2_grpc

FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
                  pb.FINISH_REASON_MATCH_COMPLETE: "match_complete"}
# The largest value of each unsigned field type of the proto. protobuf's own error for a value
# outside it ("Value out of range: -5") names neither the field nor the range.
UNSIGNED_MAX = {FieldDescriptor.TYPE_UINT32: 2**32 - 1, FieldDescriptor.TYPE_UINT64: 2**64 - 1}


class ServiceError(Exception):
    """The server refused or ended a call: ``code`` is the gRPC status, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def of(cls, e: grpc.RpcError) -> "ServiceError":
        return cls(e.code(), e.details() or "")


class FieldError(ValueError):
    """A value that a request field cannot carry: ``field``, ``value`` and the ``rule`` it breaks.

    Only what the message type itself refuses; what the server accepts (ranges, the model's
    vocabulary, limits) is the server's to say, as INVALID_ARGUMENT."""

    def __init__(self, field: str, value, rule: str):
        super().__init__(f"{field} must be {rule}, got {value!r}")
        self.field, self.value, self.rule = field, value, rule


def check_unsigned(message: type, **values) -> None:
    """Raises FieldError for a value outside the range of its unsigned field of ``message`` (None: unset)."""
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        top = UNSIGNED_MAX.get(fields[name].type)
        if top is not None and value is not None and not 0 <= value <= top:
            raise FieldError(name, value, f"a whole number in [0, {top}]")


def build_request(
    prime: str = "",
    max_chars: int = 300,
    *,
    model: str = "",
    temperature: float | None = None,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    request_id: str = "",
    logprobs: int = 0,
    n: int = 1,
    logit_bias: dict[str, float] | None = None,
    allowed_chars: str = "",
    regex: str = "",
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 0.0,
) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves temperature (1.0) and seed (random) to the server. Raises FieldError."""
    check_unsigned(pb.GenerateRequest, max_chars=max_chars, top_k=top_k, seed=seed, logprobs=logprobs, n=n)
    req = pb.GenerateRequest(
        model=model, prime=prime, max_chars=max_chars, top_k=top_k, top_p=top_p, stop=list(stop), request_id=request_id,
        logprobs=logprobs, n=n, logit_bias=logit_bias or {}, allowed_chars=allowed_chars, regex=regex,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
    )
    if temperature is not None:
        req.temperature = temperature
    if seed is not None:
        req.seed = seed
    return req


def _credentials(tls: bool, tls_ca: str, tls_cert: str, tls_key: str) -> grpc.ChannelCredentials | None:
    if tls or tls_ca or tls_cert or tls_key:
        return channel_credentials(tls_ca, tls_cert, tls_key)
    return None


class Generation:
    """One call: iterate for text chunks; afterwards ``finish_reason`` and ``stats`` are set.

    With n samples the chunks of all samples come mixed, in the order they arrive; ``texts``,
    ``finish_reasons``, ``all_stats`` and ``logprobs`` hold each sample's, by index.
    """

    def __init__(self, call):
        self._call = call
        self.finish_reason: str = ""  # "length" | "stop_sequence" | "match_complete", once sample 0 ended normally
        self.stats: pb.GenerationStats | None = None
        self.texts: dict[int, str] = {}  # sample index -> its text so far
        self.finish_reasons: dict[int, str] = {}
        self.all_stats: dict[int, pb.GenerationStats] = {}
        self.logprobs: dict[int, list[pb.CharLogprob]] = {}  # with logprobs: one entry per character

    def _take(self, response: pb.GenerateResponse) -> str:
        i = response.index
        if response.HasField("stats"):
            self.all_stats[i] = response.stats
            self.finish_reasons[i] = FINISH_REASONS.get(response.finish_reason, "")
            if i == 0:
                self.stats, self.finish_reason = response.stats, self.finish_reasons[i]
        self.texts[i] = self.texts.get(i, "") + response.text
        if response.logprobs:
            self.logprobs.setdefault(i, []).extend(response.logprobs)
        return response.text

    def __iter__(self) -> Iterator[str]:
        try:
            for response in self._call:
                text = self._take(response)
                if text:
                    yield text
        except grpc.RpcError as e:
            raise ServiceError.of(e) from None

    def text(self) -> str:
        """Reads the whole stream and returns its text."""
        return "".join(self)

    def cancel(self) -> None:
        self._call.cancel()


class GeneratorClient:
    """A blocking client. ``target`` is host:port; any TLS option (or ``tls=True``) makes the channel secure."""

    def __init__(self, target: str = "localhost:50051", *, tls: bool = False, tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", options: Sequence[tuple[str, object]] = ()):
        creds = _credentials(tls, tls_ca, tls_cert, tls_key)
        self._channel = grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, prime: str = "", max_chars: int = 300, *, timeout: float | None = None, **fields) -> Generation:
        """Starts a stream; ``fields`` go to build_request (model, temperature, top_k, top_p, seed, stop, ...)."""
        return Generation(self._stub.Generate(build_request(prime, max_chars, **fields), timeout=timeout))

    def list_models(self, timeout: float | None = 10.0) -> list[pb.ModelInfo]:
        try:
            return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout).models)
        except grpc.RpcError as e:
            raise ServiceError.of(e) from None

    def score(self, text: str, prime: str = "", *, model: str = "", top_logprobs: int = 0,
              timeout: float | None = 60.0) -> pb.ScoreResponse:
        """The log-probability of each character of ``text`` after ``prime``, and bits per character."""
        check_unsigned(pb.ScoreRequest, top_logprobs=top_logprobs)
        request = pb.ScoreRequest(model=model, prime=prime, text=text, top_logprobs=top_logprobs)
        try:
            return self._stub.Score(request, timeout=timeout)
        except grpc.RpcError as e:
            raise ServiceError.of(e) from None

    def health(self, service: str = "", timeout: float | None = 10.0) -> str:
        """The grpc.health.v1 status of ``service`` ("" = the server): "SERVING", "NOT_SERVING", ..."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise ServiceError.of(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GeneratorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGeneration(Generation):
    """One stream of the asyncio client: ``async for text in stream``."""

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for response in self._call:
                text = self._take(response)
                if text:
                    yield text
        except grpc.RpcError as e:
            raise ServiceError.of(e) from None

    async def text(self) -> str:
        return "".join([t async for t in self])


class AsyncGeneratorClient:
    """The asyncio twin of GeneratorClient (create it inside a running event loop)."""

    def __init__(self, target: str = "localhost:50051", *, tls: bool = False, tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", options: Sequence[tuple[str, object]] = ()):
        creds = _credentials(tls, tls_ca, tls_cert, tls_key)
        self._channel = (
            grpc.aio.secure_channel(target, creds, options) if creds else grpc.aio.insecure_channel(target, options)
        )
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)

    def generate(
        self, prime: str = "", max_chars: int = 300, *, timeout: float | None = None, **fields
    ) -> AsyncGeneration:
        return AsyncGeneration(self._stub.Generate(build_request(prime, max_chars, **fields), timeout=timeout))

    async def list_models(self, timeout: float | None = 10.0) -> list[pb.ModelInfo]:
        try:
            return list((await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout)).models)
        except grpc.RpcError as e:
            raise ServiceError.of(e) from None

    async def score(self, text: str, prime: str = "", *, model: str = "", top_logprobs: int = 0,
                    timeout: float | None = 60.0) -> pb.ScoreResponse:
        check_unsigned(pb.ScoreRequest, top_logprobs=top_logprobs)
        request = pb.ScoreRequest(model=model, prime=prime, text=text, top_logprobs=top_logprobs)
        try:
            return await self._stub.Score(request, timeout=timeout)
        except grpc.RpcError as e:
            raise ServiceError.of(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncGeneratorClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
