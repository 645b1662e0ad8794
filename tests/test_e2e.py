"""End to end: a real `charrnn-serve` (no torch) on a real socket, called by the client, the CLI and grpcurl.

One server serves the whole module: a repository with two good models and two
bad files (garbage bytes; a valid ONNX file without the charrnn vocabulary),
JSON logs, and small caps so "over the cap" is cheap to ask for.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import onnx
import pytest

from charrnn.modelfile import KEY_VOCAB, MODEL_FILE
from charrnn.service.client import GeneratorClient, ServiceError
from testkit import probes
from testkit.modelfactory import DEFAULT_VOCAB
from testkit.serve_process import GENERATE, ServeProcess

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env, tmp_path_factory):
    repo = Path(shutil.copytree(model_repo, tmp_path_factory.mktemp("e2e") / "models"))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / MODEL_FILE).write_bytes(b"\x00 this is not an onnx file")
    proto = onnx.load(str(repo / "tiny" / "1" / MODEL_FILE))
    kept = [p for p in proto.metadata_props if p.key != KEY_VOCAB]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    (repo / "novocab" / "3").mkdir(parents=True)
    onnx.save(proto, str(repo / "novocab" / "3" / MODEL_FILE))
    with ServeProcess(repo, "--log-format", "json", "--max-chars", "2000", "--max-prime-chars", "64",
                      env=no_torch_env) as proc:
        proc.repo = repo
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with GeneratorClient(server.target) as c:
        yield c


def _scrape(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        return reply.read().decode()


def _sample(text: str, name: str, **labels) -> float:
    """The value of ``name`` with ``labels``, summed over any other label (charrnn_requests_total's reason)."""
    assert probes.has_series(text, name, **labels), f"{name}{labels} not in /metrics"
    return probes.metric_sum(text, name, **labels)


def test_a_stream_arrives_in_chunks_and_ends_with_stats(client):
    stream = client.generate("ROMEO:", 300, model="tiny", temperature=0.8, seed=5, timeout=30)
    chunks = list(stream)
    assert len("".join(chunks)) == 300 and all(chunks)
    assert stream.finish_reason == "length"
    s = stream.stats
    assert (s.model, s.prime_chars, s.generated_chars, s.seed) == ("tiny@1", 6, 300, 5)
    assert 0 <= s.queue_seconds <= s.total_seconds and s.decode_seconds <= s.total_seconds


def test_a_seeded_request_gives_the_same_text_every_time(client):
    texts = {client.generate("JULIET:", 200, model="tiny", seed=11, timeout=30).text() for _ in range(3)}
    assert len(texts) == 1
    assert client.generate("JULIET:", 200, model="tiny", seed=12, timeout=30).text() not in texts
    unseeded = [client.generate("JULIET:", 200, model="tiny", timeout=30) for _ in range(2)]
    assert unseeded[0].text() != unseeded[1].text()
    assert unseeded[0].stats.seed != unseeded[1].stats.seed  # drawn per request and reported


def test_stop_sequence_ends_the_stream_without_returning_it(client):
    full = client.generate("A", 400, model="tiny", seed=3, timeout=30).text()
    stop = full[40:43]
    stream = client.generate("A", 400, model="tiny", seed=3, stop=["\x00never", stop], timeout=30)
    assert stream.text() == full[: full.index(stop)]
    assert stream.finish_reason == "stop_sequence" and stream.stats.stop_sequence == stop


def test_list_models_shows_the_good_models_and_default(client):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"tiny", "other"}
    assert models["other"].is_default and not models["tiny"].is_default  # alphabetically first
    assert models["tiny"].cell == "lstm" and models["other"].cell == "gru"
    assert models["tiny"].latest and models["tiny"].version == 1 and models["tiny"].vocab_size == len(DEFAULT_VOCAB)
    assert models["tiny"].device in ("cpu", "cuda") and models["tiny"].format_version == 1
    default = client.generate("", 5, timeout=30)  # empty model and empty prime
    assert len(default.text()) == 5 and default.stats.model == "other@1"


def test_health_is_serving_for_the_server_and_each_loaded_model(client):
    for service in ("", "charrnn.v1.Generator", "tiny", "other"):
        assert client.health(service) == "SERVING", service
    with pytest.raises(ServiceError) as info:
        client.health("broken")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_bad_model_files_are_logged_with_path_and_reason_and_the_rest_serve(server):
    log = server.log()
    broken = str(server.repo / "broken" / "1" / MODEL_FILE)
    novocab = str(server.repo / "novocab" / "3" / MODEL_FILE)
    assert re.search(re.escape(broken) + r".*(onnx|parse|protobuf|load)", log, re.I), log
    assert re.search(re.escape(novocab) + r".*charrnn\.vocab", log), log


INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "fields, code, message",
    [
        (dict(model="nope"), grpc.StatusCode.NOT_FOUND, r"nope.*other.*tiny|nope.*tiny.*other"),
        (dict(model="../x"), INVALID, r"model must be .*got '\.\./x'"),
        (dict(model="/etc"), INVALID, r"model must be .*got '/etc'"),
        (dict(model="tiny@x"), INVALID, r"model must be .*got 'tiny@x'"),
        (dict(prime="ROMEO: ¿Qué?"), INVALID, r"prime must be made of .*'¿' \(U\+00BF INVERTED QUESTION MARK\)"),
        (dict(temperature=-1.0), INVALID, r"temperature must be a finite number in \[0, 100\].*got -1.0"),
        (dict(temperature=float("nan")), INVALID, r"temperature must be .* got nan"),
        (dict(temperature=float("inf")), INVALID, r"temperature must be .* got inf"),
        (dict(top_p=1.5), INVALID, r"top_p must be in \[0, 1\].* got 1.5"),
        (dict(max_chars=0), INVALID, r"max_chars must be in \[1, 2000\], got 0"),
        (dict(max_chars=2001), INVALID, r"max_chars must be in \[1, 2000\], got 2001 \(.*--max-chars"),
        (dict(prime="a" * 65), INVALID, r"prime must be at most 64 characters long, got 65 .*--max-prime-chars"),
        (dict(stop=[""]), INVALID, r"stop\[0\] must be a non-empty string"),
    ],
)
def test_bad_input_gets_the_right_status_and_a_message_naming_it(client, fields, code, message):
    fields = {"max_chars": 10, "model": "tiny"} | fields
    with pytest.raises(ServiceError) as info:
        client.generate(fields.pop("prime", "A"), fields.pop("max_chars"), timeout=30, **fields).text()
    assert info.value.code == code
    assert re.search(message, info.value.details), info.value.details


def test_path_like_model_names_are_never_opened(server, client):
    with pytest.raises(ServiceError):
        client.generate("A", 5, model="../../" + server.repo.name, timeout=30).text()
    assert not re.search(r"model\.onnx.*\.\./", server.log())


def test_metrics_count_every_final_status_and_the_characters(server, client):
    client.generate("ROMEO:", 50, model="tiny", seed=1, timeout=30).text()
    with pytest.raises(ServiceError):
        client.generate("A", 0, model="tiny", timeout=30).text()
    with pytest.raises(ServiceError):
        client.generate("A", 5, model="nope", timeout=30).text()
    text = _scrape(server)
    assert _sample(text, "charrnn_requests_total", model="tiny", code="OK") >= 1
    assert _sample(text, "charrnn_requests_total", model="tiny", code="INVALID_ARGUMENT") >= 1
    assert _sample(text, "charrnn_requests_total", model="", code="NOT_FOUND") >= 1
    assert _sample(text, "charrnn_generated_chars_total", model="tiny") >= 50
    assert _sample(text, "charrnn_prime_chars_total", model="tiny") >= 6
    assert _sample(text, "charrnn_time_to_first_char_seconds_count", model="tiny") >= 1
    assert _sample(text, "charrnn_request_duration_seconds_count", model="tiny") >= 3


def test_json_logs_are_one_object_per_line_with_request_ids(server, client):
    client.generate("ROMEO:", 10, model="tiny", request_id="e2e-log-1", timeout=30).text()
    with pytest.raises(ServiceError):
        client.generate("ROMEO:", 10, model="tiny", temperature=-2, request_id="e2e-log-2", timeout=30).text()
    server.wait_for_log(r'"request_id": "e2e-log-2"')
    records = [json.loads(line) for line in server.stderr]  # every line is one JSON object
    assert any(r.get("request_id") == "e2e-log-1" and r.get("model") == "tiny" for r in records)
    refused = [r for r in records if r.get("request_id") == "e2e-log-2"]
    assert refused and "temperature must be" in refused[0]["message"] and refused[0]["code"] == "INVALID_ARGUMENT"


def test_grpcurl_lists_services_through_reflection_and_streams(server):
    listed = subprocess.run([GRPCURL, "-plaintext", server.target, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {"charrnn.v1.Generator", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    call = subprocess.run(
        [GRPCURL, "-plaintext", "-d", '{"model": "tiny", "prime": "ROMEO:", "max_chars": 20, "seed": 4}',
         server.target, "charrnn.v1.Generator/Generate"], capture_output=True, text=True, timeout=60)
    assert call.returncode == 0, call.stderr
    assert '"finish_reason": "FINISH_REASON_LENGTH"' in call.stdout and '"generated_chars": 20' in call.stdout


def test_charrnn_generate_streams_text_and_reports_errors(server, client):
    base = [GENERATE, "--server", server.target, "--model", "tiny"]
    done = subprocess.run(base + ["--prime", "ROMEO:", "--max-chars", "80", "--temperature", "0.8", "--seed", "9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = client.generate("ROMEO:", 80, model="tiny", temperature=0.8, seed=9, timeout=30).text()
    assert done.stdout == "ROMEO:" + expected + "\n"
    bad = subprocess.run(base + ["--prime", "A", "--top-p", "2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert "INVALID_ARGUMENT: top_p must be in [0, 1]" in bad.stderr
    listed = subprocess.run(base + ["--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0
    assert re.search(rf"^other@1\s+gru\s+1\s+16\s+{len(DEFAULT_VOCAB)} .*latest, default$", listed.stdout, re.M)


def test_charrnn_generate_flushes_each_chunk_as_it_arrives(server, monkeypatch):
    from charrnn.service import generate_cli

    class Recorder:
        def __init__(self):
            self.events: list[str] = []

        def write(self, text: str) -> None:
            self.events.append("w")

        def flush(self) -> None:
            self.events.append("f")

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert generate_cli.main(["--server", server.target, "--model", "tiny", "--prime", "A", "--max-chars", "2000"]) == 0
    assert len(out.events) >= 4  # at least one chunk and the closing newline
    assert "".join(out.events).count("wf") == len(out.events) // 2  # every write is followed by a flush


def test_async_client_streams_the_same_text_as_the_blocking_one(server, client):
    import asyncio

    from charrnn.service.client import AsyncGeneratorClient

    async def run() -> tuple[str, list[str]]:
        async with AsyncGeneratorClient(server.target) as aclient:
            stream = aclient.generate("ROMEO:", 120, model="tiny", seed=21, temperature=0.5, timeout=30)
            text = await stream.text()
            assert stream.finish_reason == "length" and stream.stats.seed == 21
            return text, [m.name for m in await aclient.list_models()]

    text, names = asyncio.run(run())
    assert text == client.generate("ROMEO:", 120, model="tiny", seed=21, temperature=0.5, timeout=30).text()
    assert sorted(names) == ["other", "tiny"]
