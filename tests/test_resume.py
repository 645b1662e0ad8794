"""Resuming a cut stream (resume_text) on one long-lived server: the rest is what an uncut run gives.

For requests of every kind (seeded and not, stop sequences, a regex, allowed
characters, penalties, log-probabilities), each uncut run's text T is cut at
several places p, and the request sent again with ``resume_text = T[:p]`` and
the seed its first message reported: the new text must be T[p:], with the same
finish reason, stop sequence, log-probabilities and generated_chars. Then the
refusals: what the request cannot have produced is INVALID_ARGUMENT naming
resume_text, and a model version that is gone is NOT_FOUND.
"""

from __future__ import annotations

import random

import grpc
import httpx
import pytest

from charrnn.service.client import GeneratorClient, ServiceError
from charrnn.v1 import generator_pb2 as pb
from charrnn.v1 import generator_pb2_grpc
from testkit.serve_process import ServeProcess

REQUESTS = [
    {"prime": "ROMEO:", "seed": 11, "temperature": 1.0},
    {"prime": "", "temperature": 1.3},  # unseeded: resumed through the seed its first message gave
    {"prime": "A", "seed": 5, "stop": ["e", "th", "a b"], "temperature": 1.2},
    {"prime": "ab", "seed": 7, "allowed_chars": "ab \n", "stop": ["ab ", "ba"], "temperature": 1.0},
    {"prime": "The ", "seed": 3, "regex": r"[a-z ]{5,60}\.", "temperature": 0.9},
    {"prime": "x", "seed": 8, "regex": r"(ab|ba)+c?", "temperature": 1.0},
    {"prime": "ROMEO:", "seed": 2, "presence_penalty": 0.8, "frequency_penalty": 0.5, "repetition_penalty": 1.4,
     "logprobs": 3},
    {"prime": "B", "seed": 4, "temperature": 0.0, "logprobs": 2, "stop": ["\n"]},
]


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--http-port", "0", env=no_torch_env) as proc:
        yield proc


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield generator_pb2_grpc.GeneratorStub(channel)
    channel.close()


def call(stub, **fields) -> dict:
    """One Generate of one sample, read whole: text, finish, stats, logprobs, and the first message's fields."""
    request = pb.GenerateRequest(model="tiny", max_chars=fields.pop("max_chars", 120), **fields)
    out = {"text": "", "logprobs": [], "first": None}
    for r in stub.Generate(request, timeout=60):
        if out["first"] is None:
            out["first"] = r
        out["text"] += r.text
        out["logprobs"] += [(e.char, round(e.logprob, 4)) for e in r.logprobs]
        if r.HasField("stats"):
            out["finish"], out["stats"] = r.finish_reason, r.stats
    return out


@pytest.mark.parametrize("fields", REQUESTS, ids=[str(i) for i in range(len(REQUESTS))])
def test_a_resumed_stream_goes_on_as_the_uncut_one(stub, fields):
    uncut = call(stub, **fields)
    first = uncut["first"]
    assert first.HasField("seed") and first.model == "tiny@1"
    if "seed" in fields:
        assert first.seed == fields["seed"]
    text = uncut["text"]
    rng = random.Random(len(text))
    cuts = sorted({0, len(text), *(rng.randrange(len(text) + 1) for _ in range(4))})
    for p in cuts:
        resumed = call(stub, **{**fields, "seed": first.seed, "resume_text": text[:p]})
        assert resumed["text"] == text[p:], p
        assert resumed["finish"] == uncut["finish"], p
        assert resumed["stats"].stop_sequence == uncut["stats"].stop_sequence
        assert resumed["stats"].generated_chars == uncut["stats"].generated_chars
        assert resumed["stats"].resumed_chars == p and resumed["stats"].seed == first.seed
        if fields.get("logprobs"):
            assert resumed["logprobs"] == uncut["logprobs"][p:]


def test_a_resume_text_that_ends_the_stream_ends_it_at_once(stub):
    uncut = call(stub, prime="A", seed=9, max_chars=40)
    assert uncut["finish"] == pb.FINISH_REASON_LENGTH
    done = call(stub, prime="A", seed=9, max_chars=40, resume_text=uncut["text"])
    assert done["text"] == "" and done["finish"] == pb.FINISH_REASON_LENGTH and done["stats"].generated_chars == 40
    match = call(stub, prime="x", seed=1, regex="(yes|no)", max_chars=40)
    assert match["finish"] == pb.FINISH_REASON_MATCH_COMPLETE
    again = call(stub, prime="x", seed=1, regex="(yes|no)", max_chars=40, resume_text=match["text"])
    assert again["text"] == "" and again["finish"] == pb.FINISH_REASON_MATCH_COMPLETE


def test_every_sample_reports_its_seed_and_resumes_as_a_request_of_its_own(stub):
    request = pb.GenerateRequest(model="tiny", prime="ROMEO:", max_chars=60, seed=100, n=3)
    firsts, texts = {}, {}
    for r in stub.Generate(request, timeout=60):
        if r.index not in firsts:
            firsts[r.index] = r
        texts[r.index] = texts.get(r.index, "") + r.text
    assert {i: (f.seed, f.model) for i, f in firsts.items()} == {i: (100 + i, "tiny@1") for i in range(3)}
    for i in range(3):
        cut = len(texts[i]) // 2
        assert call(stub, prime="ROMEO:", max_chars=60, seed=100 + i, resume_text=texts[i][:cut])["text"] \
            == texts[i][cut:]


@pytest.mark.parametrize("fields, code, words", [
    ({"max_chars": 10, "resume_text": "abcdefghijk"}, "INVALID_ARGUMENT",
     "resume_text must be at most max_chars (10) characters long, got 11 characters"),
    ({"resume_text": "ab\u00e9"}, "INVALID_ARGUMENT", "resume_text must be made of characters in the model's"),
    ({"regex": "[a-z]+\\.", "resume_text": "abC"}, "INVALID_ARGUMENT",
     "resume_text must be text the request's regex can have produced, got 3 characters, leaving the regex at 2"),
    ({"stop": ["the"], "resume_text": "in the end"}, "INVALID_ARGUMENT", "holding the stop sequence 'the' at 3"),
    ({"allowed_chars": "ab", "resume_text": "abc"}, "INVALID_ARGUMENT", "'c' (U+0063 LATIN SMALL LETTER C) outside allowed_chars"),
    ({"n": 2, "resume_text": "ab"}, "INVALID_ARGUMENT", "resume_text must be empty when n > 1"),
    ({"model": "tiny@7", "resume_text": "ab"}, "NOT_FOUND", "tiny@7"),
])
def test_a_resume_text_the_request_cannot_have_produced_is_refused(stub, fields, code, words):
    fields = {"model": "tiny", "prime": "A", "max_chars": 50, "seed": 1, **fields}
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert info.value.code().name == code, info.value.details()
    assert words in info.value.details(), info.value.details()


def test_the_python_client_reports_seed_model_and_resumed_chars(server):
    with GeneratorClient(server.target) as client:
        g = client.generate("ROMEO:", 50, model="tiny")
        text = g.text()
        assert g.model == "tiny@1" and 0 in g.seeds and g.resumes == 0
        rest = client.generate("ROMEO:", 50, model="tiny", seed=g.seeds[0], resume_text=text[:20])
        assert rest.text() == text[20:] and rest.stats.resumed_chars == 20
        with pytest.raises(ServiceError) as info:
            client.generate("A", 5, model="tiny", resume_text="toolong").text()
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_http_resume_text_and_the_seed_in_the_first_event(server):
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 80, "temperature": 1.0, "stream": True}
    events = []
    with httpx.stream("POST", url, json=body, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                events.append(__import__("json").loads(line[6:]))
    seed = events[0]["choices"][0]["seed"]
    assert all("seed" not in e["choices"][0] for e in events[1:])
    text = "".join(e["choices"][0]["text"] for e in events)
    rest = httpx.post(url, json={**body, "stream": False, "seed": seed, "resume_text": text[:30]}, timeout=60).json()
    assert rest["choices"][0]["text"] == text[30:] and rest["choices"][0]["seed"] == seed
    bad = httpx.post(url, json={**body, "stream": False, "resume_text": "x" * 81}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "resume_text"


def test_a_long_resume_text_is_read_as_a_prime_is(stub):
    """800 characters of resume_text take several prefill rounds (128 characters each): the state they leave is
    the uncut run's."""
    uncut = call(stub, prime="A", seed=21, max_chars=900)
    resumed = call(stub, prime="A", seed=21, max_chars=900, resume_text=uncut["text"][:800])
    assert resumed["text"] == uncut["text"][800:]
    assert resumed["stats"].prime_chars == 1 and resumed["stats"].generated_chars == 900


def test_the_cli_resumes_past_a_dead_address(server, tmp_path):
    """charrnn-generate with a dead replica first in its list: the call goes on at the next one, says so on
    stderr, and prints what the live server alone prints."""
    import socket
    import subprocess

    from testkit.serve_process import GENERATE

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    args = ["--model", "tiny", "--prime", "ROMEO:", "--max-chars", "60", "--seed", "4"]
    alone = subprocess.run([GENERATE, "--server", server.target, *args], capture_output=True, text=True, timeout=60)
    both = subprocess.run([GENERATE, "--server", f"{dead},{server.target}", *args, "--stats"], capture_output=True,
                          text=True, timeout=60)
    assert both.returncode == 0, both.stderr
    assert both.stdout == alone.stdout
    assert "stream cut (UNAVAILABLE" in both.stderr and "resuming sample 0 at 0 characters" in both.stderr
    assert "resumed 1 time," in both.stderr


def test_a_dns_name_reaches_the_servers_behind_it(server):
    """dns:///localhost:PORT, as a headless Service's name is given: gRPC resolves and balances it."""
    with GeneratorClient(f"dns:///localhost:{server.port}") as client:  # a name: resumes on by default
        assert client.max_resumes == 5
        g = client.generate("ROMEO:", 40, model="tiny", seed=5)
        assert len(g.text()) == 40 and g.model == "tiny@1"
