"""The server's processes: engine cores apart from the gRPC front-ends, and front-ends that fail apart.

A real charrnn-serve with ``--frontends 3`` (its own process and two more on
the same port) and one engine core process per model version, over real
sockets; processes are killed with SIGKILL, as the kernel's OOM killer would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import grpc
import numpy as np
import pytest
import zmq

from charrnn.service import protocol
from charrnn.service.client import GeneratorClient, ServiceError
from charrnn.service.cores import ThreadCore
from charrnn.service.metrics import Metrics
from charrnn.service.runtime import load_model
from testkit import probes
from testkit.requests import generation_request
from testkit.serve_process import ServeProcess

pytestmark = pytest.mark.slow


def _kids(server: ServeProcess, module: str) -> list[int]:
    return sorted(pid for pid, cmd in probes.children(server.proc.pid).items() if module in cmd)


def _until(predicate, seconds: float = 30.0, what: str = "") -> None:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, f"not within {seconds}s: {what}"
        time.sleep(0.05)


def _active(server: ServeProcess) -> float:
    return probes.metric_sum(probes.scrape(server.metrics_url), "charrnn_active_streams", model="tiny")


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--frontends", "3", "--log-format", "json", "--max-chars", "1000000",
                      env=no_torch_env) as proc:
        _until(lambda: len(_kids(proc, "charrnn.service.frontend")) == 2, what="two more front-ends")
        _until(lambda: sum('"front-end ' in line and ' serving"' in line for line in proc.stderr) == 2,
               what="both extra front-ends listening")
        yield proc


def _one_each(server: ServeProcess, n: int) -> list[str]:
    texts = []
    for _ in range(n):  # a channel of its own each: a connection of its own, balanced over the listeners
        with GeneratorClient(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
            texts.append(client.generate("ROMEO:", 80, model="tiny", seed=4, timeout=30).text())
    return texts


def test_every_front_end_serves_the_same_text_and_the_metrics_add_up(server):
    before = probes.metric_sum(probes.scrape(server.metrics_url), "charrnn_requests_total", model="tiny", code="OK")
    texts = _one_each(server, 24)
    assert len(set(texts)) == 1 and len(texts[0]) == 80  # seeded: the same from whichever front-end and core
    frontends = {json.loads(line).get("frontend") for line in server.stderr
                 if line.startswith("{") and '"generate ok"' in line}
    assert len(frontends) >= 2, frontends  # the kernel spread the 24 connections over the listeners
    _until(lambda: probes.metric_sum(probes.scrape(server.metrics_url), "charrnn_requests_total", model="tiny",
                                     code="OK") >= before + 24, 5, "every request counted in the one /metrics")
    assert len(_kids(server, "charrnn.service.corerun")) == 2  # tiny@1 and other@1, one core each


def test_a_killed_front_end_frees_its_slots_and_comes_back(server):
    victims = _kids(server, "charrnn.service.frontend")
    streams = []
    for _ in range(12):  # long streams over connections of their own until one sits on a victim
        client = GeneratorClient(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        stream = iter(client.generate("ROMEO:", 1_000_000, model="tiny", timeout=60))
        next(stream)
        streams.append((client, stream))
    _until(lambda: _active(server) == 12, 10, "12 streams in the core")
    os.kill(victims[0], signal.SIGKILL)
    ended = 0
    for client, stream in streams:
        try:
            for _ in range(3):
                next(stream)
            client.close()  # still alive: on another front-end
        except (ServiceError, grpc.RpcError, StopIteration):
            ended += 1
            client.close()
    _until(lambda: _active(server) == 0 or _active(server) == 12 - ended, 10, "the dead front-end's slots freed")
    _until(lambda: len(_kids(server, "charrnn.service.frontend")) == 2 and victims[0] not in
           _kids(server, "charrnn.service.frontend"), 30, "the front-end restarted")
    assert set(_one_each(server, 6)) == set(_one_each(server, 1))


def test_a_killed_core_ends_its_streams_unavailable_and_restarts(server):
    with GeneratorClient(server.target) as client:
        stream = iter(client.generate("ROMEO:", 1_000_000, model="tiny", timeout=60))
        next(stream)
        cores = _kids(server, "charrnn.service.corerun")
        tiny = next(pid for pid in cores if "--name tiny" in probes.children(server.proc.pid)[pid])
        os.kill(tiny, signal.SIGKILL)
        with pytest.raises(ServiceError) as info:
            for _ in stream:
                pass
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "tiny@1" in info.value.details
        def restarted() -> bool:
            kids = probes.children(server.proc.pid)
            return any("charrnn.service.corerun" in c and "--name tiny" in c for pid, c in kids.items() if pid != tiny)

        _until(restarted, 30, "a new core for tiny")
        _until(lambda: [m.state for m in client.list_models() if m.name == "tiny"] == ["serving"], 30, "tiny serving")
        assert len(client.generate("A", 5, model="tiny", timeout=30).text()) == 5
    assert "exited with status -9" in server.log()


def test_a_front_end_that_stops_reading_never_stalls_the_core(model_repo):
    """A front-end whose socket fills up: the core's messages to it merge and wait; the step goes on."""
    model = load_model(model_repo / "tiny" / "1" / "model.onnx", "tiny", 1, "cpu")
    engine = ThreadCore(model, metrics=Metrics())
    engine.start()
    laggard = engine.context.socket(zmq.DEALER)  # a second front-end of the same core
    laggard.setsockopt(zmq.RCVHWM, 1)
    laggard.connect(engine.address)
    try:
        laggard.send(protocol.encode(protocol.Hello(fe=7)))
        adds = [protocol.Admit(kind="generate", row=i, prime=np.array([1, 2], np.int64), max_chars=10**6, seed=i,
                               arrived=time.monotonic()) for i in range(8)]
        laggard.send(protocol.encode(protocol.Work(add=adds)))  # ... and never reads again

        async def read() -> int:
            stream = engine.submit(generation_request(model.metadata, "A", 4000))
            return len("".join([c async for c in stream]))

        _until(lambda: engine.active == 8, 10, "the laggard's streams in slots")
        # 4000 steps with the laggard's 8 rows in them; a core that waited for the laggard would never end.
        assert asyncio.run(asyncio.wait_for(read(), 60)) == 4000
        _until(lambda: engine.active == 8, 5, "the laggard's streams still running: it lags, it is not gone")
    finally:
        laggard.close()
        engine.stop(5.0)
