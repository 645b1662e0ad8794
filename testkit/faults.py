"""Faults injected into a real `charrnn-serve`: each scenario returns what it observed, as figures.

tests/test_faults.py asserts on these figures; `python -m bench.reliability`
records them. Every scenario starts its own server (testkit.serve_process) and
cleans up after itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from testkit import probes
from charrnn.service.client import GeneratorClient, ServiceError
from testkit.serve_process import GENERATE, SERVE, ServeProcess

LONG = 10_000_000  # max_chars of a stream that outlives the scenario (--max-chars is raised to allow it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, every: float = 0.02):
    """Polls ``predicate`` until it returns a true value; returns (value, seconds waited) or (None, timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        value = predicate()
        if value:
            return value, time.monotonic() - start
        time.sleep(every)
    return None, timeout


def _active(server: ServeProcess) -> float:
    return probes.metric_sum(probes.scrape(server.metrics_url), "charrnn_active_streams")


def _cancelled(server: ServeProcess) -> int:
    return probes.requests_by_code(probes.scrape(server.metrics_url)).get("CANCELLED", 0)


def client_killed_mid_stream(models: Path, env: dict) -> dict:
    """A charrnn-generate process is SIGKILLed while it streams; the server must free its slot."""
    with ServeProcess(models, "--max-chars", str(LONG), env=env) as server:
        client = subprocess.Popen([GENERATE, "--server", server.target, "--model", "tiny", "--prime", "ROMEO:",
                                   "--max-chars", str(LONG)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        received = client.stdout.read(64)  # the prime echo and generated text: the stream is running
        active_before, _ = _wait_for(lambda: _active(server) >= 1 and _active(server), 10)
        cancelled_before = _cancelled(server)
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        killed_at = time.monotonic()
        _, seconds = _wait_for(lambda: _active(server) == 0, 10)
        freed_after = time.monotonic() - killed_at
        counted, _ = _wait_for(lambda: _cancelled(server) > cancelled_before, 5)
        return {
            "bytes_received_before_kill": len(received),
            "active_before_kill": active_before or 0.0,
            "active_after_kill": _active(server),
            "seconds_to_free_slot": round(freed_after, 3),
            "counted_as_cancelled": bool(counted),
            "server_alive": server.proc.poll() is None,
            "health": probes.health_status(server.target),
        }


def server_killed_and_restarted(models: Path, env: dict, retry_for: float = 30.0) -> dict:
    """The server is SIGKILLed under a running stream and restarted on its port; a client retries."""
    port = str(free_port())
    first = ServeProcess(models, "--port", port, "--max-chars", str(LONG), env=env).start()
    figures: dict = {}
    with GeneratorClient(first.target) as client:
        try:
            stream = iter(client.generate("ROMEO:", LONG, model="tiny", timeout=60))
            next(stream)
            first.proc.kill()
            first.proc.wait(10)
            try:
                for _ in stream:
                    pass
                figures["in_flight_code"] = "OK"
            except ServiceError as e:
                figures["in_flight_code"] = e.code.name
            try:
                client.generate("A", 5, model="tiny", timeout=5).text()
                figures["while_down_code"] = "OK"
            except ServiceError as e:
                figures["while_down_code"] = e.code.name
            second = ServeProcess(models, "--port", port, env=env).start()
        finally:
            first.stop()
        try:
            restarted = time.monotonic()
            attempts, codes = 0, set()
            while time.monotonic() - restarted < retry_for:
                attempts += 1
                try:
                    text = client.generate("A", 5, model="tiny", seed=1, timeout=5).text()
                    figures.update(retry_ok=len(text) == 5, retry_attempts=attempts,
                                   seconds_to_success=round(time.monotonic() - restarted, 3))
                    break
                except ServiceError as e:
                    codes.add(e.code.name)
                    time.sleep(0.1)
            else:
                figures.update(retry_ok=False, retry_attempts=attempts)
            figures["retry_codes"] = sorted(codes)
            figures["health"] = probes.health_status(second.target)
        finally:
            second.stop()
    return figures


def _read_all(client: GeneratorClient, max_chars: int, progress: list, index: int, results: list) -> None:
    try:
        stream = client.generate("ROMEO:", max_chars, model="tiny", seed=index, timeout=120)
        for text in stream:
            progress[index] += len(text)
        results[index] = ("OK", progress[index], stream.finish_reason)
    except ServiceError as e:
        results[index] = (e.code.name, progress[index], e.details)


def model_truncated_while_served(models: Path, env: dict, streams: int = 4, max_chars: int = 60_000) -> dict:
    """tiny@1's file is cut in half on disk under running streams, then SIGHUP reloads the repository.

    ``models`` is a private copy (it is damaged). The streams must finish, the
    reload must refuse the file naming its path and why, and tiny@1 (loaded in
    memory) must keep serving new requests.
    """
    path = models / "tiny" / "1" / "model.onnx"
    with ServeProcess(models, "--max-chars", str(max_chars), env=env) as server, \
            GeneratorClient(server.target) as client:
        progress, results = [0] * streams, [None] * streams
        readers = [threading.Thread(target=_read_all, args=(client, max_chars, progress, i, results))
                   for i in range(streams)]
        for r in readers:
            r.start()
        _wait_for(lambda: min(progress) > 200, 30)
        os.truncate(path, path.stat().st_size // 2)  # same inode, half the bytes: what a crashed copy leaves
        log_start = len(server.stderr)
        server.signal(signal.SIGHUP)
        refusal = server.wait_for_log(r"refused tiny@1: (.*)", timeout=30, start=log_start).group(1)
        at_refusal = list(progress)
        new_text = client.generate("A", 20, model="tiny", seed=3, timeout=30).text()
        for r in readers:
            r.join(120)
        text = probes.scrape(server.metrics_url)
        return {
            "chars_at_refusal": at_refusal,
            "streams_unfinished_at_refusal": sum(p < max_chars for p in at_refusal),
            "stream_results": results,
            "streams_completed": sum(1 for r in results if r and r[0] == "OK" and r[1] == max_chars),
            "refusal": refusal,
            "refusal_names_path": str(path) in refusal,
            "new_request_chars": len(new_text),
            "load_failures": probes.metric_sum(text, "charrnn_model_load_failures_total"),
            "models_loaded": probes.metric_sum(text, "charrnn_models_loaded"),
            "health": probes.health_status(server.target),
            "health_tiny": probes.health_status(server.target, "tiny"),
            "server_alive": server.proc.poll() is None,
        }


def port_taken_at_startup(models: Path, env: dict, which: str) -> dict:
    """Another process holds the metrics (or gRPC) port; charrnn-serve must exit non-zero saying which."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = str(squatter.getsockname()[1])
        ports = {"metrics": ["--port", "0", "--metrics-port", taken], "grpc": ["--port", taken, "--metrics-port", "0"]}
        started = time.monotonic()
        done = subprocess.run([SERVE, "--models", str(models), "--host", "127.0.0.1", *ports[which]],
                              env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "error" in line.lower()]
    return {
        "port": taken,
        "returncode": done.returncode,
        "seconds": round(time.monotonic() - started, 2),
        "error_line": errors[-1] if errors else "",
        "traceback": "Traceback" in done.stderr,
        "banner_printed": "gRPC" in done.stdout,
    }



def engine_faults_timed(models: Path, work: Path, env_extra: dict | None = None, batching: str = "on") -> dict:
    """onnxruntime fails under a running stream (testkit/ortfault.py), once and then for good.

    Figures, in seconds: from the fault to the stream in flight ending (UNAVAILABLE),
    from a one-call fault to the next successful request, and from a permanent
    fault to the model's health turning NOT_SERVING, with the default restart flags.
    """
    from testkit.ortfault import ENV, set_fault
    from testkit.serve_process import blocked_env

    control = work / "fault"
    set_fault(control, "ok")
    env = blocked_env(work, {ENV: str(control), **(env_extra or {})})
    figures: dict = {"batching": batching}
    with ServeProcess(models, "--max-chars", str(LONG), "--batching", batching, env=env) as server, \
            GeneratorClient(server.target) as client:
        for kind, mode in (("transient", "fail 1"), ("permanent", "fail")):
            stream = iter(client.generate("ROMEO:", LONG, model="tiny", timeout=60))
            next(stream)
            faulted = time.monotonic()
            set_fault(control, mode)
            try:
                for _ in stream:
                    pass
                figures[f"{kind}_in_flight_code"] = "OK"
            except ServiceError as e:
                figures[f"{kind}_in_flight_code"] = e.code.name
            figures[f"{kind}_seconds_to_unavailable"] = round(time.monotonic() - faulted, 4)
            if kind == "transient":
                def served() -> bool:
                    try:
                        return len(client.generate("A", 5, model="tiny", timeout=10).text()) == 5
                    except ServiceError:
                        return False

                ok, _ = _wait_for(served, 30, every=0.01)
                figures["transient_served_again"] = bool(ok)
                figures["transient_seconds_to_next_success"] = round(time.monotonic() - faulted, 4)
            else:
                down, _ = _wait_for(lambda: probes.health_status(server.target, "tiny") == "NOT_SERVING", 60,
                                    every=0.01)
                figures["permanent_not_serving"] = bool(down)
                figures["permanent_seconds_to_not_serving"] = round(time.monotonic() - faulted, 4)
                try:
                    started = time.monotonic()
                    client.generate("A", 5, model="tiny", timeout=30).text()
                    figures["refused_code"] = "OK"
                except ServiceError as e:
                    figures["refused_code"] = e.code.name
                figures["refused_seconds"] = round(time.monotonic() - started, 4)
        set_fault(control, "ok")
    return figures

