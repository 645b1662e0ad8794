"""The HTTP front-end through a real charrnn-serve: the official `openai` SDK, `curl -N`, httpx, each error code.

Every answer is checked against the same request over gRPC: one engine, one validation path.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest

from charrnn.service.client import GeneratorClient
from testkit import probes
from testkit.serve_process import ServeProcess

CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    args = ("--http-port", "0", "--max-active-streams", "2", "--max-queue", "1", "--max-chars", "1000000",
            "--log-format", "json")
    with ServeProcess(model_repo, *args, env=no_torch_env) as proc:
        assert proc.http_port > 0, proc.log()
        yield proc


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def grpc_client(server):
    with GeneratorClient(server.target) as c:
        yield c


def _post(server, body: dict, path: str = "/v1/completions", **headers) -> httpx.Response:
    return httpx.post(server.http_url + path, json=body, headers=headers, timeout=30)


def _openai_error(r: httpx.Response, status: int) -> dict:
    """The response's error object, checked to be OpenAI's shape and nothing else: message, type, param, code."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _requests(server, code: str) -> float:
    return probes.metric_sum(probes.scrape(server.metrics_url), "charrnn_requests_total", code=code)


# -- the OpenAI SDK -----------------------------------------------------------------------------------------------


def test_sdk_completion_is_the_grpc_sample_with_usage(sdk, grpc_client):
    reply = sdk.completions.create(model="tiny", prompt="ROMEO:", max_tokens=60, temperature=0.8, seed=7)
    want = grpc_client.generate("ROMEO:", 60, model="tiny", temperature=0.8, seed=7, timeout=30).text()
    assert reply.choices[0].text == want and len(want) == 60
    assert reply.choices[0].finish_reason == "length"
    assert reply.model == "tiny@1" and reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (6, 60, 66)


def test_sdk_stream_gives_the_same_text_and_ends_with_the_finish_reason(sdk):
    whole = sdk.completions.create(model="tiny", prompt="A", max_tokens=200, seed=3).choices[0].text
    chunks = list(sdk.completions.create(model="tiny", prompt="A", max_tokens=200, seed=3, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 200


def test_sdk_n_samples_stop_and_logprobs_match_grpc(sdk, grpc_client):
    reply = sdk.completions.create(model="tiny", prompt="A", max_tokens=40, seed=11, n=3, logprobs=3)
    want = grpc_client.generate("A", 40, model="tiny", seed=11, n=3, logprobs=3, timeout=30)
    want.text()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    got = [c.text for c in reply.choices]
    assert got == [want.texts[i] for i in range(3)]
    assert len(set(got)) == 3  # three different samples of one seed
    for choice in reply.choices:
        lp = choice.logprobs
        assert lp.tokens == list(choice.text) and lp.text_offset == list(range(len(choice.text)))
        assert all(len(top) == 3 for top in lp.top_logprobs)
        for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
            assert token_lp <= 0 and max(top.values()) >= token_lp - 1e-6
    stopped = sdk.completions.create(model="tiny", prompt="A", max_tokens=2000, seed=11, stop=["e"])
    assert "e" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_logprobs_are_the_grpc_ones(server, grpc_client):
    body = {"model": "tiny", "prompt": "AB", "max_tokens": 30, "seed": 5, "logprobs": 2}
    http = _post(server, body).json()["choices"][0]["logprobs"]
    stream = grpc_client.generate("AB", 30, model="tiny", seed=5, logprobs=2, timeout=30)
    stream.text()
    entries = stream.logprobs[0]
    assert [e.char for e in entries] == http["tokens"]
    assert max(abs(e.logprob - v) for e, v in zip(entries, http["token_logprobs"])) < 1e-6
    assert [{a.char: a.logprob for a in e.top} for e in entries] == http["top_logprobs"]


def test_logit_bias_is_keyed_by_token_id(server, sdk):
    vocab = _post(server, {}, "/v1/models").status_code  # wrong method: GET only
    assert vocab == 405
    models = httpx.get(server.http_url + "/v1/models", timeout=10).json()["data"]
    tiny = next(m for m in models if m["id"] == "tiny@1")
    z = tiny["vocab"].index("z")
    reply = sdk.completions.create(model="tiny", prompt="A", max_tokens=50, seed=1, logit_bias={str(z): 100})
    assert reply.choices[0].text == "z" * 50


def test_models_lists_every_version_with_its_vocabulary(sdk):
    models = {m.id: m for m in sdk.models.list().data}
    assert set(models) == {"tiny@1", "other@1"}
    assert models["tiny@1"].model_extra["cell"] == "lstm" and models["other@1"].model_extra["cell"] == "gru"
    assert "A" in models["tiny@1"].model_extra["vocab"]


def test_score_matches_grpc_score(server, grpc_client):
    http = _post(server, {"model": "tiny", "prime": "A", "text": "BCD", "top_logprobs": 2}, "/v1/score").json()
    want = grpc_client.score("BCD", "A", model="tiny", top_logprobs=2)
    assert http["model"] == "tiny@1" and [e["char"] for e in http["logprobs"]] == list("BCD")
    assert math.isclose(http["bits_per_char"], want.bits_per_char, rel_tol=1e-9)
    assert all(len(e["top"]) == 2 for e in http["logprobs"])


# -- raw SSE with curl -N -----------------------------------------------------------------------------------------


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_curl_sees_openai_sse_events_ending_with_done(server):
    body = json.dumps({"model": "tiny", "prompt": "A", "max_tokens": 300, "seed": 2, "stream": True})
    out = subprocess.run([CURL, "-sS", "-N", "-H", "Content-Type: application/json", "-d", body,
                          server.http_url + "/v1/completions"], capture_output=True, text=True, timeout=60, check=True)
    events = out.stdout.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2]) and len(payloads) >= 2
    text = "".join(p["choices"][0]["text"] for p in payloads)
    assert text == _post(server, {"model": "tiny", "prompt": "A", "max_tokens": 300, "seed": 2}).json()[
        "choices"][0]["text"]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


# -- a disconnect frees the slot -------------------------------------------------------------------------------------


def _served_within(server, seconds: float) -> float:
    start = time.monotonic()
    while True:
        r = _post(server, {"model": "tiny", "prompt": "A", "max_tokens": 5})
        if r.status_code == 200:
            return time.monotonic() - start
        assert r.status_code == 429 and time.monotonic() - start < seconds, r.text
        time.sleep(0.01)


def _hold_slots(server, count: int) -> list:
    """Streams that never end (they hold a slot each until closed); each has sent its first event."""
    held = []
    for _ in range(count):
        client = httpx.Client(timeout=60)
        ctx = client.stream("POST", server.http_url + "/v1/completions",
                            json={"model": "tiny", "prompt": "A", "max_tokens": 1_000_000, "stream": True})
        response = ctx.__enter__()
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        held.append((client, ctx, lines))
    return held


def _release(held) -> None:
    for client, ctx, _ in held:
        ctx.__exit__(None, None, None)
        client.close()


def test_disconnect_mid_stream_frees_the_slot(server):
    cancelled = _requests(server, "CANCELLED")
    held = _hold_slots(server, 2)  # both slots
    _release(held[:1])  # the client goes away mid-stream
    took = _served_within(server, 5.0)
    print(f"\nHTTP disconnect: the next request got a slot {took * 1000:.0f} ms after the client left")
    _release(held[1:])
    deadline = time.monotonic() + 5
    while _requests(server, "CANCELLED") < cancelled + 2:
        assert time.monotonic() < deadline, "the disconnects were not counted as CANCELLED"
        time.sleep(0.05)


# -- each error code ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "A", "max_tokens": 0}, "max_tokens", "max_tokens must be in [1, 1000000], got 0"),
    ({"prompt": "A€", "max_tokens": 5}, "prompt", "prompt must be made of characters in the model's vocabulary"),
    ({"prompt": "A", "temperature": -1}, "temperature", "temperature must be a finite number in [0, 100]"),
    ({"prompt": "A", "temperature": "hot"}, "temperature", "temperature: Input should be a valid number"),
    ({"prompt": "A", "top_p": 2}, "top_p", "top_p must be in [0, 1]"),
    ({"prompt": "A", "n": 99}, "n", "n must be in [0, 32]"),
    ({"prompt": "A", "logprobs": 50}, "logprobs", "logprobs must be in [0, 20]"),
    ({"prompt": "A", "max_tokens": -3}, "max_tokens", "max_tokens must be in [1, 1000000], got -3"),
    ({"prompt": "A", "stop": [""]}, "stop[0]", "stop[0] must be a non-empty string"),
    ({"prompt": "A", "regex": "("}, "regex", "regex must be"),
    ({"prompt": "A", "logit_bias": {"999": 1}}, "logit_bias key", "logit_bias key must be a token id in [0, 61)"),
    ({"prompt": ["A", "B"]}, "prompt", "prompt must be one string (or a list of exactly one), got a list of 2 prompts"),
    ({"prompt": "A", "echo": True}, "echo", "echo must be false"),
    ({"prompt": "A", "temprature": 0.5}, "temprature", "temprature is not a field of this request"),
    ({"model": "tiny@x", "prompt": "A"}, "model", "model must be"),
])
def test_bad_fields_are_400_naming_field_value_and_rule(server, sdk, body, param, words):
    error = _openai_error(_post(server, {"model": "tiny", **body}), 400)
    assert error["param"] == param and error["code"] == "INVALID_ARGUMENT" and error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]


UNDER = "must be in [1, 1000000]"  # the test server's --max-chars


@pytest.mark.parametrize("max_tokens, message", [
    (-5, f"max_tokens {UNDER}, got -5"),
    (0, f"max_tokens {UNDER}, got 0"),
    (1_000_001, f"max_tokens {UNDER}, got 1000001 (the server's --max-chars sets the upper bound)"),
    (2**32, f"max_tokens {UNDER}, got 4294967296 (the server's --max-chars sets the upper bound)"),
    (10**30, f"max_tokens {UNDER}, got {10**30} (the server's --max-chars sets the upper bound)"),
])
def test_max_tokens_has_one_rule_and_one_message_on_both_sides_of_the_range(server, max_tokens, message):
    """-5 and 2**32 do not fit the proto's uint32, 0 and 1000001 do: the same rule (validation.py) refuses all."""
    error = _openai_error(_post(server, {"model": "tiny", "prompt": "A", "max_tokens": max_tokens}), 400)
    assert error == {"message": message, "type": "invalid_request_error", "param": "max_tokens",
                     "code": "INVALID_ARGUMENT"}


@pytest.mark.parametrize("prompt, message", [
    (["A", "B"], "prompt must be one string (or a list of exactly one), got a list of 2 prompts"),
    ([], "prompt must be one string (or a list of exactly one), got an empty list"),
])
def test_a_list_of_prompts_other_than_one_is_refused_in_plain_words(server, prompt, message):
    error = _openai_error(_post(server, {"model": "tiny", "prompt": prompt}), 400)
    assert error == {"message": message, "type": "invalid_request_error", "param": "prompt",
                     "code": "INVALID_ARGUMENT"}


ROUTES = ("POST /v1/completions, POST /v1/score, GET /v1/models, GET /health/live, GET /health/ready, GET / "
          "(and /docs)")
CHAT = ("POST /v1/chat/completions is not served here: this server offers the completions API, "
        "POST /v1/completions (a prompt the model continues), not chat completions")


def _no_route(method: str, path: str) -> str:
    return f"no route {method} {path}; this server has {ROUTES}"


ROUTER_ERRORS = {404: ("not_found_error", "NOT_FOUND"), 405: ("invalid_request_error", "UNIMPLEMENTED")}


@pytest.mark.parametrize("method, path, status, message", [
    ("POST", "/v1/chat/completions", 404, CHAT),
    ("POST", "/v1/chat/completions/", 404, CHAT),
    ("POST", "/v1/embeddings", 404, _no_route("POST", "/v1/embeddings")),
    ("GET", "/v1/engines", 404, _no_route("GET", "/v1/engines")),
    ("GET", "/nothing/here", 404, _no_route("GET", "/nothing/here")),
    ("GET", "/v1/completions", 405, "/v1/completions does not take GET; it takes POST"),
    ("DELETE", "/v1/models", 405, "/v1/models does not take DELETE; it takes GET"),
])
def test_unknown_paths_and_methods_answer_in_openai_error_shape(server, method, path, status, message):
    r = httpx.request(method, server.http_url + path, json={"model": "tiny", "prompt": "A"}, timeout=10)
    kind, code = ROUTER_ERRORS[status]
    assert _openai_error(r, status) == {"message": message, "type": kind, "param": None, "code": code}
    if status == 405:
        assert r.headers["Allow"] == message.rpartition(" ")[2]


def test_the_sdks_chat_completions_is_not_found_pointing_to_completions(sdk):
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    error = missing.value
    assert error.status_code == 404 and error.body["message"] == CHAT and CHAT in error.message
    assert (error.type, error.param, error.code) == ("not_found_error", None, "NOT_FOUND")


def test_a_crash_outside_the_servicer_is_a_500_in_openai_error_shape():
    """The servicer answers its own bugs as INTERNAL; a route around it (/v1/models here) that raises must too."""
    import asyncio

    from charrnn.service.http_api import HttpFrontend

    class BrokenRepository:
        def entries(self):
            raise RuntimeError("the model table is broken")

    async def get_models() -> httpx.Response:
        transport = httpx.ASGITransport(HttpFrontend(None, BrokenRepository()).app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://charrnn") as client:
            return await client.get("/v1/models")

    error = _openai_error(asyncio.run(get_models()), 500)
    assert error == {"message": "internal error on GET /v1/models; see the server log", "type": "server_error",
                     "param": None, "code": "INTERNAL"}


def test_the_sdk_raises_its_own_error_types(sdk):
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model="tiny", prompt="A", max_tokens=0)
    assert bad.value.status_code == 400 and "max_tokens must be in [1," in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.completions.create(model="nope", prompt="A")
    assert "model 'nope' is not served here; models: other (version 1), tiny (version 1)" in missing.value.message


def test_bad_json_and_bad_headers_are_400(server):
    r = httpx.post(server.http_url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = _post(server, {"model": "tiny", "prompt": "A"}, **{"X-Request-Timeout": "soon"})
    assert r.status_code == 400 and "X-Request-Timeout header must be a number of seconds > 0, got 'soon'" in r.text
    r = _post(server, {"model": "tiny", "prompt": "A"}, **{"X-Request-Id": "x" * 200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id header"


def test_full_server_is_429_with_retry_after_then_504_past_the_deadline(server):
    held = _hold_slots(server, 2)
    try:
        waiting = threading.Thread(target=_post, args=(server, {"model": "tiny", "prompt": "A", "max_tokens": 5}))
        waiting.start()  # takes the one queue place
        time.sleep(0.3)
        full = _post(server, {"model": "tiny", "prompt": "A", "max_tokens": 5})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1", full.text
        assert full.json()["error"]["code"] == "RESOURCE_EXHAUSTED" and "--max-queue 1" in full.json()["error"]["message"]
        _release(held[:1])
        waiting.join(10)
        held = held[1:] + _hold_slots(server, 1)
        late = _post(server, {"model": "tiny", "prompt": "A", "max_tokens": 5, "stream": True},
                     **{"X-Request-Timeout": "0.3"})
        assert late.status_code == 504 and late.json()["error"]["code"] == "DEADLINE_EXCEEDED", late.text
    finally:
        _release(held)


def test_health_and_request_ids_in_the_json_log(server):
    assert httpx.get(server.http_url + "/health/live", timeout=10).json() == {"status": "live"}
    ready = httpx.get(server.http_url + "/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "serving": ["other", "tiny"]}
    r = _post(server, {"model": "tiny", "prompt": "A", "max_tokens": 3}, **{"X-Request-Id": "http-trace-1"})
    assert r.headers["X-Request-Id"] == "http-trace-1" and r.json()["id"] == "cmpl-http-trace-1"
    line = server.wait_for_log(r'"request_id": "http-trace-1"')
    assert json.loads(line.string)["message"] == "generate ok"


def test_openapi_schema_describes_the_completions_request(server):
    schema = httpx.get(server.http_url + "/openapi.json", timeout=10).json()
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs", "logit_bias",
            "top_k", "regex", "allowed_chars", "stream"} <= set(fields)


def test_drain_answers_503_and_ready_turns_503(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--http-port", "0", "--drain-grace", "3", "--max-chars", "1000000",
                      env=no_torch_env) as proc:
        held = _hold_slots(proc, 1)
        proc.signal(signal.SIGTERM)
        proc.wait_for_log("draining")
        r = _post(proc, {"model": "tiny", "prompt": "A", "max_tokens": 5})
        assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE", r.text
        assert "server shutting down" in r.json()["error"]["message"]
        assert httpx.get(proc.http_url + "/health/ready", timeout=10).status_code == 503
        # the stream in flight ends after the grace with an error event, then [DONE]
        rest = list(held[0][2])
        _release(held)
        events = [line for line in rest if line]
        assert events[-1] == "data: [DONE]" and '"code":"UNAVAILABLE"' in events[-2], events[-3:]
        assert proc.wait(30) == 0


def test_several_frontends_share_the_http_port(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--http-port", "0", "--frontends", "2", env=no_torch_env) as proc:
        seen = set()
        for i in range(40):
            with httpx.Client(timeout=30) as c:  # a new connection each time: SO_REUSEPORT spreads them
                r = c.post(proc.http_url + "/v1/completions", json={"model": "tiny", "prompt": "A", "max_tokens": 8,
                                                                    "seed": 4})
                assert r.status_code == 200, r.text
                seen.add(r.json()["choices"][0]["text"])
        assert len(seen) == 1  # the same seeded sample whichever process answered
        served_by = set(re.findall(r"generate ok .*frontend=(\d+)", "".join(proc.stderr)))
        assert served_by == {"0", "1"}, served_by


def test_accepted_connections_have_nagle_off():
    """Without TCP_NODELAY an SSE event or a JSON body written after the headers waits for the client's delayed
    ACK (about 40 ms on Linux): the listening socket must be one asyncio turns Nagle off on."""
    import asyncio
    import socket

    from charrnn.service.http_api import listen

    async def accepted_nodelay() -> int:
        sock = listen("127.0.0.1", 0, reuseport=False)
        seen = asyncio.get_running_loop().create_future()

        def connected(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
