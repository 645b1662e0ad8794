"""The HTTP front-end: OpenAI's Completions API (with Server-Sent Events), /v1/score, /v1/models, health, the
playground page.

It runs beside the gRPC server in every front-end process (``--http-port``), on
the same event loop, and calls the same ``GeneratorServicer.generate`` and
``score``: one validation path (service/validation.py), the same engine
clients, limits, metrics and log lines. This module only translates: a pydantic
model of the OpenAI request (types and shape; FastAPI answers a bad one with 400
naming the field) becomes a ``charrnn.v1.GenerateRequest``; the responses
become OpenAI's JSON or its stream of ``data:`` events ending with ``data:
[DONE]``; an error's gRPC code becomes an HTTP status (``HTTP_STATUS``) with
OpenAI's error body. Every error this port answers has that body (``error_body``):
refusals, bad JSON, unknown paths, wrong methods, and a crash.

FastAPI and uvicorn, as vLLM uses them: an asyncio stack, so a stream is a
coroutine on the loop that already carries the gRPC calls, pydantic request
models, and an OpenAPI schema at /docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import socket
import ssl
import time
import uuid
from importlib import resources
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from charrnn.service import errors, validation
from charrnn.service.logs import REQUEST_ID
from charrnn.service.engine import EngineState
from charrnn.service.requests import GenerateFields, ScoreFields
from charrnn.v1 import generator_pb2 as pb

# errors.CharrnnError.code -> HTTP status, and OpenAI's error `type`.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
ERROR_TYPE = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
              429: "rate_limit_error"}
# The gRPC name (an error's `code`) of what the router answers by itself: no such path, a path without that method.
ROUTER_CODE = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}
CHAT_PATH = "/v1/chat/completions"  # what OpenAI's chat clients call: named in its 404, which points to ours
RETRY_AFTER_SECONDS = 1  # what a 429 tells the client to wait (a slot frees as soon as any stream ends)
# The proto's field names that OpenAI's API calls something else: an error names the field the client sent.
OPENAI_FIELD = {"max_chars": "max_tokens", "prime": "prompt", "request_id": "X-Request-Id header"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the Completions API
TIMEOUT_HEADER = "x-request-timeout"  # seconds: the call's deadline, as grpc-timeout is on gRPC
FINISH_REASON = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_MATCH_COMPLETE: "stop",
}
UINT32 = 2**32 - 1
PLAYGROUND = "playground.html"


# FastAPI (0.165 on) wraps each request in its own OpenTelemetry instrumentation. The servicer's spans
# (service/tracing.py) already cover each call, over gRPC and HTTP alike: turn FastAPI's off, so that an
# untraced server pays nothing for it either.
_NO_FASTAPI_TELEMETRY = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                   "auto_configure": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters else {}
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's fields with their meanings, then charrnn's own controls."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 400 naming it, not a silent default

    model: str = Field("", description='"name" or "name@version"; empty means the default model')
    prompt: str | list[str] = Field("", description="The prime: the text the model continues")
    # No bounds here: validation.check_max_chars owns the range, and says it the same for -5, 0 and 10**9.
    max_tokens: int | None = Field(None, description="Characters to generate (default 16), at most --max-chars")
    temperature: float | None = Field(None, description="0 is greedy; default 1")
    top_p: float | None = Field(None, description="Nucleus sampling; 1 (default) is off")
    seed: int | None = Field(None, ge=0, lt=2**64, description="Same seed and settings, same text")
    stop: str | list[str] | None = Field(None, description="Sequences that end a sample (not included)")
    n: int = Field(1, ge=0, le=UINT32, description="Samples of the same prompt")
    logprobs: int | None = Field(None, ge=0, le=UINT32,
                                 description="Log-probability of each character and of this many alternatives")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (the character's index in the model's vocabulary, GET /v1/models) -> bias")
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Not supported: POST /v1/score gives a text's log-probabilities")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = Field(None, description="Accepted and ignored")
    # charrnn's own controls
    top_k: int = Field(0, ge=0, le=UINT32, description="Keep the k most likely characters; 0 is off")
    regex: str = Field("", description="The sample must match this regular expression")
    allowed_chars: str = Field("", description="Only these characters may be drawn")
    repetition_penalty: float = Field(0.0, description="CTRL's repetition penalty; 0 or 1 is off")
    resume_text: str = Field("", description="The text already received of a cut stream: it goes on from there, "
                                             "with the seed its first event reported (n 1)")


class ScoreBody(BaseModel):
    """POST /v1/score: the log-probability of each character of ``text`` after ``prime`` (gRPC Score)."""

    model_config = ConfigDict(extra="forbid")
    model: str = ""
    prime: str = ""
    text: str = ""
    top_logprobs: int = Field(0, ge=0, le=UINT32)


def _bias_by_char(entry, bias: dict[str, float]) -> dict[str, float]:
    """OpenAI's logit_bias is keyed by token id: here a character's index in the model's vocabulary."""
    if entry is None:
        return {}  # generate() refuses the model field
    vocab = entry.model.metadata.vocab
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < len(vocab)):
            raise errors.InvalidArgument("logit_bias key", key,
                                         f"a token id in [0, {len(vocab)}) (a character's index in the vocabulary "
                                         "GET /v1/models lists)")
        out[vocab[int(key)]] = value
    return out


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class HttpCall:
    """The servicer's Call (servicer.Call) for one HTTP request: its deadline, headers and end callbacks."""

    def __init__(self, headers, timeout: float | None):
        self._started = time.monotonic()
        self._timeout = timeout
        self._headers = headers
        self._callbacks: list = []

    def time_remaining(self) -> float | None:
        if self._timeout is None:
            return None
        return max(0.0, self._timeout - (time.monotonic() - self._started))

    def add_done_callback(self, callback) -> None:
        self._callbacks.append(callback)

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._headers.items())

    def done(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    """OpenAI's error object, the body of every error this port answers (and of an error event mid-stream)."""
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(e: errors.CharrnnError, request_id: str = "") -> JSONResponse:
    """OpenAI's error body for a CharrnnError; a field renamed to what the HTTP client sent."""
    status = HTTP_STATUS.get(e.code, 500)
    message, param = e.message, getattr(e, "field", None)
    if param is not None:
        base = param.split("[", 1)[0]
        if base in OPENAI_FIELD:
            renamed = OPENAI_FIELD[base] + param[len(base):]
            message, param = renamed + message[len(param):], renamed
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else {}
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(error_body(status, message, e.code, param), status_code=status, headers=headers)


def _shown_input(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= errors.MAX_QUOTED_CHARS else text[: errors.MAX_QUOTED_CHARS] + "..."


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint as a 400 in OpenAI's shape: the field, the value, what is allowed."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        message = f"the body must be a JSON object: {first.get('msg')} ({first.get('ctx', {}).get('error', '')})"
        field = "body"
    elif first.get("type") == "extra_forbidden":
        message = f"{field} is not a field of this request"
    else:
        message = f"{field}: {first.get('msg')}, got {_shown_input(first.get('input'))}"
    return JSONResponse(error_body(400, message, "INVALID_ARGUMENT", field), status_code=400)


def _routes(app: FastAPI) -> str:
    """The API's routes, as a 404 lists them: "POST /v1/completions, ..." (the schema pages left out)."""
    return ", ".join(f"{method} {route.path}" for route in app.routes if isinstance(route, APIRoute)
                     for method in sorted(route.methods))


async def _router_error(request: Request, exc: HTTPException) -> JSONResponse:
    """What the router answers by itself (an unknown path, a wrong method) in OpenAI's shape, saying what exists."""
    status, method, path = exc.status_code, request.method, request.url.path
    if status == 404 and path.rstrip("/") == CHAT_PATH:
        message = (f"{method} {CHAT_PATH} is not served here: this server offers the completions API, "
                   "POST /v1/completions (a prompt the model continues), not chat completions")
    elif status == 404:
        message = f"no route {method} {path}; this server has {_routes(request.app)} (and /docs)"
    elif status == 405:
        message = f"{path} does not take {method}; it takes {(exc.headers or {}).get('Allow', 'another method')}"
    else:
        message = f"{method} {path}: {exc.detail}"
    return JSONResponse(error_body(status, message, ROUTER_CODE.get(status, "UNKNOWN")), status_code=status,
                        headers=exc.headers)


async def _crashed(request: Request, exc: Exception) -> JSONResponse:
    """A bug outside the servicer (which answers its own as INTERNAL): OpenAI's shape, not a text/plain 500.
    Starlette logs the traceback after this answer is sent."""
    message = f"internal error on {request.method} {request.url.path}; see the server log"
    return JSONResponse(error_body(500, message, "INTERNAL"), status_code=500)


def _timeout_of(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise errors.InvalidArgument("X-Request-Timeout header", raw, "a number of seconds > 0")
    return value


def _request_id_of(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex[:16]


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read already, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(request: Request, awaitable):
    """``await awaitable`` in this task (so what it sets in the context, the request's trace ids, stays for the
    response), cancelled and ClientGone raised as soon as the client disconnects."""
    me = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not gone:
            raise
        me.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()


def _logprobs_json(entries, offset: int, wanted: int) -> dict:
    """OpenAI's legacy logprobs object for some characters; text_offset counts from the start of the sample."""
    tokens, token_lp, top, offsets = [], [], [], []
    for i, e in enumerate(entries):
        tokens.append(e.char)
        token_lp.append(e.logprob)
        top.append({a.char: a.logprob for a in e.top[:wanted]})
        offsets.append(offset + i)
    return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top, "text_offset": offsets}


class HttpFrontend:
    """The FastAPI app of one front-end process over its servicer and model table."""

    def __init__(self, servicer, repository):
        self.servicer, self.repository = servicer, repository
        self.app = app = FastAPI(
            title="charrnn", version="1",
            description="Character-level language models: OpenAI's Completions API with Server-Sent Events, "
            "scoring, and a playground page at /.",
            **_NO_FASTAPI_TELEMETRY,
        )
        app.add_exception_handler(RequestValidationError, _invalid_body)
        app.add_exception_handler(HTTPException, _router_error)
        app.add_exception_handler(Exception, _crashed)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/score", self.score, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/health/live", self.live, methods=["GET"])
        app.add_api_route("/health/ready", self.ready, methods=["GET"])
        app.add_api_route("/", self.playground, methods=["GET"], response_class=HTMLResponse)

    # -- completions -------------------------------------------------------------------------------------------

    def _fields(self, body: CompletionRequest, request_id: str, entry) -> GenerateFields:
        """The body as the transport-neutral request validation reads (OpenAI's names mapped to charrnn's)."""
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                count = len(body.prompt)
                shown = validation.Shown(f"a list of {count} prompts" if count else "an empty list")
                raise errors.InvalidArgument("prompt", shown, "one string (or a list of exactly one)")
            prime = body.prompt[0]
        else:
            prime = body.prompt
        if body.echo:
            raise errors.InvalidArgument("echo", True, "false (POST /v1/score gives a text's log-probabilities)")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return GenerateFields(
            model=body.model, prime=prime, max_chars=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
            temperature=body.temperature, top_k=body.top_k, top_p=1.0 if body.top_p is None else body.top_p,
            stop=stop, seed=body.seed, request_id=request_id, n=body.n,
            logit_bias=_bias_by_char(entry, body.logit_bias) if body.logit_bias else {},
            allowed_chars=body.allowed_chars, regex=body.regex, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
            resume_text=body.resume_text,
            # OpenAI's logprobs=0 still gives each chosen character's log-probability: ask for one alternative.
            logprobs=0 if body.logprobs is None else max(1, body.logprobs),
        )

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        rid = _request_id_of(request)
        REQUEST_ID.set(rid)  # the tasks below copy it: every log line of this request carries it
        try:
            call = HttpCall(request.headers, _timeout_of(request))
            entry = self._entry(body.model)
            req = self._fields(body, rid, entry)
        except errors.CharrnnError as e:
            return error_response(e, rid)
        label = f"{entry.name}@{entry.version}" if entry is not None else body.model
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": label}
        wanted = body.logprobs or 0
        gen = self.servicer.generate(req, call)
        if body.stream:
            return await self._stream(request, body, gen, call, head, wanted, rid)
        try:
            result = await _unless_gone(request, self._collect(gen, req, head, wanted))
        except ClientGone:
            return Response(status_code=499)
        except errors.CharrnnError as e:
            return error_response(e, rid)
        finally:
            call.done()
        return JSONResponse(result, headers={"X-Request-Id": rid})

    def _entry(self, model: str):
        """The model's entry (for the answer's label and logit_bias's vocabulary), or None: generate() then
        refuses the model field, counted and logged as any refusal is."""
        try:
            return self.repository.resolve(model)
        except errors.CharrnnError:
            return None

    async def _collect(self, gen: AsyncIterator[pb.GenerateResponse], req, head: dict, wanted: int) -> dict:
        n = max(1, req.n)
        texts = [[] for _ in range(n)]
        lps = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        seeds: list[int | None] = [None] * n
        prime_chars = generated = 0
        async for r in gen:
            if r.HasField("seed"):
                seeds[r.index] = r.seed
            if r.text:
                texts[r.index].append(r.text)
                lps[r.index].extend(r.logprobs)
            if r.finish_reason:
                finish[r.index] = FINISH_REASON[r.finish_reason]
                prime_chars = r.stats.prime_chars
                generated += r.stats.generated_chars
        choices = [{"index": i, "text": "".join(texts[i]),
                    "logprobs": _logprobs_json(lps[i], 0, wanted) if req.logprobs else None,
                    "finish_reason": finish[i], "seed": seeds[i]} for i in range(n)]
        usage = {"prompt_tokens": prime_chars, "completion_tokens": generated,
                 "total_tokens": prime_chars + generated}
        return {**head, "choices": choices, "usage": usage}

    async def _stream(self, request: Request, body: CompletionRequest, gen, call: HttpCall, head: dict,
                      wanted: int, rid: str) -> Response:
        """Server-Sent Events: the first message is awaited here, so an error before any text is an HTTP status."""
        try:
            first = await _unless_gone(request, anext(gen, None))
        except ClientGone:
            call.done()
            return Response(status_code=499)
        except errors.CharrnnError as e:
            call.done()
            return error_response(e, rid)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        logprobs = body.logprobs is not None

        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

        async def events() -> AsyncIterator[str]:
            offsets: dict[int, int] = {}
            prime_chars = generated = 0
            try:
                r = first
                while r is not None:
                    choice = {"index": r.index, "text": r.text, "logprobs": None, "finish_reason": None}
                    if r.HasField("seed"):  # a sample's first event: its seed, to resume it exactly (resume_text)
                        choice["seed"] = r.seed
                    if r.text and logprobs:
                        choice["logprobs"] = _logprobs_json(r.logprobs, offsets.get(r.index, 0), wanted)
                    offsets[r.index] = offsets.get(r.index, 0) + len(r.text)
                    if r.finish_reason:
                        choice["finish_reason"] = FINISH_REASON[r.finish_reason]
                        prime_chars = r.stats.prime_chars
                        generated += r.stats.generated_chars
                    yield event({**head, "choices": [choice]})
                    r = await anext(gen, None)
                if include_usage:
                    usage = {"prompt_tokens": prime_chars, "completion_tokens": generated,
                             "total_tokens": prime_chars + generated}
                    yield event({**head, "choices": [], "usage": usage})
            except errors.CharrnnError as e:  # after the 200: the error travels as an event, as vLLM sends it
                status = HTTP_STATUS.get(e.code, 500)
                yield event(error_body(status, e.message, e.code))
            finally:
                await gen.aclose()  # a client gone: the servicer cancels the streams (their slots free)
                call.done()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"X-Request-Id": rid, "Cache-Control": "no-cache"})

    # -- score, models, health, page ---------------------------------------------------------------------------

    async def score(self, body: ScoreBody, request: Request) -> Response:
        rid = _request_id_of(request)
        REQUEST_ID.set(rid)
        call = None
        try:
            call = HttpCall(request.headers, _timeout_of(request))
            req = ScoreFields(model=body.model, prime=body.prime, text=body.text, top_logprobs=body.top_logprobs,
                              request_id=rid)
            result = await _unless_gone(request, self.servicer.score(req, call))
        except ClientGone:
            return Response(status_code=499)
        except errors.CharrnnError as e:
            return error_response(e, rid)
        finally:
            if call is not None:
                call.done()
        out = json_format.MessageToDict(result, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
        return JSONResponse(out, headers={"X-Request-Id": rid})

    async def models(self) -> dict:
        data = []
        for e in self.repository.entries():
            meta = e.model.metadata
            data.append({
                "id": f"{e.name}@{e.version}", "object": "model", "created": 0, "owned_by": "charrnn",
                "name": e.name, "version": e.version, "latest": e.latest, "default": e.is_default,
                "state": e.state.value, "cell": meta.cell, "layers": meta.layers, "hidden": meta.hidden,
                "validation_loss": meta.val_loss, "vocab": "".join(meta.vocab),
            })
        return {"object": "list", "data": data}

    async def live(self) -> JSONResponse:
        """As health service ``liveness``: failing only when an engine thread hung (restart the pod)."""
        hung = bool(getattr(self.repository, "hung", False))
        return JSONResponse({"status": "hung" if hung else "live"}, status_code=503 if hung else 200)

    async def ready(self) -> JSONResponse:
        """As the gRPC health of the server (""): ready while any model's newest version serves, until drain."""
        serving = sorted(e.name for e in self.repository.entries() if e.latest and e.state is EngineState.SERVING)
        if self.servicer.draining:
            return JSONResponse({"status": "draining", "serving": []}, status_code=503)
        return JSONResponse({"status": "ready" if serving else "not_ready", "serving": serving},
                            status_code=200 if serving else 503)

    async def playground(self) -> HTMLResponse:
        page = resources.files("charrnn.service").joinpath(PLAYGROUND).read_text(encoding="utf-8")
        return HTMLResponse(page)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handlers: charrnn-serve's own SIGTERM handler drains."""

    def capture_signals(self):
        return contextlib.nullcontext()


def listen(host: str, port: int, reuseport: bool) -> socket.socket:
    """The HTTP port's socket, bound (SO_REUSEPORT when several front-ends share it); OSError names the flag."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets that say TCP, and
    # with Nagle on, an event written after the headers waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from charrnn.service.frontend import hostport

        raise OSError(f"cannot listen on {hostport(host, port)} (--host/--http-port): {e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn on a socket bound by ``listen``, as a task of the running loop; HTTPS with the gRPC port's
    certificate when ``tls`` (cert, key, client CA or "") is given, client certificates required with a CA."""

    def __init__(self, frontend: HttpFrontend, sock: socket.socket, tls: tuple[str, str, str] | None = None):
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.scheme = "https" if tls else "http"
        ssl_args = {}
        if tls:
            cert, key, client_ca = tls
            ssl_args = {"ssl_certfile": cert, "ssl_keyfile": key}
            if client_ca:
                ssl_args.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(frontend.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, **ssl_args)
        self._server = _Uvicorn(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5)
        self.sock.close()


async def start(config, servicer, table, reuseport: bool) -> HttpServer:
    """The HTTP front-end of one front-end process on --host/--http-port (HTTPS with --tls-cert), started;
    OSError naming the flags when the port cannot be had."""
    tls = (config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls else None
    server = HttpServer(HttpFrontend(servicer, table), listen(config.host, config.http_port, reuseport), tls)
    await server.start()
    return server
