"""A real Prometheus scraping a real charrnn-serve while a client streams.

One stack per module: a `charrnn-serve` subprocess (tiny model, plus a broken
file it must refuse), Debian's `prometheus` on loopback with the rule files of
deploy/prometheus loaded (scrape and evaluation every second, its own storage
folder), and a gRPC client that streams for a few seconds after the first
scrape. The tests then ask Prometheus's HTTP API what it saw.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from charrnn.v1 import generator_pb2, generator_pb2_grpc
from tests.deployqueries import (
    PROMETHEUS_SERIES,
    RULE_FILES,
    Query,
    contract_series,
    dashboard_queries,
    recorded_names,
    rule_queries,
    selectors,
    substitute_grafana_variables,
)
from tests.deploytools import require_tool
from testkit.serve_process import ServeProcess

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

STREAM_SECONDS = 2.5  # client traffic after the first scrape; Prometheus scrapes every 1 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class Prometheus:
    """`prometheus` on 127.0.0.1 scraping one target as job "charrnn"."""

    def __init__(self, binary: str, folder, target: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in RULE_FILES],
            "scrape_configs": [{"job_name": "charrnn", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = folder / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"))

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                _get(self.url + "/-/ready", timeout=1.0)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready in {timeout}s:\n{self.log.read_text()}")

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            body = json.loads(_get(url))
        except urllib.error.HTTPError as e:  # 400 for a bad query: the body says why
            body = json.loads(e.read().decode())
        return body

    def query(self, expr: str) -> list[dict]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr!r}: {body.get('error')}"
        return body["data"]["result"]

    def wait_for(self, expr: str, check, timeout: float = 20.0) -> list[dict]:
        """Polls ``expr`` until ``check(result)`` holds; fails with the last result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if check(result) or time.monotonic() > deadline:
                assert check(result), f"{expr!r} still {result} after {timeout}s"
                return result
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _stream_for(target: str, seconds: float) -> dict:
    """Generate requests from 4 threads for ``seconds``, plus one the server must refuse; counts by outcome."""
    counts = {"OK": 0, "chars": 0, "INVALID_ARGUMENT": 0}
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(seed: int) -> None:
        try:
            with grpc.insecure_channel(target) as channel:
                stub = generator_pb2_grpc.GeneratorStub(channel)
                while time.monotonic() < stop_at:
                    request = generator_pb2.GenerateRequest(model="tiny", prime="ROMEO:", max_chars=200,
                                                            temperature=0.8, seed=seed)
                    text = "".join(r.text for r in stub.Generate(request, timeout=30))
                    with lock:
                        counts["OK"] += 1
                        counts["chars"] += len(text)
                    seed += 1
        except BaseException as e:  # reported by the caller, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(1000 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    with grpc.insecure_channel(target) as channel:
        try:
            list(generator_pb2_grpc.GeneratorStub(channel).Generate(
                generator_pb2.GenerateRequest(model="tiny", prime="ROMEO:", max_chars=10, temperature=-1.0), timeout=10))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            counts["INVALID_ARGUMENT"] += 1
    for t in threads:
        t.join()
    assert not errors, errors
    return counts


@pytest.fixture(scope="module")
def stack(model_repo, no_torch_env, tmp_path_factory):
    binary = require_tool("prometheus", "is the server these tests scrape with (Debian package `prometheus`)")
    folder = tmp_path_factory.mktemp("prometheus_live")
    models = shutil.copytree(model_repo, folder / "models")
    (models / "broken" / "1").mkdir(parents=True)
    (models / "broken" / "1" / "model.onnx").write_bytes(b"not an ONNX file")  # refused and counted
    server = ServeProcess(models, env=no_torch_env).start()
    prometheus = Prometheus(binary, folder, f"127.0.0.1:{server.metrics_port}")
    try:
        prometheus.wait_ready()
        prometheus.wait_for('up{job="charrnn"}', lambda r: r and r[0]["value"][1] == "1")
        counts = _stream_for(server.target, STREAM_SECONDS)
        assert counts["OK"] > 0 and counts["chars"] > 0 and counts["INVALID_ARGUMENT"] == 1, counts
        yield server, prometheus, counts
    finally:
        prometheus.stop()
        server.stop()


def _live_samples(server: ServeProcess) -> dict[str, set[str]]:
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(_get(server.metrics_url)):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_live_metrics_pass_promtool_check_metrics(stack):
    server, _, _ = stack
    promtool = require_tool("promtool", "lints the exposition (Debian package `prometheus`)")
    done = subprocess.run([promtool, "check", "metrics"], input=_get(server.metrics_url),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_live_metrics_are_the_contract(stack):
    server, _, _ = stack
    live = _live_samples(server)
    contract = contract_series()
    assert set(live) == set(contract), {"only live": set(live) - set(contract), "only contract": set(contract) - set(live)}
    for name, labels in live.items():
        assert labels == contract[name], name


def test_every_name_the_dashboard_and_rules_read_is_served(stack):
    server, _, _ = stack
    live = _live_samples(server)
    recorded = recorded_names()
    missing = [f"{q.where}: {s.name}" for q in dashboard_queries() + rule_queries() for s in selectors(q)
               if s.name not in live and s.name not in recorded and s.name not in PROMETHEUS_SERIES]
    assert missing == []


def test_prometheus_sees_characters_per_second(stack):
    _, prometheus, _ = stack
    result = prometheus.wait_for('sum(rate(charrnn_generated_chars_total{job="charrnn",model="tiny"}[10s]))',
                                 lambda r: r and float(r[0]["value"][1]) > 0)
    assert float(result[0]["value"][1]) > 0


def test_prometheus_computes_time_to_first_char_quantile(stack):
    _, prometheus, _ = stack
    expr = ('histogram_quantile(0.99, sum by (le) '
            '(rate(charrnn_time_to_first_char_seconds_bucket{job="charrnn",model="tiny"}[10s])))')
    result = prometheus.wait_for(expr, lambda r: r and math.isfinite(float(r[0]["value"][1])))
    assert 0 < float(result[0]["value"][1]) <= 10.0  # inside the histogram's finite buckets


def test_prometheus_counted_each_request_by_code(stack):
    _, prometheus, counts = stack
    expr = 'sum by (code) (charrnn_requests_total{job="charrnn",model="tiny",code=~"OK|INVALID_ARGUMENT"})'
    result = prometheus.wait_for(expr, lambda r: {s["metric"]["code"]: float(s["value"][1]) for s in r}
                                 == {"OK": counts["OK"], "INVALID_ARGUMENT": 1.0})
    assert result


def test_recording_rules_evaluate_on_live_data(stack):
    _, prometheus, _ = stack
    prometheus.wait_for('model:charrnn_generated_chars:rate1m{model="tiny"}', lambda r: r and float(r[0]["value"][1]) > 0)
    groups = prometheus.api("rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r.get("name") for r in rules} >= recorded_names()
    assert [r["name"] for r in rules if r["health"] != "ok"] == []


def test_only_the_refused_model_file_raises_an_alert(stack):
    """A broken file: CharrnnModelLoadFailed fires at once; nothing else is pending or firing."""
    _, prometheus, _ = stack

    def active(result: list[dict]) -> set[tuple[str, str, str]]:
        return {(a["labels"]["alertname"], a["labels"].get("model", ""), a["state"]) for a in result}

    expected = {("CharrnnModelLoadFailed", "broken", "firing")}
    deadline = time.monotonic() + 20
    while active(prometheus.api("alerts")["data"]["alerts"]) != expected and time.monotonic() < deadline:
        time.sleep(0.25)
    assert active(prometheus.api("alerts")["data"]["alerts"]) == expected


def test_every_dashboard_query_runs_and_finds_data(stack):
    server, prometheus, _ = stack
    live = _live_samples(server)
    for query in dashboard_queries():
        expr = substitute_grafana_variables(query.expr)
        result = prometheus.query(expr)
        if all(s.name in live for s in selectors(Query(query.where, expr))):
            assert result, f"{query.where}: {expr!r} returned nothing"
