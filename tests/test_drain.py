"""SIGTERM drains a real charrnn-serve: NOT_SERVING at once, new streams refused, old ones finish or end."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from charrnn.service.client import GeneratorClient, ServiceError
from testkit.serve_process import ServeProcess

GRACE = 4.0  # --drain-grace of the server under test, seconds


class _Reader(threading.Thread):
    """Reads one stream to its end in the background; records text, outcome and when it ended."""

    def __init__(self, client: GeneratorClient, max_chars: int):
        super().__init__(daemon=True)
        self.stream = client.generate("ROMEO:", max_chars, model="tiny", seed=1, timeout=60)
        self.text, self.error, self.ended = "", None, 0.0
        self.first = threading.Event()

    def run(self) -> None:
        try:
            for chunk in self.stream:
                self.text += chunk
                self.first.set()
        except ServiceError as e:
            self.error = e
        self.ended = time.monotonic()
        self.first.set()


def test_sigterm_drains_streams_in_flight_then_exits(model_repo, no_torch_env):
    proc = ServeProcess(model_repo, "--drain-grace", str(GRACE), "--max-chars", "1000000", env=no_torch_env).start()
    try:
        client = GeneratorClient(proc.target)
        endless = _Reader(client, 1_000_000)  # far longer than the grace: ended with UNAVAILABLE
        short = _Reader(client, 1500)  # a fraction of a second: finishes inside the grace
        for r in (endless, short):
            r.start()
            assert r.first.wait(30) and r.error is None
        assert not short.stream.stats, "the short stream ended before SIGTERM; the test proves nothing"

        term = time.monotonic()
        proc.signal(signal.SIGTERM)
        deadline = term + 2.0
        while client.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health still SERVING 2 s after SIGTERM"
            time.sleep(0.01)
        not_serving = time.monotonic() - term
        with pytest.raises(ServiceError) as refused:
            client.generate("ROMEO:", 10, model="tiny", timeout=10).text()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "server shutting down" in refused.value.details

        short.join(GRACE + 5)
        endless.join(GRACE + 10)
        assert short.error is None and short.stream.finish_reason == "length" and len(short.text) == 1500
        assert endless.error is not None and endless.error.code == grpc.StatusCode.UNAVAILABLE
        assert "server shutting down" in endless.error.details
        rc = proc.wait(GRACE + 15)
        exited = time.monotonic() - term
        cut = endless.ended - term
        print(f"\ndrain: NOT_SERVING after {not_serving * 1000:.0f} ms, short stream done after "
              f"{(short.ended - term) * 1000:.0f} ms, long stream ended after {cut:.2f} s "
              f"(--drain-grace {GRACE}), process exited after {exited:.2f} s")
        assert rc == 0
        assert GRACE - 0.5 <= cut <= GRACE + 3.0
        client.close()
    finally:
        proc.stop()
    assert "draining" in proc.log() and "stopped" in proc.log()

