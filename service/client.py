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

from typing import TYPE_CHECKING, AsyncIterator, Iterator, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from charrnn.service.tls import channel_credentials

if TYPE_CHECKING:
    from charrnn.service.resuming import ResumingGeneration
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
    resume_text: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves temperature (1.0) and seed (random) to the server. Raises FieldError."""
    check_unsigned(pb.GenerateRequest, max_chars=max_chars, top_k=top_k, seed=seed, logprobs=logprobs, n=n)
    req = pb.GenerateRequest(
        model=model, prime=prime, max_chars=max_chars, top_k=top_k, top_p=top_p, stop=list(stop), request_id=request_id,
        logprobs=logprobs, n=n, logit_bias=logit_bias or {}, allowed_chars=allowed_chars, regex=regex,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
        resume_text=resume_text,
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
        self.seeds: dict[int, int] = {}  # sample index -> its seed, from its first message
        self.model = ""  # "name@version" that served it, from the first message

    def _take(self, response: pb.GenerateResponse, index: int | None = None) -> str:
        """Records one message of sample ``index`` (default: the message's own index)."""
        i = response.index if index is None else index
        if response.HasField("seed"):
            self.seeds[i] = response.seed
        if response.model and not self.model:
            self.model = response.model
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


DEFAULT_RESUMES = 5  # tries to resume a cut stream when another replica can answer


def targets_of(target: str | Sequence[str]) -> list[str]:
    """The addresses in ``target``: one host:port, a comma-separated list, a list, or a ``dns:///`` name."""
    items = [target] if isinstance(target, str) else list(target)
    found = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not found:
        raise ValueError(f"target must name at least one server (host:port, a list, or dns:///name:port), got {target!r}")
    return found


class GeneratorClient:
    """A blocking client of one server or of several replicas of it.

    ``target``: host:port, several (a list, or "host:port,host:port"), or ``dns:///name:port`` (every address a
    name resolves to, balanced round robin by gRPC). Any TLS option (or ``tls=True``) makes the channels secure.
    A stream cut by its replica's death or drain resumes on another replica with the same text
    (service/resuming.py), at most ``max_resumes`` times (0: never; None, the default: 5 when another replica
    can answer, with several addresses or a dns:/// name, and 0 with one host:port, whose server alone is
    there; a host:port that balances over replicas, such as a Service's virtual IP, wants a number).
    """

    def __init__(self, target: str | Sequence[str] = "localhost:50051", *, tls: bool = False, tls_ca: str = "",
                 tls_cert: str = "", tls_key: str = "", options: Sequence[tuple[str, object]] = (),
                 max_resumes: int | None = None, backoff: float = 0.1, stall_seconds: float | None = 10.0):
        creds = _credentials(tls, tls_ca, tls_cert, tls_key)
        self.targets = targets_of(target)
        if max_resumes is None:
            max_resumes = DEFAULT_RESUMES if len(self.targets) > 1 or self.targets[0].startswith("dns:") else 0
        self.max_resumes, self.backoff, self.stall_seconds = max_resumes, backoff, stall_seconds
        self._channels = []
        for t in self.targets:
            opts = list(options)
            if t.startswith("dns:"):  # every address behind the name, not the first one only
                opts.append(("grpc.lb_policy_name", "round_robin"))
            self._channels.append(grpc.secure_channel(t, creds, opts) if creds else grpc.insecure_channel(t, opts))
        self._stubs = [generator_pb2_grpc.GeneratorStub(c) for c in self._channels]
        self._healths = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._channel, self._stub, self._health = self._channels[0], self._stubs[0], self._healths[0]
        self._next = 0  # the address the next call starts at (a list of addresses: round robin)

    def generate(self, prime: str = "", max_chars: int = 300, *, timeout: float | None = None,
                 **fields) -> "ResumingGeneration":
        """Starts a stream; ``fields`` go to build_request (model, temperature, top_k, top_p, seed, stop, ...)."""
        from charrnn.service.resuming import ResumingGeneration  # it builds on Generation, above

        request = build_request(prime, max_chars, **fields)
        first = self._next
        self._next = (self._next + 1) % len(self._stubs)

        def open_call(req: pb.GenerateRequest, call_timeout: float | None, tries: int):
            k = (first + tries) % len(self._stubs)  # a resumed call goes to the next address
            return self._stubs[k].Generate(req, timeout=call_timeout), self.targets[k]

        return ResumingGeneration(open_call, self._health_of, request, timeout, max_resumes=self.max_resumes,
                                  backoff=self.backoff, stall_seconds=self.stall_seconds)

    def _health_of(self, address: str) -> str:
        reply = self._healths[self.targets.index(address)].Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

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
        for channel in self._channels:
            channel.close()

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
