"""The core's stateful tables on one long-lived server, against an oracle.

A server keeps tables that outlive a request: the stop and regex automata
(shared by every row that asks for the same set), the prime cache, and the
slots that streams take and free. A bug in any of them shows only after some
earlier request left its mark, so one fresh server per case cannot find it.
Here one server answers a few hundred requests, drawn by hypothesis and sent
in a random order, several at a time; stop sets and regexes repeat, overlap
and are new, primes repeat (cache hits) and are new, some streams are
cancelled half-way, some ask for several samples.

Every answer is checked against an oracle from a second server that runs
with batching off (every stream alone, no prime cache, no shared tables):

- with stop sequences: the same seeded request's text without stops, cut
  before the first stop that ends in it (the longest of those ending at the
  same character), with finish reason ``stop_sequence`` and that stop;
  without a stop in it, the same text and finish reason;
- with a regex: a complete match when the finish reason says so, and a match
  of a prefix otherwise (checked on interegular's automaton of the pattern);
- with ``n``: sample i equals the request with ``n`` = 1 and seed + i;
- a cancelled stream: what it received is a prefix of its oracle text.
"""

from __future__ import annotations

import concurrent.futures
import functools
import random
import threading

import grpc
import interegular
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from charrnn.service.client import GeneratorClient, ServiceError
from testkit.serve_process import ServeProcess

MAX_CHARS = 90
PRIMES = ["", "A", "ROMEO:", "the ", "First Citizen:\nBefore we proceed any further, hear me speak.\n"]
ALLOWED = ["", "ab \n", "abc"]  # narrow alphabets make two- and three-character stops common
REGEXES = ["", r"[a-z ]{3,30}\.", r"(ab|ba)+c?", r"[A-Z][a-z]+\n"]


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    """The server under test: few slots, so that streams queue, and slots and automata are reused."""
    with ServeProcess(model_repo, "--max-active-streams", "6", "--max-n", "4", env=no_torch_env) as proc:
        yield proc


@pytest.fixture(scope="module")
def reference(model_repo, no_torch_env):
    """The oracle: every stream alone, nothing shared and nothing cached."""
    with ServeProcess(model_repo, "--batching", "off", env=no_torch_env) as proc:
        yield proc


@pytest.fixture(scope="module")
def clients(server, reference):
    with GeneratorClient(server.target) as under_test, GeneratorClient(reference.target) as oracle:
        yield under_test, oracle


def _stops(alphabet: str):
    chars = alphabet or "aeiou \nTt:"
    word = st.text(alphabet=chars, min_size=1, max_size=3)
    return st.lists(word, min_size=0, max_size=3, unique=True)


@st.composite
def specs(draw):
    allowed = draw(st.sampled_from(ALLOWED))
    regex = draw(st.sampled_from(REGEXES)) if not allowed else ""
    spec = {
        "prime": draw(st.sampled_from(PRIMES)),
        "max_chars": draw(st.integers(1, MAX_CHARS)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "temperature": draw(st.sampled_from([0.0, 0.7, 1.0, 1.5])),
        "top_k": draw(st.sampled_from([0, 5])),
        "n": draw(st.sampled_from([1, 1, 1, 2, 3])),
        "stop": tuple(draw(_stops(allowed))) if not regex else (),  # a regex carries its own end
        "allowed_chars": allowed,
        "regex": regex,
        "presence_penalty": draw(st.sampled_from([0.0, 0.0, 0.8])),
        "repetition_penalty": draw(st.sampled_from([0.0, 0.0, 1.3])),
        "cancel": draw(st.booleans()) and draw(st.booleans()),  # a quarter of them
    }
    return spec


def workloads():
    # Stop sets drawn from a small pool repeat (the bug: a set's second use), and some are new.
    return st.lists(specs(), min_size=60, max_size=90)


class Oracle:
    """Texts of requests without stops, n = 1, from the reference server, each asked for once."""

    def __init__(self, client: GeneratorClient):
        self.client = client
        self._lock = threading.Lock()
        self._memo: dict[tuple, tuple[str, str]] = {}

    def plain(self, spec: dict, seed: int) -> tuple[str, str]:
        fields = {k: v for k, v in spec.items() if k not in ("stop", "cancel", "n", "prime", "max_chars", "seed")}
        key = (spec["prime"], spec["max_chars"], seed, tuple(sorted(fields.items())))
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        g = self.client.generate(spec["prime"], spec["max_chars"], model="tiny", seed=seed, timeout=60, **fields)
        result = (g.text(), g.finish_reason)
        with self._lock:
            self._memo[key] = result
        return result

    def expected(self, spec: dict, index: int) -> tuple[str, str, str]:
        """(text, finish reason, stop sequence) that sample ``index`` of ``spec`` must give."""
        text, reason = self.plain(spec, spec["seed"] + index)
        return cut(text, reason, spec["stop"])


def cut(text: str, reason: str, stops: tuple[str, ...]) -> tuple[str, str, str]:
    """The text cut before the first stop sequence that ends in it, the longest of those that end there."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[: end - len(stop)], "stop_sequence", stop
    return text, reason, ""


@functools.lru_cache(maxsize=None)
def _fsm(pattern: str):
    fsm = interegular.parse_pattern(pattern).to_fsm()
    reaches_final = set(fsm.finals)
    changed = True
    while changed:  # states from which a final state can be reached
        changed = False
        for state, row in fsm.map.items():
            if state not in reaches_final and any(t in reaches_final for t in row.values()):
                reaches_final.add(state)
                changed = True
    return fsm, reaches_final


def regex_walk(pattern: str, text: str):
    """The state of the pattern's automaton after ``text`` (None: no match can begin with it), and whether a
    complete match is still reachable from there."""
    fsm, live = _fsm(pattern)
    state = fsm.initial
    for ch in text:
        state = fsm.map.get(state, {}).get(fsm.alphabet[ch])
        if state is None:
            return None, False
    return state, state in live


def run(client: GeneratorClient, spec: dict) -> dict:
    fields = {k: v for k, v in spec.items() if k not in ("cancel", "prime", "max_chars")}
    g = client.generate(spec["prime"], spec["max_chars"], model="tiny", timeout=60, **fields)
    received = ""
    try:
        for chunk in g:
            received += chunk
            if spec["cancel"] and len(received) >= 3:
                g.cancel()
    except ServiceError as e:
        if not (spec["cancel"] and e.code == grpc.StatusCode.CANCELLED):
            raise
        return {"cancelled": True, "received": received, "texts": dict(g.texts)}
    return {"cancelled": False, "texts": dict(g.texts), "reasons": dict(g.finish_reasons),
            "stops": {i: s.stop_sequence for i, s in g.all_stats.items()}}


def check(spec: dict, got: dict, oracle: Oracle) -> list[str]:
    """What is wrong with one answer (empty: nothing)."""
    wrong = []
    for i in range(spec["n"]):
        want_text, want_reason, want_stop = oracle.expected(spec, i)
        if got["cancelled"]:
            text = got["texts"].get(i, "")
            if not want_text.startswith(text):
                wrong.append(f"sample {i} cancelled: {text!r} is not a prefix of {want_text!r}")
            continue
        text, reason, stop = got["texts"].get(i, ""), got["reasons"].get(i), got["stops"].get(i, "")
        if (text, reason, stop) != (want_text, want_reason, want_stop):
            wrong.append(f"sample {i}: got {(text, reason, stop)!r}, want {(want_text, want_reason, want_stop)!r}")
        if spec["regex"]:
            state, live = regex_walk(spec["regex"], text)
            if state is None or not live:
                wrong.append(f"sample {i}: {text!r} is no prefix of a match of {spec['regex']!r}")
            if reason == "match_complete" and not interegular.parse_pattern(spec["regex"]).to_fsm().accepts(text):
                wrong.append(f"sample {i}: {text!r} ended match_complete but does not match {spec['regex']!r}")
    return wrong


@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking:
          # the first failing workload is reported whole, with how many of its requests were wrong
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(workload=workloads(), order=st.randoms(use_true_random=False))
def test_stateful_tables_hold_over_hundreds_of_requests_on_one_server(clients, workload, order):
    under_test, reference = clients
    oracle = Oracle(reference)
    order.shuffle(workload)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda s: run(under_test, s), workload))
    wrong = []
    for spec, got in zip(workload, answers):
        for problem in check(spec, got, oracle):
            wrong.append(f"{ {k: v for k, v in spec.items()} }: {problem}")
    assert not wrong, f"{len(wrong)} of {len(workload)} requests wrong:\n" + "\n".join(wrong[:10])


def test_a_stop_set_holds_on_its_every_use(clients):
    """The plainest form of the bug: the same stop set, many times over, one after another."""
    under_test, reference = clients
    oracle = Oracle(reference)
    rng = random.Random(7)
    wrong = []
    for k in range(40):
        spec = {"prime": "ROMEO:", "max_chars": 80, "seed": rng.randrange(2**32), "temperature": 1.0, "top_k": 0,
                "n": 1, "stop": ("e",) if k % 2 else ("a", "b"), "allowed_chars": "", "regex": "",
                "presence_penalty": 0.0, "repetition_penalty": 0.0, "cancel": False}
        wrong += [f"request {k}: {p}" for p in check(spec, run(under_test, spec), oracle)]
    assert not wrong, "\n".join(wrong[:10])


def test_the_workload_reached_every_table(server):
    """The tests above ran on this one server: its prime cache was hit and missed, and more streams than it has
    slots came and went (each slot reused), so none of its tables was only ever fresh."""
    from testkit import probes

    text = probes.scrape(server.metrics_url)
    assert probes.metric_sum(text, "charrnn_prime_cache_lookups_total", result="hit") > 20
    assert probes.metric_sum(text, "charrnn_prime_cache_lookups_total", result="miss") >= 3  # the primes of PRIMES read once each
    assert probes.metric_sum(text, "charrnn_requests_total") > 6 * 20
