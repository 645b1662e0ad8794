"""An engine that fails or hangs never hangs its callers: it heals, or leaves the load balancer, loudly.

Each test runs a real charrnn-serve whose onnxruntime calls obey a control file
(testkit/ortfault.py), the way a broken device makes them fail, and talks to it
over a real socket. Time bounds here only tell "answers" from "hangs until the
deadline"; the figures themselves come from ``python -m bench.engine_faults``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import onnxruntime as ort
import pytest

from charrnn.service import errors
from charrnn.service.client import GeneratorClient, ServiceError
from charrnn.service import cores
from charrnn.service.metrics import Metrics
from charrnn.service.repository import ModelRepository
from charrnn.service.engine import EngineState, RestartPolicy
from testkit.requests import generation_request
from testkit import probes
from testkit.ortfault import ENV, set_fault
from testkit.serve_process import ServeProcess, blocked_env

FAST = ("--engine-restart-backoff", "0.05", "--engine-max-backoff", "0.5", "--engine-max-failures", "3",
        "--engine-failure-window", "30")


@pytest.fixture
def faulty(model_repo, tmp_path):
    """(start(*args) -> ServeProcess over MODELS/tiny alone, the control file)."""
    control = tmp_path / "fault"
    set_fault(control, "ok")
    repo = tmp_path / "models"
    repo.mkdir()
    (repo / "tiny").symlink_to(model_repo / "tiny")
    env = blocked_env(tmp_path, {ENV: str(control)})
    servers = []

    def start(*args: str) -> ServeProcess:
        proc = ServeProcess(repo, "--max-chars", "1000000", *FAST, *args, env=env).start()
        servers.append(proc)
        return proc

    yield start, control
    set_fault(control, "ok")  # a hung engine thread lets go, so the server can drain
    for proc in servers:
        proc.stop()


def _endless(client: GeneratorClient):
    stream = client.generate("ROMEO:", 1_000_000, model="tiny", timeout=60)
    chunks = iter(stream)
    assert next(chunks)
    return chunks


def _ends_with(chunks) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        for _ in chunks:
            pass
    return info.value


def _served_within(client: GeneratorClient, seconds: float) -> float:
    """Retries a short request until it succeeds; returns how long that took."""
    start = time.monotonic()
    while True:
        try:
            assert len(client.generate("A", 5, model="tiny", timeout=10).text()) == 5
            return time.monotonic() - start
        except ServiceError as e:
            assert e.code.name == "UNAVAILABLE", e
            assert time.monotonic() - start < seconds, f"not served again within {seconds}s: {e}"
            time.sleep(0.02)


def _wait_health(client: GeneratorClient, service: str, status: str, seconds: float = 20.0) -> float:
    start = time.monotonic()
    while client.health(service) != status:
        assert time.monotonic() - start < seconds, f"health of {service!r} never became {status}"
        time.sleep(0.02)
    return time.monotonic() - start


def _wait_state(client: GeneratorClient, state: str, seconds: float = 30.0) -> None:
    start = time.monotonic()
    while [m.state for m in client.list_models()] != [state]:
        assert time.monotonic() - start < seconds, f"the model never became {state}"
        time.sleep(0.02)


def _metric(server: ServeProcess, name: str, **labels) -> float:
    text = probes.scrape(server.metrics_url)
    assert probes.has_series(text, name, **labels), f"{name}{labels} not exposed"
    return probes.metric_sum(text, name, **labels)


@pytest.mark.parametrize("batching", ["on", "off"])
def test_a_transient_fault_ends_the_stream_in_flight_and_the_next_request_succeeds(faulty, batching):
    start, control = faulty
    server = start("--batching", batching)
    with GeneratorClient(server.target) as client:
        assert _metric(server, "charrnn_engine_failures_total", model="tiny") == 0
        chunks = _endless(client)
        set_fault(control, "fail 1")
        err = _ends_with(chunks)
        assert err.code.name == "UNAVAILABLE"
        assert "tiny@1" in err.details and "failed" in err.details and "injected fault" in err.details
        _served_within(client, 10.0)
        assert client.health("tiny") == "SERVING" and client.health("") == "SERVING"
        assert _metric(server, "charrnn_engine_failures_total", model="tiny") == 1
        assert _metric(server, "charrnn_engine_state", model="tiny", state="serving") == 1
        assert "engine of tiny@1 failed" in server.log()


@pytest.mark.parametrize("batching", ["on", "off"])
def test_a_permanent_fault_refuses_at_once_and_turns_health_not_serving(faulty, batching):
    start, control = faulty
    server = start("--batching", batching, "--max-active-streams", "1", "--max-queue", "4")
    with GeneratorClient(server.target) as client:
        active = _endless(client)
        queued = iter(client.generate("JULIET:", 50, model="tiny", timeout=60))
        time.sleep(0.2)  # the second request is in the queue behind the first
        set_fault(control, "fail")
        for chunks in (active, queued):
            assert _ends_with(chunks).code.name == "UNAVAILABLE"
        # New requests while it restarts or after it failed: UNAVAILABLE at once, naming the model.
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(ServiceError) as info:
                client.generate("A", 5, model="tiny", timeout=30).text()
            assert info.value.code.name == "UNAVAILABLE" and "tiny@1" in info.value.details
            assert time.monotonic() - started < 5.0  # refused, not left waiting for its 30 s deadline
        _wait_state(client, "failed")
        for service in ("tiny", "charrnn.v1.Generator", ""):
            assert client.health(service) == "NOT_SERVING", service
        assert client.health("liveness") == "SERVING"  # a failed call is no hang: the process is fine
        with pytest.raises(ServiceError, match=r"tiny@1 has failed: \d+ engine failures"):
            client.generate("A", 5, model="tiny", timeout=30).text()
        assert [m.state for m in client.list_models()] == ["failed"]
        assert _metric(server, "charrnn_engine_state", model="tiny", state="failed") == 1
        assert _metric(server, "charrnn_engine_failures_total", model="tiny") >= 3


def test_a_failed_model_serves_again_when_the_fault_clears(faulty):
    start, control = faulty
    server = start()
    with GeneratorClient(server.target) as client:
        set_fault(control, "fail")
        with pytest.raises(ServiceError):
            client.generate("A", 5, model="tiny", timeout=30).text()
        _wait_state(client, "failed")
        set_fault(control, "ok")
        _wait_health(client, "tiny", "SERVING")  # the slow retries (--engine-max-backoff) keep going
        assert client.health("") == "SERVING"
        _served_within(client, 10.0)
        assert [m.state for m in client.list_models()] == ["serving"]
        assert "restarted and serving" in server.log()


def test_a_hung_step_kills_its_core_and_a_hang_that_persists_fails_the_model(faulty):
    start, control = faulty
    server = start("--step-timeout", "1")
    with GeneratorClient(server.target) as client:
        chunks = _endless(client)
        set_fault(control, "hang")
        err = _ends_with(chunks)
        assert err.code.name == "UNAVAILABLE" and "made no progress" in err.details and "tiny@1" in err.details
        # Each restart's trial step hangs too: killed after --step-timeout, until the model is marked failed.
        _wait_state(client, "failed")
        assert client.health("tiny") == "NOT_SERVING"
        assert client.health("liveness") == "SERVING"  # a core process can always be killed: the pod is fine
        assert _metric(server, "charrnn_engine_failures_total", model="tiny") >= 3
        set_fault(control, "ok")
        _wait_state(client, "serving")
        _served_within(client, 10.0)
    assert "trial step: --step-timeout" in server.log()


def test_an_engine_on_a_thread_that_hangs_is_abandoned_and_fails_liveness(model_repo, monkeypatch):
    """In-process engines (cores.ThreadCore) cannot be killed: the model fails and `liveness` tells the kubelet."""
    metrics = Metrics()
    repo = ModelRepository(model_repo, device="cpu", engine_factory=cores.factory("thread", device="cpu", threads=0, metrics=metrics),
                           metrics=metrics, log=logging.getLogger("test.hang"), policy=RestartPolicy(step_timeout=0.5))
    repo.load()
    entry = repo.resolve("tiny")
    hang, release = threading.Event(), threading.Event()
    run = ort.InferenceSession.run

    def hanging(self, *args, **kwargs):  # every session's run blocks while armed: a call into a wedged device
        if hang.is_set() and threading.current_thread().name.startswith("engine-"):
            release.wait(60)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", hanging)

    async def main():
        stream = entry.engine.submit(generation_request(entry.model.metadata, "A", 10**6, request_id="h"))
        await stream.__anext__()
        hang.set()
        started = time.monotonic()
        while not stream.done:
            repo.check_engines(time.monotonic())
            assert time.monotonic() - started < 20, "the hung engine was never noticed"
            await asyncio.sleep(0.05)
        with pytest.raises(errors.Unavailable, match="made no progress"):
            async for _ in stream:
                pass

    try:
        asyncio.run(main())
        assert entry.engine.state is EngineState.FAILED and entry.engine.hung and repo.hung
        with pytest.raises(errors.Unavailable, match="made no progress .*the server must be restarted"):
            entry.engine.submit(generation_request(entry.model.metadata, "A", 5))
    finally:
        release.set()
        repo.close(0)


@pytest.mark.parametrize("side", ["core", "client"])
def test_a_failure_on_an_io_thread_ends_the_streams_and_the_engine_restarts(model_repo, monkeypatch, side):
    """A bug on the core's I/O thread (what it receives) or the front-end client's (what it hears back) must
    not leave streams waiting: they end UNAVAILABLE at once and the engine restarts and serves again."""
    from charrnn.service import protocol

    metrics = Metrics()
    repo = ModelRepository(model_repo, device="cpu", engine_factory=cores.factory("thread", device="cpu", threads=0, metrics=metrics),
                           metrics=metrics, log=logging.getLogger("test.io"),
                           policy=RestartPolicy(backoff=0.05, max_backoff=0.5, step_timeout=30))
    repo.load()
    entry = repo.resolve("tiny")
    armed = threading.Event()
    name = "decode_to_core" if side == "core" else "decode_to_frontend"
    decode = getattr(protocol, name)
    kind = protocol.Work if side == "core" else protocol.Out

    def broken(data):
        m = decode(data)
        if armed.is_set() and isinstance(m, kind) and (side == "client" or m.add):
            armed.clear()
            raise ValueError(f"a broken {kind.__name__} message")
        return m

    monkeypatch.setattr(protocol, name, broken)

    async def main():
        meta = entry.model.metadata
        first = entry.engine.submit(generation_request(meta, "A", 10**6, request_id="first"))
        await first.__anext__()
        armed.set()
        second = entry.engine.submit(generation_request(meta, "B", 10**6, request_id="second"))
        started = time.monotonic()

        async def drain(stream):
            async for _ in stream:
                pass

        for stream in (first, second):
            with pytest.raises(errors.Unavailable):
                await asyncio.wait_for(drain(stream), 20)  # TimeoutError: the stream was left waiting
        while True:  # restarted: served again
            try:
                text = "".join([c async for c in repo.resolve("tiny").engine.submit(generation_request(meta, "A", 5))])
                return text
            except errors.Unavailable:
                assert time.monotonic() - started < 20, "the engine never served again"
                await asyncio.sleep(0.05)

    try:
        assert len(asyncio.run(main())) == 5
        assert not armed.is_set()  # the fault did fire
    finally:
        repo.close(0)
