"""Load limits through a real charrnn-serve: RESOURCE_EXHAUSTED names the limit, cancels and deadlines free slots.

The server has one batch slot and room for one waiting stream, so a single
long stream fills it.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest

from charrnn.service.client import GeneratorClient, ServiceError
from testkit import probes
from testkit.serve_process import ServeProcess

QUEUE_WAIT = 0.5  # --max-queue-wait, seconds


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    args = ("--max-active-streams", "1", "--max-queue", "1", "--max-queue-wait", str(QUEUE_WAIT),
            "--max-chars", "1000000")
    with ServeProcess(model_repo, *args, env=no_torch_env) as proc, GeneratorClient(proc.target) as client:
        proc.client = client
        yield proc


def _endless(client: GeneratorClient):
    stream = client.generate("ROMEO:", 1_000_000, model="tiny", timeout=120)
    chunks = iter(stream)
    assert next(chunks)  # holds the slot from here on
    return stream, chunks


def _count(server, code: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    return probes.metric_sum(text, "charrnn_requests_total", code=code, model="tiny")


def _wait_until_counted(server, code: str, before: float, seconds: float = 5.0) -> None:
    """Waits until charrnn_requests_total{code} rises above ``before`` (the server records after the call ends)."""
    deadline = time.monotonic() + seconds
    while _count(server, code) <= before:
        assert time.monotonic() < deadline, f"{code} not counted"
        time.sleep(0.05)


def _served_within(client: GeneratorClient, seconds: float) -> float:
    """Retries a short stream until a slot takes it; returns how long that took."""
    start = time.monotonic()
    while True:
        try:
            client.generate("A", 5, model="tiny", timeout=30).text()
            return time.monotonic() - start
        except ServiceError as e:
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - start < seconds, e
            time.sleep(0.01)


def test_full_queue_and_long_wait_are_refused_naming_the_limit(server):
    client = server.client
    stream, _ = _endless(client)
    waiting = client.generate("A", 5, model="tiny", timeout=30)  # takes the one queue place
    waiting_chunks = iter(waiting)
    time.sleep(0.1)
    with pytest.raises(ServiceError) as full:
        client.generate("A", 5, model="tiny", timeout=30).text()
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queue 1" in full.value.details and "all 1 batch slots are busy" in full.value.details
    with pytest.raises(ServiceError) as waited:
        next(waiting_chunks)
    assert waited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue-wait" in waited.value.details
    stream.cancel()
    assert _count(server, "RESOURCE_EXHAUSTED") >= 2


def test_cancelled_stream_frees_its_slot(server):
    client = server.client
    cancelled_before = _count(server, "CANCELLED")
    stream, _ = _endless(client)
    stream.cancel()
    took = _served_within(client, 5.0)
    print(f"\ncancel: the next stream got the slot {took * 1000:.0f} ms after the client cancelled")
    _wait_until_counted(server, "CANCELLED", cancelled_before)


def test_deadline_ends_the_stream_and_frees_its_slot(server):
    client = server.client
    before = _count(server, "DEADLINE_EXCEEDED")
    with pytest.raises(ServiceError) as late:
        client.generate("ROMEO:", 1_000_000, model="tiny", timeout=0.3).text()
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    took = _served_within(client, 5.0)
    print(f"\ndeadline: the next stream got the slot {took * 1000:.0f} ms after the deadline")
    _wait_until_counted(server, "DEADLINE_EXCEEDED", before)
