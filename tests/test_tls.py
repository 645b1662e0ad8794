"""TLS and mutual TLS: certificates made here, a real charrnn-serve, the client class and charrnn-generate."""

from __future__ import annotations

import json
import subprocess
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from charrnn.service import tls
from charrnn.service.client import GeneratorClient, ServiceError
from tests.certs import make_pki
from testkit.serve_process import GENERATE, ServeProcess


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    return make_pki(folder), make_pki(folder, prefix="stranger-")


@pytest.fixture(scope="module")
def mtls_server(pki, model_repo, no_torch_env):
    ours, _ = pki
    with ServeProcess(model_repo, "--tls-cert", str(ours.server_cert), "--tls-key", str(ours.server_key),
                      "--tls-client-ca", str(ours.ca), "--log-format", "json", "--http-port", "0",
                      env=no_torch_env) as server:
        yield server


def test_client_with_a_certificate_from_the_ca_is_served(mtls_server, pki):
    ours, _ = pki
    with GeneratorClient(mtls_server.target, tls_ca=str(ours.ca), tls_cert=str(ours.client_cert),
                         tls_key=str(ours.client_key)) as client:
        assert client.health() == "SERVING"
        text = client.generate("ROMEO:", 20, seed=1, timeout=30).text()
        assert len(text) == 20
        assert {m.name for m in client.list_models()} == {"tiny", "other"}


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA", "plaintext"])
def test_clients_without_a_valid_certificate_are_refused(mtls_server, pki, who):
    ours, stranger = pki
    kwargs = {
        "no certificate": dict(tls_ca=str(ours.ca)),
        "certificate from another CA": dict(tls_ca=str(ours.ca), tls_cert=str(stranger.client_cert),
                                            tls_key=str(stranger.client_key)),
        "plaintext": {},
    }[who]
    with GeneratorClient(mtls_server.target, **kwargs) as client:
        with pytest.raises(ServiceError) as info:
            client.list_models(timeout=10)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_http_port_is_https_with_the_same_certificates(mtls_server, pki):
    import ssl

    import httpx

    ours, stranger = pki

    def context(who):
        ctx = ssl.create_default_context(cafile=str(ours.ca))
        if who is not None:
            ctx.load_cert_chain(str(who.client_cert), str(who.client_key))
        return ctx

    url = f"https://127.0.0.1:{mtls_server.http_port}/v1/completions"
    body = {"model": "tiny", "prompt": "A", "max_tokens": 7, "seed": 2}
    reply = httpx.post(url, json=body, verify=context(ours), timeout=30)
    assert reply.status_code == 200 and len(reply.json()["choices"][0]["text"]) == 7
    for who in (None, stranger):
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.post(url, json=body, verify=context(who), timeout=30)
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.post(url.replace("https", "http"), json=body, timeout=30).raise_for_status()


def test_charrnn_generate_takes_tls_flags(mtls_server, pki):
    ours, _ = pki
    argv = [GENERATE, "--server", mtls_server.target, "--tls-ca", str(ours.ca), "--tls-cert", str(ours.client_cert),
            "--tls-key", str(ours.client_key), "--prime", "ROMEO:", "--max-chars", "30", "--seed", "3"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and len(done.stdout.rstrip("\n")) >= 6
    refused = subprocess.run(argv[:5] + argv[9:], capture_output=True, text=True, timeout=60)  # no client cert
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr and refused.stdout == ""


def test_refused_handshakes_leave_the_json_log_one_object_per_line(mtls_server):
    # Runs after the refusals above: gRPC's own handshake messages must not reach stderr.
    assert mtls_server.stderr and all(line.startswith("{") for line in mtls_server.stderr), mtls_server.log()
    assert [json.loads(line) for line in mtls_server.stderr]


def test_server_only_tls_needs_the_ca_on_the_client(pki):
    ours, _ = pki
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(str(ours.server_cert), str(ours.server_key)))
    server.start()
    try:
        with GeneratorClient(f"127.0.0.1:{port}", tls_ca=str(ours.ca)) as client:
            assert client.health() == "SERVING"
        with GeneratorClient(f"127.0.0.1:{port}", tls=True) as client:  # system roots do not know our CA
            with pytest.raises(ServiceError, match="UNAVAILABLE"):
                client.health(timeout=10)
    finally:
        server.stop(None)


def test_unreadable_or_non_pem_files_are_named(tmp_path, pki):
    ours, _ = pki
    with pytest.raises(ValueError, match=r"--tls-key must be a readable PEM file, got '.*nope.key'"):
        tls.server_credentials(str(ours.server_cert), str(tmp_path / "nope.key"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"--tls-client-ca must be a PEM file .* got '.*junk.pem'"):
        tls.server_credentials(str(ours.server_cert), str(ours.server_key), str(tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="--tls-cert and --tls-key must be given together"):
        tls.channel_credentials(str(ours.ca), cert=str(ours.client_cert))
