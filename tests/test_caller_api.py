"""The caller API through a real server: logprobs, Score, n samples, logit bias, allowed characters, regex and
penalties, each checked against an independent onnxruntime replay of the model file (testkit/replay.py).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charrnn.modelfile import MODEL_FILE
from charrnn.service.client import GeneratorClient, ServiceError
from testkit import probes
from testkit.replay import Replay
from testkit.serve_process import GENERATE, ServeProcess

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
TOL = 1e-4


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--max-n", "24", "--max-regex-states", "300", "--max-score-chars", "5000",
                      env=no_torch_env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with GeneratorClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def replay(model_repo):
    return Replay(model_repo / "tiny" / "1" / MODEL_FILE)


def _bad(client, fields: dict, *, score: bool = False) -> str:
    with pytest.raises(ServiceError) as info:
        if score:
            client.score(model="tiny", timeout=30, **fields)
        else:
            client.generate(fields.pop("prime", "A"), fields.pop("max_chars", 10), model="tiny", timeout=30,
                            **fields).text()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
    return info.value.details


# -- logprobs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prime", ["ROMEO:", ""])
def test_logprobs_are_the_models_own_distribution(client, replay, prime):
    # Temperature, top-k and a bias change what is sampled, not the reported distribution.
    stream = client.generate(prime, 120, model="tiny", seed=3, temperature=0.7, top_k=20, logprobs=5,
                             logit_bias={"e": 3.0}, timeout=30)
    text = stream.text()
    entries = stream.logprobs[0]
    assert [e.char for e in entries] == list(text)
    want = replay.logprobs(prime, text)
    got = np.array([e.logprob for e in entries])
    ids = [replay.index[c] for c in text]
    assert np.abs(got - want[np.arange(len(text)), ids]).max() <= TOL
    for e, row in zip(entries, want):
        assert len(e.top) == 5
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:5]  # descending, ties to the lower index
        assert [a.char for a in e.top] == [replay.vocab[j] for j in order]
        assert np.abs(np.array([a.logprob for a in e.top]) - row[order]).max() <= TOL


def test_without_logprobs_none_are_sent(client):
    stream = client.generate("A", 50, model="tiny", seed=1, timeout=30)
    stream.text()
    assert stream.logprobs == {}


# -- Score ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prime,text", [
    ("ROMEO:", "But soft, what light through yonder window breaks?"),
    ("", "It is the east, and Juliet is the sun.\n"),
    ("", "A"),
    ("KING:\n", "Now is the winter of our discontent\n" * 60),  # longer than one prefill chunk
])
def test_score_agrees_with_the_replay(client, replay, prime, text):
    reply = client.score(text, prime, model="tiny", top_logprobs=3)
    want = replay.logprobs(prime, text)
    ids = [replay.index[c] for c in text]
    expected = want[np.arange(len(text)), ids]
    got = np.array([e.logprob for e in reply.logprobs])
    assert reply.model == "tiny@1" and [e.char for e in reply.logprobs] == list(text)
    assert np.abs(got - expected).max() <= TOL
    assert reply.total_logprob == pytest.approx(expected.sum(), abs=TOL * len(text))
    assert reply.nats_per_char == pytest.approx(-reply.total_logprob / len(text), rel=1e-9)
    assert reply.bits_per_char == pytest.approx(reply.nats_per_char / math.log(2), rel=1e-9)
    assert all(len(e.top) == 3 for e in reply.logprobs)
    assert reply.logprobs[0].top[0].logprob == pytest.approx(want[0].max(), abs=TOL)


def test_score_matches_the_logprobs_of_generated_text(client):
    stream = client.generate("JULIET:", 80, model="tiny", seed=8, logprobs=1, timeout=30)
    text = stream.text()
    reply = client.score(text, "JULIET:", model="tiny")
    a = np.array([e.logprob for e in stream.logprobs[0]])
    b = np.array([e.logprob for e in reply.logprobs])
    assert np.abs(a - b).max() <= TOL


def test_score_runs_among_streams_and_is_counted(server, client, replay):
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n" * 5
    done = []
    streams = [threading.Thread(target=lambda: done.append(client.generate("A", 400, model="tiny").text()))
               for _ in range(8)]
    for t in streams:
        t.start()
    replies = [client.score(text, model="tiny") for _ in range(4)]
    for t in streams:
        t.join()
    assert len(done) == 8
    expected = replay.logprobs("", text)[np.arange(len(text)), [replay.index[c] for c in text]].sum()
    assert all(abs(r.total_logprob - expected) <= TOL * len(text) for r in replies)
    metrics = probes.scrape(server.metrics_url)
    assert probes.metric_sum(metrics, "charrnn_score_requests_total", model="tiny", code="OK") >= 4
    assert probes.metric_sum(metrics, "charrnn_scored_chars_total", model="tiny") >= 4 * len(text)


def test_score_through_grpcurl(server, replay):
    body = json.dumps({"model": "tiny", "prime": "", "text": "Hello"})
    out = subprocess.run([GRPCURL, "-plaintext", "-d", body, server.target, "charrnn.v1.Generator/Score"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    reply = json.loads(out)
    expected = replay.logprobs("", "Hello")[np.arange(5), [replay.index[c] for c in "Hello"]]
    assert [e["char"] for e in reply["logprobs"]] == list("Hello")
    total = reply.get("total_logprob", reply.get("totalLogprob"))  # grpcurl versions differ in JSON names
    assert abs(total - expected.sum()) <= 5 * TOL


# -- n samples ------------------------------------------------------------------------------------------------


def test_n_samples_are_each_the_seeded_stream_alone(client):
    stream = client.generate("ROMEO:", 60, model="tiny", seed=40, n=5, temperature=0.9, timeout=30)
    stream.text()
    assert sorted(stream.texts) == [0, 1, 2, 3, 4]
    assert sorted(stream.finish_reasons) == [0, 1, 2, 3, 4]
    assert all(stream.finish_reasons[i] == "length" for i in range(5))
    for i in range(5):
        assert stream.all_stats[i].seed == 40 + i and stream.all_stats[i].generated_chars == 60
        alone = client.generate("ROMEO:", 60, model="tiny", seed=40 + i, temperature=0.9, timeout=30).text()
        assert stream.texts[i] == alone
    assert len(set(stream.texts.values())) == 5


def test_n_samples_unseeded_differ_and_each_ends(client):
    stream = client.generate("A", 40, model="tiny", n=3, stop=["e"], timeout=30)
    stream.text()
    assert len(stream.finish_reasons) == 3
    for i, text in stream.texts.items():
        if stream.finish_reasons[i] == "stop_sequence":
            assert "e" not in text and stream.all_stats[i].stop_sequence == "e"
        else:
            assert len(text) == 40


def test_n_samples_with_logprobs_by_index(client, replay):
    stream = client.generate("B", 30, model="tiny", seed=2, n=3, logprobs=1, timeout=30)
    stream.text()
    for i in range(3):
        text = stream.texts[i]
        want = replay.logprobs("B", text)[np.arange(len(text)), [replay.index[c] for c in text]]
        assert np.abs(np.array([e.logprob for e in stream.logprobs[i]]) - want).max() <= TOL


# -- logit bias, allowed characters, penalties -----------------------------------------------------------------


def test_logit_bias_matches_a_greedy_replay(client, replay):
    bias = {"e": 4.0, "a": -2.5, "\n": 1.5, "T": 7.0}
    vector = np.zeros(len(replay.vocab), np.float32)
    for c, v in bias.items():
        vector[replay.index[c]] = v
    got = client.generate("ROMEO:", 80, model="tiny", temperature=0, logit_bias=bias, timeout=30).text()
    assert got == replay.greedy("ROMEO:", 80, lambda z, counts: z + vector)
    assert got != replay.greedy("ROMEO:", 80)


def test_logit_bias_extremes(client):
    never = client.generate("A", 300, model="tiny", seed=4, logit_bias={"e": -100, "t": -100}, timeout=30).text()
    assert "e" not in never and "t" not in never
    always = client.generate("A", 50, model="tiny", seed=4, logit_bias={"q": 100}, timeout=30).text()
    assert always == "q" * 50


def test_allowed_chars_only(client, replay):
    text = client.generate("A", 300, model="tiny", seed=6, allowed_chars="abc \n", timeout=30).text()
    assert set(text) <= set("abc \n") and len(set(text)) >= 3
    mask = np.full(len(replay.vocab), -np.inf, np.float32)
    mask[[replay.index[c] for c in "xyz"]] = 0
    greedy = client.generate("A", 40, model="tiny", temperature=0, allowed_chars="zyx", timeout=30).text()
    assert greedy == replay.greedy("A", 40, lambda z, counts: z + mask)


def _penalised(presence: float, frequency: float, repetition: float):
    def adjust(z, counts):
        seen = counts > 0
        z = np.where(seen, np.where(z > 0, z / repetition, z * repetition), z)
        return z - frequency * counts - presence * seen
    return adjust


@pytest.mark.parametrize("presence,frequency,repetition", [(1.5, 0, 1), (0, 0.7, 1), (0, 0, 1.8), (0.5, 0.3, 1.3),
                                                           (-1.0, 0, 1)])
def test_penalties_match_a_greedy_replay(client, replay, presence, frequency, repetition):
    got = client.generate("ROMEO:", 100, model="tiny", temperature=0, presence_penalty=presence,
                          frequency_penalty=frequency, repetition_penalty=repetition, timeout=30).text()
    assert got == replay.greedy("ROMEO:", 100, _penalised(presence, frequency, repetition))


def test_penalties_change_greedy_text(client, replay):
    plain = client.generate("ROMEO:", 100, model="tiny", temperature=0, timeout=30).text()
    assert plain == replay.greedy("ROMEO:", 100)
    penalised = client.generate("ROMEO:", 100, model="tiny", temperature=0, presence_penalty=2, timeout=30).text()
    assert penalised != plain and len(set(penalised)) > len(set(plain))


# -- regex ----------------------------------------------------------------------------------------------------

NAME = r"[A-Z][a-z]+\n"


def test_regex_names_in_one_request(client):
    stream = client.generate("", 60, model="tiny", seed=1, n=20, regex=NAME, timeout=60)
    stream.text()
    assert len(stream.texts) == 20
    for i, text in stream.texts.items():
        if stream.finish_reasons[i] == "match_complete":
            assert re.fullmatch(NAME, text), text
        else:  # out of characters before the newline: a prefix of a match
            assert stream.finish_reasons[i] == "length" and re.fullmatch(r"[A-Z][a-z]*", text), text
    assert sum(r == "match_complete" for r in stream.finish_reasons.values()) >= 10


@pytest.mark.parametrize("regex,check", [
    (r"(yes|no|maybe)", lambda t: t in ("yes", "no", "maybe")),
    (r"[0-9]*", None),  # handled below: no digit is in the vocabulary, so only the empty text matches
    (r"a{3,5}b", lambda t: re.fullmatch(r"a{3,5}b", t)),
    (r"(ab)+", lambda t: re.fullmatch(r"(ab)+", t)),
])
def test_regex_streams_only_matching_text(client, regex, check):
    if check is None:
        with pytest.raises(ServiceError) as e:
            client.generate("A", 10, model="tiny", regex=regex, timeout=30).text()
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "only the empty text" in str(e.value)
        return
    for seed in range(4):
        stream = client.generate("A", 30, model="tiny", seed=seed, regex=regex, timeout=30)
        text = stream.text()
        assert check(text) or stream.finish_reason == "length", (regex, text)
        if regex != r"(ab)+":  # (ab)+ can always go on: it ends by length
            assert stream.finish_reason == "match_complete", (regex, text, stream.finish_reason)


def test_regex_with_greedy_matches_a_masked_replay(client, replay):
    # (yes|no): after "y" only "e" is allowed, after "ye" only "s".
    text = client.generate("A", 10, model="tiny", temperature=0, regex=r"yes|no", timeout=30).text()
    first = np.full(len(replay.vocab), -np.inf, np.float32)
    first[[replay.index["y"], replay.index["n"]]] = 0
    assert text[0] == replay.greedy("A", 1, lambda z, counts: z + first)
    assert text in ("yes", "no")


# -- bad values -----------------------------------------------------------------------------------------------

BAD = [
    ({"logprobs": 21}, ["logprobs", "21", "20"]),
    ({"n": 25}, ["n", "25", "24"]),
    ({"logit_bias": {"ab": 1.0}}, ["logit_bias", "'ab'", "one character"]),
    ({"logit_bias": {"": 1.0}}, ["logit_bias", "one character"]),
    ({"logit_bias": {"9": 1.0}}, ["logit_bias", "'9'", "vocabulary"]),
    ({"logit_bias": {"a": 150.0}}, ["logit_bias", "150", "[-100, 100]"]),
    ({"logit_bias": {"a": float("nan")}}, ["logit_bias", "nan", "[-100, 100]"]),
    ({"allowed_chars": "ab9"}, ["allowed_chars", "'9'", "vocabulary"]),
    ({"regex": "(ab"}, ["regex", "(ab"]),
    ({"regex": "[a-z]{500}"}, ["regex", "300", "states"]),
    ({"regex": "[0-9]+"}, ["regex", "[0-9]+", "vocabulary"]),
    ({"regex": "abc", "allowed_chars": "xyz"}, ["regex", "abc"]),
    ({"regex": "a+", "stop": ["b"]}, ["regex", "stop"]),
    ({"presence_penalty": 2.5}, ["presence_penalty", "2.5", "[-2, 2]"]),
    ({"frequency_penalty": -3.0}, ["frequency_penalty", "-3", "[-2, 2]"]),
    ({"repetition_penalty": -1.0}, ["repetition_penalty", "-1"]),
    ({"repetition_penalty": 11.0}, ["repetition_penalty", "11"]),
]


@pytest.mark.parametrize("fields,words", BAD, ids=[str(f) for f, _ in BAD])
def test_a_bad_control_is_invalid_argument_naming_it(client, fields, words):
    details = _bad(client, dict(fields))
    for w in words:
        assert w in details, (w, details)


@pytest.mark.parametrize("fields,words", [
    ({"text": "x" * 5001}, ["text", "5001", "5000"]),
    ({"text": ""}, ["text"]),
    ({"text": "ab9"}, ["text", "'9'", "vocabulary"]),
    ({"text": "ab", "prime": "9"}, ["prime", "'9'"]),
    ({"text": "ab", "top_logprobs": 21}, ["top_logprobs", "21", "20"]),
])
def test_a_bad_score_is_invalid_argument_naming_it(client, fields, words):
    details = _bad(client, dict(fields), score=True)
    for w in words:
        assert w in details, (w, details)


def test_unknown_model_in_score_is_not_found(client):
    with pytest.raises(ServiceError) as info:
        client.score("ab", model="nosuch")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


# -- isolation: seeded text is the same alone and among streams with other controls ------------------------------

controls = st.fixed_dictionaries({}, optional={
    "logprobs": st.integers(1, 20),
    "logit_bias": st.dictionaries(st.sampled_from("abcdeABC \n"), st.floats(-100, 100, width=32), max_size=4),
    "allowed_chars": st.sampled_from(["abcdefgh \n", "ROMEO:romeo", "xyzXYZ"]),
    "presence_penalty": st.floats(-2, 2, width=32),
    "frequency_penalty": st.floats(-2, 2, width=32),
    "repetition_penalty": st.floats(0.5, 3, width=32),
    "top_k": st.integers(0, 30),
    "temperature": st.floats(0, 2, width=32),
})
regexes = st.sampled_from(["", r"[A-Z][a-z]+\n", r"(ab|cd)+", r"[a-z ]{5,40}\."])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=controls, target_regex=regexes, others=st.lists(st.tuples(controls, regexes), min_size=20,
                                                               max_size=60), seed=st.integers(0, 2**32 - 1))
def test_seeded_text_is_the_same_alone_and_among_other_controls(client, target, target_regex, others, seed):
    def fields(c, regex):
        f = dict(c)
        if regex:
            f["regex"] = regex
            f.pop("allowed_chars", None)
        return f

    def run(c, regex, seed_, n=1):
        s = client.generate("ROMEO:", 150, model="tiny", seed=seed_, n=n, timeout=60, **fields(c, regex))
        s.text()
        return s

    alone = run(target, target_regex, seed)
    results, errors = [], []

    def other(c, regex, k):
        try:
            run(c, regex, None if k % 2 else k, n=1 + k % 3)
        except ServiceError as e:  # e.g. an allowed set the regex cannot use: refused, never disturbing others
            errors.append(e)

    threads = [threading.Thread(target=other, args=(c, r, k)) for k, (c, r) in enumerate(others)]
    for t in threads:
        t.start()
    results.append(run(target, target_regex, seed))
    for t in threads:
        t.join()
    among = results[0]
    assert among.texts == alone.texts
    assert among.finish_reasons == alone.finish_reasons
    if "logprobs" in target:
        a = np.array([e.logprob for e in alone.logprobs[0]])
        b = np.array([e.logprob for e in among.logprobs[0]])
        assert np.abs(a - b).max(initial=0) <= TOL
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT for e in errors)


# -- the CLI --------------------------------------------------------------------------------------------------


def _cli(server, *args, check=True):
    return subprocess.run([str(GENERATE), "--server", server.target, "--model", "tiny", *args],
                          capture_output=True, text=True, timeout=60, check=check)


def test_cli_n_regex_and_seed(server, client):
    out = _cli(server, "-n", "4", "--regex", NAME, "--max-chars", "20", "--seed", "9").stdout
    samples = re.findall(r"--- sample (\d+) \((\w+)\)\n(.*?)\n(?=--- sample|\Z)", out, re.S)
    assert [int(i) for i, _, _ in samples] == [0, 1, 2, 3]
    for i, reason, text in samples:
        alone = client.generate("", 20, model="tiny", seed=9 + int(i), regex=NAME, timeout=30).text()
        assert text == alone and reason in ("match_complete", "length")


def test_cli_logprobs_bias_allowed(server, replay):
    r = _cli(server, "--prime", "A", "--max-chars", "12", "--seed", "2", "--logprobs", "2", "--allowed-chars",
             "abcq", "--bias", "q=-100", "--no-echo")
    text = r.stdout.rstrip("\n")
    assert len(text) == 12 and set(text) <= set("abc")
    rows = [line.split("\t") for line in r.stderr.splitlines()]
    assert [eval(row[0]) for row in rows] == list(text)
    want = replay.logprobs("A", text)[np.arange(12), [replay.index[c] for c in text]]
    assert np.abs(np.array([float(row[1]) for row in rows]) - want).max() <= 1e-3  # printed to 4 places


def test_cli_score_prints_bits_per_char(server, replay, tmp_path):
    text = "To be, or not to be, that is the question:\n"
    (tmp_path / "line.txt").write_text(text)
    out = _cli(server, "--score", str(tmp_path / "line.txt"), "--prime", "HAMLET:\n").stdout
    bits = float(re.search(r"([0-9.]+) bits per character", out).group(1))
    lp = replay.logprobs("HAMLET:\n", text)[np.arange(len(text)), [replay.index[c] for c in text]]
    assert bits == pytest.approx(-lp.mean() / math.log(2), abs=1e-4)
    bad = _cli(server, "--score", str(tmp_path / "line.txt"), "--prime", "9", check=False)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "prime" in bad.stderr


def test_cli_bad_bias_flag_exits_2(server):
    r = _cli(server, "--bias", "q", check=False)
    assert r.returncode == 2 and "--bias" in r.stderr
