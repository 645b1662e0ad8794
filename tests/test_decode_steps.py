"""--decode-steps and --overlap: a seeded stream's text does not depend on how many characters each decode call
advances, nor on whether the host's work overlaps the calls.

Through real sockets: two long-lived servers, --decode-steps 5 with --overlap on and --decode-steps 3 with
--overlap off (odd, so that calls end inside requests, stop sequences and lengths; --cuda-graphs on, which the
CPU ignores), get hypothesis-drawn target requests, each sent among a background of concurrent streams with other controls (regexes, bias, penalties,
log-probabilities, stops, n > 1, cancels); the oracle is a server with --decode-steps 1, each target sent alone.
Text, finish reason, stop sequence and log-probabilities must agree. In process, a core for every K from 1 to 12,
with and without overlap, against K = 1, the same way.
"""

from __future__ import annotations

import concurrent.futures
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charrnn.service import automata
from charrnn.service.client import GeneratorClient, ServiceError
from charrnn.service.runtime import load_model
from testkit import probes
from testkit.requests import engine_outputs, generation_request
from testkit.serve_process import ServeProcess

K = 5
PRIMES = ("ROMEO:", "a", "The ", "\n", "KING RICHARD III:\nNow is the winter")
REGEXES = (r"[a-z ]{3,30}\.", r"(ab|ba)+c?", r"[A-Z][a-z]+\n", r"(a|b){1,4}")
BACKGROUND = (
    {"regex": "[a-z ]{3,12}\\."}, {"logit_bias": {"e": 4.0}}, {"presence_penalty": 1.0},
    {"logprobs": 3}, {"stop": ["e", "th"]}, {"n": 3}, {"allowed_chars": "abc \n"}, {"temperature": 0.0}, {},
)


@pytest.fixture(scope="module")
def servers(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--decode-steps", str(K), "--overlap", "on", "--max-n", "4",
                      env=no_torch_env) as many, \
            ServeProcess(model_repo, "--decode-steps", "3", "--overlap", "off", "--cuda-graphs", "on", "--max-n", "4",
                         env=no_torch_env) as apart, \
            ServeProcess(model_repo, "--decode-steps", "1", "--max-n", "4", env=no_torch_env) as one:
        with GeneratorClient(many.target) as overlapped, GeneratorClient(apart.target) as in_turn, \
                GeneratorClient(one.target) as oracle:
            yield (overlapped, in_turn), oracle, many


@st.composite
def targets(draw):
    spec = {
        "prime": draw(st.sampled_from(PRIMES)),
        "max_chars": draw(st.integers(1, 70)),
        "seed": draw(st.integers(0, 2**63 - 1)),
        "temperature": draw(st.sampled_from([0.0, 0.6, 1.0, 1.4])),
        "top_k": draw(st.sampled_from([0, 0, 4])),
        "top_p": draw(st.sampled_from([0.0, 0.0, 0.8])),
        "model": draw(st.sampled_from(["tiny", "other"])),
    }
    extra = draw(st.sampled_from(["", "stop", "bias", "penalty", "logprobs", "regex"]))
    if extra == "stop":
        spec["stop"] = draw(st.lists(st.text("aeiou \nt", min_size=1, max_size=2), max_size=2, unique=True))
    elif extra == "bias":
        spec["logit_bias"] = {"a": 3.0, "z": -5.0}
    elif extra == "penalty":
        spec["frequency_penalty"] = 0.7
        spec["repetition_penalty"] = 1.2
    elif extra == "logprobs":
        spec["logprobs"] = 2
    elif extra == "regex":  # stepped inside the K-step graph; some complete (match_complete) inside a call
        spec["regex"] = draw(st.sampled_from(REGEXES))
        spec["presence_penalty"] = draw(st.sampled_from([0.0, 0.5]))
    return spec


def _ask(client: GeneratorClient, spec: dict) -> tuple:
    fields = {k: v for k, v in spec.items() if k not in ("prime", "max_chars")}
    g = client.generate(spec["prime"], spec["max_chars"], timeout=60, **fields)
    text = g.text()
    lps = [(e.char, round(e.logprob, 3), tuple(a.char for a in e.top)) for e in g.logprobs.get(0, [])]
    return text, g.finish_reason, lps


def _background(client: GeneratorClient, i: int, rng: random.Random) -> None:
    fields = dict(rng.choice(BACKGROUND))
    g = client.generate(rng.choice(PRIMES), rng.randint(5, 120), model=rng.choice(["tiny", "other"]),
                        seed=rng.randrange(2**32), timeout=60, **fields)
    try:
        for n, _ in enumerate(g):
            if i % 5 == 0 and n == 3:  # a fifth are cancelled mid-stream
                g.cancel()
                break
    except ServiceError:
        pass


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(targets(), min_size=1, max_size=6), st.integers(0, 160), st.integers(0, 2**32))
def test_seeded_text_is_the_same_for_k_steps_among_other_streams_as_for_one_step_alone(servers, specs, others,
                                                                                        seed):
    under_tests, oracle, _ = servers
    rng = random.Random(seed)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        noise = [pool.submit(_background, client, i, rng) for i in range(others) for client in under_tests]
        rng.shuffle(specs)
        got = [[pool.submit(_ask, client, s) for s in specs] for client in under_tests]
        results = [[f.result() for f in futures] for futures in got]
        for f in noise:
            f.result()
    for i, spec in enumerate(specs):
        want = _ask(oracle, spec)
        assert [r[i] for r in results] == [want, want], spec


@pytest.fixture(scope="module")
def tiny(model_repo):
    return load_model(model_repo / "tiny" / "1" / "model.onnx", "tiny", 1, "cpu")


def _texts(model, steps: int, requests: list, overlap: bool = False) -> list[tuple[str, str]]:
    got = engine_outputs(model, requests, max_active=64, max_queue=256, decode_steps=steps, overlap=overlap)
    return [(text, reason) for text, reason, _ in got]


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 12), st.booleans(), st.lists(targets(), min_size=1, max_size=40))
def test_every_k_gives_the_text_of_one_step_in_process(tiny, steps, overlap, specs):
    requests = [generation_request(tiny.metadata, s["prime"], s["max_chars"], seed=s["seed"],
                                   temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                                   stop=tuple(s.get("stop", ())), logit_bias=s.get("logit_bias", {}),
                                   frequency_penalty=s.get("frequency_penalty", 0.0),
                                   repetition_penalty=s.get("repetition_penalty", 0.0),
                                   presence_penalty=s.get("presence_penalty", 0.0), regex=s.get("regex", ""))
                for s in specs]
    assert _texts(tiny, steps, requests, overlap) == _texts(tiny, 1, requests)


def test_the_server_builds_the_k_step_graphs_and_removes_them_once_read(servers):
    *_, server = servers
    cores = [cmd.split() for cmd in probes.children(server.proc.pid).values() if "charrnn.service.corerun" in cmd]
    assert len(cores) == 2  # tiny@1 and other@1
    for argv in cores:
        assert argv[argv.index("--decode-steps") + 1] == str(K)
        prefix = Path(argv[argv.index("--decode-graphs") + 1])  # built by the server: the core imports no onnx
        assert prefix.parent.is_dir() and not list(prefix.parent.glob(prefix.name + "*"))


@pytest.mark.parametrize("steps", [3, 5])
def test_regex_states_hold_when_unused_automata_are_dropped_while_a_call_runs(tiny, monkeypatch, steps):
    """With overlap, ending rows while call t runs may drop unused automata and renumber the table's states; the
    states call t started from and returns are in the old numbering. Every request has a regex of its own, and
    the table keeps almost no slack, so that it is renumbered again and again."""
    monkeypatch.setattr(automata, "SLACK_STATES", 8)
    requests = [generation_request(tiny.metadata, PRIMES[i % len(PRIMES)], 20 + i % 37, seed=i, temperature=1.0,
                                   regex=f"([a-z]{{1,{2 + i % 9}}} ){{1,{3 + i}}}[a-z]*\\.")
                for i in range(60)]
    want = engine_outputs(tiny, requests, max_active=12, max_queue=256, decode_steps=1)
    assert engine_outputs(tiny, requests, max_active=12, max_queue=256, decode_steps=steps, overlap=True) == want
