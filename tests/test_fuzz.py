"""Fuzzing a real charrnn-serve: every answer is OK or a documented status, and the server stays SERVING.

testkit/fuzz.py holds the strategies and the wire encoder; `python -m
bench.reliability --long` runs 10,000 cases, this file a few hundred.
"""

from __future__ import annotations

import time

import grpc
import pytest

from testkit import probes
from testkit.fuzz import METHOD, field_bytes, field_varint, run_fuzz
from charrnn.v1 import generator_pb2 as pb
from testkit.modelfactory import DEFAULT_VOCAB
from testkit.serve_process import ServeProcess

MAX_CHARS = 64  # --max-chars: every OK stream generates at most this many characters
SHORT_CASES = 300


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--max-chars", str(MAX_CHARS), "--max-prime-chars", "2048", env=no_torch_env) as proc:
        yield proc


def _raw_call(server, method: str, data: bytes) -> grpc.RpcError | list[bytes]:
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        try:
            return list(call(data, timeout=30))
        except grpc.RpcError as e:
            return e


UNDECODABLE = {
    "corrupt wire format": b"\xff\xff\xff",
    "invalid UTF-8 in prime": field_bytes(2, b"\xc3\x28") + field_varint(3, 5),
    "lone surrogate in model": field_bytes(1, "\ud800".encode("utf-8", "surrogatepass")) + field_varint(3, 5),
    "over-long varint": b"\x18" + b"\xff" * 11 + b"\x01",
    "cut-off string": field_bytes(2, b"ROMEO")[:-2],
}


@pytest.mark.parametrize("what", list(UNDECODABLE))
def test_undecodable_request_bytes_are_invalid_argument(server, what):
    before = probes.requests_by_code(probes.scrape(server.metrics_url)).get("INVALID_ARGUMENT", 0)
    err = _raw_call(server, METHOD, UNDECODABLE[what])
    assert isinstance(err, grpc.RpcError), f"{what} was served: {err!r}"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code()}: {err.details()}"
    assert err.details().startswith("request must be a charrnn.v1.GenerateRequest"), err.details()
    assert _invalid_count_reaches(server, before + 1)  # counted like any other refusal


def _invalid_count_reaches(server, n: int, timeout: float = 5.0) -> bool:
    """The status goes out before the handler's bookkeeping ends: poll for the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probes.requests_by_code(probes.scrape(server.metrics_url)).get("INVALID_ARGUMENT", 0) >= n:
            return True
        time.sleep(0.02)
    return False


def test_undecodable_list_models_request_is_invalid_argument(server):
    err = _raw_call(server, "/charrnn.v1.Generator/ListModels", b"\xff\xff")
    # unary_stream on a unary method still carries the status of the call
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "ListModelsRequest" in err.details()


def test_well_formed_raw_bytes_are_served(server):
    """The identity-serializer path the fuzzer uses reaches the real handler."""
    answers = _raw_call(server, METHOD, field_bytes(2, b"ROMEO:") + field_varint(3, 7) + field_varint(7, 1))
    assert isinstance(answers, list), answers
    responses = [pb.GenerateResponse.FromString(a) for a in answers]
    assert sum(len(r.text) for r in responses) == 7 and responses[-1].stats.generated_chars == 7


@pytest.mark.slow
def test_fuzzed_requests_get_only_documented_statuses(server):
    report = run_fuzz(server.target, DEFAULT_VOCAB, MAX_CHARS, SHORT_CASES, random_seed=1)
    assert report["failure"] == "", report["failure"]
    assert report["cases"] >= SHORT_CASES
    assert set(report["codes"]) <= probes.DOCUMENTED
    # Both sides of validation were reached: some requests served, some refused by a named rule.
    assert report["codes"].get("OK", 0) > 0 and report["codes"].get("INVALID_ARGUMENT", 0) > 0, report["codes"]
    assert report["health_after"] == "SERVING"
    assert server.proc.poll() is None, "the server died"
    server_codes = probes.requests_by_code(probes.scrape(server.metrics_url))
    assert "INTERNAL" not in server_codes, server_codes
    assert "Traceback" not in server.log()
