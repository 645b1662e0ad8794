"""Hot reload of a real charrnn-serve's repository, on SIGHUP and by polling (--reload-interval).

New versions serve new streams without a restart while streams in flight finish
on the version they started on; a corrupt new version is refused and the old one
keeps serving; a removed model stops taking streams, drains, and its health
turns NOT_SERVING. Models are published the way a deployment should: written
in a hidden folder, then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from charrnn.modelfile import MODEL_FILE
from charrnn.service.client import GeneratorClient, ServiceError
from testkit.modelfactory import make_model_repo
from testkit.serve_process import ServeProcess

LONG_STREAM_SECONDS = 1.5  # how long the in-flight stream should take, judged from a measured rate


def _publish(repo: Path, name: str, version: int, *, garbage: bool = False) -> None:
    staging = repo / f".staging-{name}-{version}"
    if garbage:
        (staging / name / str(version)).mkdir(parents=True)
        (staging / name / str(version) / MODEL_FILE).write_bytes(b"truncated upload")
    else:
        make_model_repo(staging, name=name, versions=(version,), seed=100)
    (repo / name).mkdir(exist_ok=True)
    os.rename(staging / name / str(version), repo / name / str(version))
    shutil.rmtree(staging)


class _Reader(threading.Thread):
    def __init__(self, client: GeneratorClient, model: str, max_chars: int):
        super().__init__(daemon=True)
        self.stream = client.generate("ROMEO:", max_chars, model=model, seed=2, timeout=120)
        self.chars, self.error, self.ended = 0, None, 0.0
        self.first = threading.Event()

    def run(self) -> None:
        try:
            for chunk in self.stream:
                self.chars += len(chunk)
                self.first.set()
        except ServiceError as e:
            self.error = e
        self.ended = time.monotonic()
        self.first.set()


def _long_stream(client: GeneratorClient, model: str) -> _Reader:
    """A stream sized to run about LONG_STREAM_SECONDS on this machine, started and producing."""
    probe = client.generate("ROMEO:", 2000, model=model, seed=1, timeout=60)
    probe.text()
    rate = probe.stats.generated_chars / max(probe.stats.decode_seconds, 1e-3)  # characters per second
    reader = _Reader(client, model, int(min(max(rate * LONG_STREAM_SECONDS, 3000), 1_000_000)))
    reader.start()
    assert reader.first.wait(30) and reader.error is None
    return reader


def _model_of(client: GeneratorClient, model: str) -> str:
    stream = client.generate("ROMEO:", 5, model=model, timeout=30)
    stream.text()
    return stream.stats.model


@pytest.fixture(scope="module")
def sighup_server(model_repo, no_torch_env, tmp_path_factory):
    repo = Path(shutil.copytree(model_repo, tmp_path_factory.mktemp("reload") / "models"))
    with ServeProcess(repo, "--max-chars", "1000000", env=no_torch_env) as proc:
        proc.repo = repo
        proc.client = GeneratorClient(proc.target)
        yield proc
        proc.client.close()


def _reload(proc: ServeProcess, expect: str) -> float:
    """Sends SIGHUP and waits for the reload log line containing ``expect``; returns the seconds it took."""
    mark = len(proc.stderr)
    sent = time.monotonic()
    proc.signal(signal.SIGHUP)
    proc.wait_for_log(r"reloaded trigger=SIGHUP changes=.*" + expect, start=mark)
    return time.monotonic() - sent


def test_new_version_serves_new_streams_while_streams_in_flight_finish_on_the_old(sighup_server):
    proc, client = sighup_server, sighup_server.client
    old = _long_stream(client, "tiny")
    _publish(proc.repo, "tiny", 2)
    took = _reload(proc, "added tiny@2")
    reloaded = time.monotonic()
    assert _model_of(client, "tiny") == "tiny@2"
    assert _model_of(client, "tiny@1") == "tiny@1"  # the old version stays while its folder does
    assert old.is_alive(), "the in-flight stream ended before the reload; the test proves nothing"
    old.join(60)
    assert old.error is None and old.stream.stats.model == "tiny@1" and old.stream.finish_reason == "length"
    print(f"\nreload (SIGHUP, new version): {took * 1000:.0f} ms; the old stream finished "
          f"{old.ended - reloaded:.2f} s later on tiny@1 ({old.chars} chars)")
    assert client.health("tiny") == "SERVING"


def test_corrupt_new_version_is_refused_and_the_old_keeps_serving(sighup_server):
    proc, client = sighup_server, sighup_server.client
    _publish(proc.repo, "tiny", 3, garbage=True)
    took = _reload(proc, r"refused .*tiny/3/model\.onnx")
    print(f"\nreload (SIGHUP, corrupt version refused): {took * 1000:.0f} ms")
    assert str(proc.repo / "tiny" / "3" / MODEL_FILE) in proc.log()
    assert _model_of(client, "tiny") == "tiny@2"
    assert client.health("tiny") == "SERVING"


def test_removed_model_drains_and_stops_serving(sighup_server):
    proc, client = sighup_server, sighup_server.client
    leaving = _long_stream(client, "other")
    shutil.rmtree(proc.repo / "other")
    took = _reload(proc, "removed other@1")
    with pytest.raises(ServiceError) as gone:
        client.generate("A", 5, model="other", timeout=30).text()
    assert gone.value.code == grpc.StatusCode.NOT_FOUND and "tiny" in gone.value.details
    assert client.health("other") == "NOT_SERVING"
    leaving.join(60)
    assert leaving.error is None and leaving.stream.stats.model == "other@1"
    print(f"\nreload (SIGHUP, model removed): {took * 1000:.0f} ms; its stream in flight finished normally")


def test_sigterm_when_idle_exits_promptly(sighup_server):
    sighup_server.client.close()
    term = time.monotonic()
    sighup_server.signal(signal.SIGTERM)
    assert sighup_server.wait(20) == 0
    print(f"\nidle shutdown: exited {time.monotonic() - term:.2f} s after SIGTERM")


def test_polling_picks_up_new_versions_and_models_without_a_signal(model_repo, no_torch_env, tmp_path):
    repo = Path(shutil.copytree(model_repo, tmp_path / "models"))
    proc = ServeProcess(repo, "--reload-interval", "0.5", env=no_torch_env)
    with proc, GeneratorClient(proc.target) as client:
        with pytest.raises(ServiceError):
            client.health("fresh")
        published = time.monotonic()
        _publish(repo, "tiny", 2)
        _publish(repo, "fresh", 1)
        # The two folders appear a moment apart, so one poll may see only the first: wait for both.
        while _model_of(client, "tiny") != "tiny@2" or not _serving(client, "fresh"):
            assert time.monotonic() - published < 20, "tiny@2 and fresh not served 20 s after they were published"
            time.sleep(0.1)
        print(f"\nreload (poll every 0.5 s): tiny@2 and fresh served {time.monotonic() - published:.2f} s after publishing")
        assert client.health("fresh") == "SERVING"
        assert "reloaded trigger=poll" in proc.log()


def _serving(client: GeneratorClient, service: str) -> bool:
    try:
        return client.health(service) == "SERVING"
    except ServiceError:
        return False  # NOT_FOUND until the poll that loads it

