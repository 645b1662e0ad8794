"""A replica's death costs its callers nothing: three real replicas, one killed, one drained, all restarted.

Three `charrnn-serve` processes on 127.0.0.1 serve the same model; callers use
the resuming GeneratorClient with all three addresses. Streams of every kind
(seeded and not, stop sequences, a regex, penalties, n = 2) run while

- one replica is killed with SIGKILL mid-stream and another is drained with
  SIGTERM (a short --drain-grace, so that streams outlive it);
- every replica is restarted in turn, as a rolling update does.

No caller may see an error, and every sample's final text must equal an uncut
run of the same request (n 1, the seed the stream reported) on a replica that
nothing happened to. ``resumes`` counts that the cuts really happened.
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import socket
import threading
import time

import pytest

from charrnn.service.client import GeneratorClient, ServiceError
from testkit.serve_process import ServeProcess

pytestmark = pytest.mark.slow

MAX_CHARS = 2000
KINDS = [
    {"seed": "own", "temperature": 1.0},
    {"temperature": 0.9},  # unseeded: resumed through the seed its first message reported
    {"seed": "own", "stop": ["qz", "Xw"], "temperature": 1.2},
    {"seed": "own", "regex": r"([a-z]+ ){20,300}[a-z]+\.", "temperature": 1.0},
    {"seed": "own", "presence_penalty": 0.5, "repetition_penalty": 1.3},
    {"seed": "own", "n": 2, "top_k": 20},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replicas:
    """Three servers on fixed ports (a restarted one comes back where its callers look for it)."""

    def __init__(self, models, env, count: int = 3):
        self.models, self.env = models, env
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[ServeProcess | None] = [None] * count

    def start(self, i: int) -> None:
        self.procs[i] = ServeProcess(self.models, "--port", str(self.ports[i]), "--drain-grace", "0.3",
                                     env=self.env).start()

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def stop_all(self) -> None:
        for p in self.procs:
            if p is not None and p.proc.poll() is None:
                p.stop()


@pytest.fixture
def replicas(model_repo, no_torch_env):
    r = Replicas(model_repo, no_torch_env)
    for i in range(3):
        r.start(i)
    yield r
    r.stop_all()


def requests(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for k in range(count):
        spec = dict(KINDS[k % len(KINDS)])
        if spec.get("seed") == "own":
            spec["seed"] = rng.randrange(2**40)
        spec["prime"] = rng.choice(["ROMEO:", "", "the ", "A"])
        out.append(spec)
    return out


class Load:
    """Callers, each in its own thread, reading whole streams through one resuming client."""

    def __init__(self, client: GeneratorClient, specs: list[dict], max_chars: int):
        self.client, self.specs, self.max_chars = client, specs, max_chars
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.started = 0  # streams that received their first text
        self._lock = threading.Lock()

    def one(self, spec: dict) -> None:
        fields = {k: v for k, v in spec.items() if k != "prime"}
        try:
            g = self.client.generate(spec["prime"], self.max_chars, model="tiny", timeout=120, **fields)
            first = True
            for _ in g:
                if first:
                    with self._lock:
                        self.started += 1
                    first = False
            with self._lock:
                self.results.append({"spec": spec, "texts": dict(g.texts), "reasons": dict(g.finish_reasons),
                                     "seeds": dict(g.seeds), "resumes": g.resumes, "model": g.model})
        except ServiceError as e:
            with self._lock:
                self.errors.append(f"{spec}: {e}")

    def run_all(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.one, args=(s,)) for s in self.specs]
        for t in threads:
            t.start()
        return threads


def check_against_uncut(results: list[dict], target: str, max_chars: int) -> tuple[int, list[str]]:
    """(characters compared, mismatches) of every sample against its uncut run on ``target``."""
    samples = [(r, i, text) for r in results for i, text in r["texts"].items()]

    def uncut(client: GeneratorClient, r: dict, i: int):
        spec = r["spec"]
        fields = {k: v for k, v in spec.items() if k not in ("prime", "n", "seed")}
        g = client.generate(spec["prime"], max_chars, model=r["model"], seed=r["seeds"][i], n=1, timeout=120,
                            **fields)
        return g.text(), g.finish_reason

    with GeneratorClient(target, max_resumes=0) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda sample: uncut(client, sample[0], sample[1]), samples))
    compared, wrong = 0, []
    for (r, i, text), (want, reason) in zip(samples, answers):
        compared += len(want)
        if (text, r["reasons"].get(i)) != (want, reason):
            first = next((k for k, (a, b) in enumerate(zip(text, want)) if a != b), min(len(text), len(want)))
            wrong.append(f"{r['spec']} sample {i} (resumed {r['resumes']} times): {len(text)} characters, "
                         f"{r['reasons'].get(i)}; uncut {len(want)}, {reason}; first difference at {first}")
    return compared, wrong


def wait_until(predicate, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)


def test_a_killed_and_a_drained_replica_cost_the_callers_nothing(replicas):
    specs = requests(64, seed=1)
    with GeneratorClient(replicas.targets, backoff=0.05) as client:
        load = Load(client, specs, MAX_CHARS)
        threads = load.run_all()
        wait_until(lambda: load.started >= len(specs) // 2, 60)
        replicas.procs[0].proc.send_signal(signal.SIGKILL)  # mid-stream: no drain, no goodbye
        time.sleep(0.2)
        replicas.procs[1].signal(signal.SIGTERM)  # drains: streams left after 0.3 s end UNAVAILABLE
        for t in threads:
            t.join(180)
    assert not load.errors, "\n".join(load.errors[:5])
    assert len(load.results) == len(specs)
    resumed = sum(r["resumes"] > 0 for r in load.results)
    assert resumed > 0, "no stream was cut: the kill came too late to test anything"
    compared, wrong = check_against_uncut(load.results, replicas.targets[2], MAX_CHARS)
    assert not wrong, f"{len(wrong)} of {len(load.results)} streams differ from their uncut run:\n" + "\n".join(wrong[:5])
    print(f"\n{len(specs)} streams, {resumed} resumed, {compared} characters compared, 0 mismatches")


def test_a_rolling_update_loses_nothing(replicas):
    specs = requests(48, seed=2)
    with GeneratorClient(replicas.targets, backoff=0.05) as client:
        load = Load(client, [], 600)
        done = threading.Event()

        def caller(k: int) -> None:
            j = k
            while not done.is_set() and j < len(specs):
                load.one(specs[j])
                j += 8

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for i in range(3):  # each replica in turn: drained, then started again on its port
            wait_until(lambda: load.started >= 4 * (i + 1), 60)
            replicas.procs[i].stop()
            replicas.start(i)
        done.set()
        for t in threads:
            t.join(180)
    assert not load.errors, "\n".join(load.errors[:5])
    compared, wrong = check_against_uncut(load.results, replicas.targets[0], 600)
    assert not wrong, "\n".join(wrong[:5])
    assert compared > 0


def test_a_hung_replica_is_left_after_its_health_check_fails(replicas):
    """A replica that stops answering without closing its connections (SIGSTOP: a wedged node): no message for
    stall_seconds, its health check times out, and the streams on it resume on another replica."""
    specs = requests(12, seed=3)
    with GeneratorClient(replicas.targets, backoff=0.05, stall_seconds=1.0) as client:
        load = Load(client, specs, MAX_CHARS)
        threads = load.run_all()
        wait_until(lambda: load.started >= len(specs) // 2, 60)
        replicas.procs[0].proc.send_signal(signal.SIGSTOP)
        try:
            for t in threads:
                t.join(120)
        finally:
            replicas.procs[0].proc.send_signal(signal.SIGCONT)
    assert not load.errors, "\n".join(load.errors[:5])
    assert sum(r["resumes"] > 0 for r in load.results) > 0, "no stream was on the hung replica"
    compared, wrong = check_against_uncut(load.results, replicas.targets[2], MAX_CHARS)
    assert not wrong, "\n".join(wrong[:5])

