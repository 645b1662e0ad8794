"""Security promises through a real charrnn-serve: no path escapes, bounded messages, mutual TLS that means it.

- A model name is never used as a path: names that climb out of the repository
  (../, absolute, percent-encoded, NUL, backslashes, look-alike slashes) are
  refused, even where a real model file waits at the place they point to.
- The server sets its receive limit itself (--max-message-bytes): larger
  messages get RESOURCE_EXHAUSTED before any work.
- With --tls-client-ca, only clients holding a certificate from that CA and
  valid now are served: plaintext, expired and not-yet-valid are refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testkit import probes
from testkit.fuzz import METHOD, field_bytes, field_varint
from charrnn.service.client import GeneratorClient, ServiceError
from testkit.serve_process import ServeProcess

# ---- model names that try to leave the repository ----

ESCAPES = [
    "../outside", "../outside@1", "..", ".", "../../outside", "tiny/../../outside", "tiny/../other", "/outside",
    "{abs}", "{abs}/1/model.onnx", "..%2Foutside", "%2e%2e%2foutside", "%252e%252e%252foutside", "..\\outside",
    "....//outside", "tiny\x00", "tiny\x00../outside", "tiny@1/../../outside", "tiny@../../outside",
    "\uff0e\uff0e\uff0foutside", "..\u2215outside", "~/outside", "tiny/1", "tiny\n", " tiny",
]


@pytest.fixture(scope="module")
def escape_server(tmp_path_factory, model_repo, no_torch_env):
    """MODELS/ (tiny, other) and, beside it, a real model at outside/1/model.onnx that no name may reach."""
    root = tmp_path_factory.mktemp("escape")
    models = Path(shutil.copytree(model_repo, root / "models"))
    shutil.copytree(model_repo / "tiny", root / "outside")
    with ServeProcess(models, env=no_torch_env) as server:
        server.outside = root / "outside"
        yield server


@pytest.mark.parametrize("name", ESCAPES)
def test_model_names_that_leave_the_repository_are_refused(escape_server, name):
    name = name.replace("{abs}", str(escape_server.outside))
    with GeneratorClient(escape_server.target) as client:
        with pytest.raises(ServiceError) as info:
            client.generate("A", 5, model=name, timeout=10).text()
    assert info.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), info.value
    assert info.value.details.startswith("model "), info.value.details


@pytest.mark.parametrize("field,number,value,rule", [
    ("model", 1, "x" * 20_000, "model must be '' or 'name'"),  # a status message of 20 KB never reached clients
    ("model", 1, "tiny@" + "9" * 5000, "model must be 'name@version' with a version"),  # was INTERNAL: int() limit
    ("request_id", 9, "r" * 50_000, "request_id must be at most 128"),
])
def test_huge_values_are_refused_with_a_short_message_naming_the_field(escape_server, field, number, value, rule):
    with grpc.insecure_channel(escape_server.target) as channel:
        call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(field_bytes(number, value.encode()) + field_varint(3, 5), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    details = info.value.details()
    assert details.startswith(rule), details
    assert f"({len(value):,} characters)" in details and len(details) < 400, details


def test_undecodable_model_names_are_refused(escape_server):
    """An over-long UTF-8 '/' (0xC0 0xAF), an old path-traversal trick, cannot even be decoded."""
    with grpc.insecure_channel(escape_server.target) as channel:
        call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(field_bytes(1, b"..\xc0\xafoutside") + field_varint(3, 5), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_escape_ever_loaded_or_listed_anything(escape_server):
    with GeneratorClient(escape_server.target) as client:
        names = {m.name for m in client.list_models()}
    assert names == {"tiny", "other"}
    assert str(escape_server.outside) not in "".join(l for l in escape_server.stderr if "loaded" in l)
    assert probes.health_status(escape_server.target) == "SERVING"


# ---- message size ----

LIMIT = 64 * 1024  # --max-message-bytes of the small server, far below gRPC's 4 MiB default


@pytest.fixture(scope="module")
def small_server(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--max-message-bytes", str(LIMIT), env=no_torch_env) as server:
        yield server


def _status(target: str, prime: str = "A", stop: tuple = ()) -> grpc.StatusCode:
    with GeneratorClient(target) as client:
        try:
            client.generate(prime, 5, model="tiny", stop=stop, timeout=30).text()
            return grpc.StatusCode.OK
        except ServiceError as e:
            return e.code


def test_a_message_over_the_servers_own_limit_is_resource_exhausted(small_server):
    assert _status(small_server.target, "A" * (LIMIT + 100)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _status(small_server.target, stop=("ab" * 32,) * 2000) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Just under the limit the message arrives and validation answers (the prime is over --max-prime-chars).
    assert _status(small_server.target, "A" * (LIMIT - 100)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _status(small_server.target) == grpc.StatusCode.OK
    assert probes.health_status(small_server.target) == "SERVING"


def test_the_default_limit_is_explicit_and_refuses_oversize_messages(model_repo, no_torch_env):
    from charrnn.service.config import ServeConfig

    assert ServeConfig().max_message_bytes == 4 * 1024 * 1024
    with ServeProcess(model_repo, env=no_torch_env) as server:
        assert _status(server.target, "A" * (5 * 1024 * 1024)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _status(server.target) == grpc.StatusCode.OK


# ---- mutual TLS ----

def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer: str, issuer_key, start: dt.datetime, end: dt.datetime, *, ca=False,
          usage=None, sans=()) -> bytes:
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
    builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA; a server certificate; client certificates valid, expired and not yet valid."""
    folder = tmp_path_factory.mktemp("security-pki")
    now = dt.datetime.now(dt.timezone.utc)
    day = dt.timedelta(days=1)
    ca_key = _key()
    files = {"ca.pem": _cert("security test CA", ca_key, "security test CA", ca_key, now - day, now + day, ca=True)}
    server_key = _key()
    files["server.pem"] = _cert("localhost", server_key, "security test CA", ca_key, now - day, now + day,
                                usage=ExtendedKeyUsageOID.SERVER_AUTH,
                                sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    files["server.key"] = _pem_key(server_key)
    for which, (start, end) in {"valid": (now - day, now + day), "expired": (now - 10 * day, now - day),
                                "not-yet-valid": (now + day, now + 10 * day)}.items():
        key = _key()
        files[f"{which}.pem"] = _cert(f"{which} client", key, "security test CA", ca_key, start, end,
                                      usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        files[f"{which}.key"] = _pem_key(key)
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def mtls_server(pki, model_repo, no_torch_env):
    args = ("--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]),
            "--tls-client-ca", str(pki["ca.pem"]))
    with ServeProcess(model_repo, *args, env=no_torch_env) as server:
        yield server


def _list_models(target: str, **tls) -> str:
    with GeneratorClient(target, **tls) as client:
        try:
            return ",".join(sorted(m.name for m in client.list_models(timeout=10)))
        except ServiceError as e:
            return e.code.name


def test_a_client_certificate_valid_now_is_served(mtls_server, pki):
    tls = dict(tls_ca=str(pki["ca.pem"]), tls_cert=str(pki["valid.pem"]), tls_key=str(pki["valid.key"]))
    assert _list_models(mtls_server.target, **tls) == "other,tiny"


@pytest.mark.parametrize("which", ["expired", "not-yet-valid"])
def test_a_client_certificate_outside_its_validity_is_refused(mtls_server, pki, which):
    tls = dict(tls_ca=str(pki["ca.pem"]), tls_cert=str(pki[f"{which}.pem"]), tls_key=str(pki[f"{which}.key"]))
    assert _list_models(mtls_server.target, **tls) == "UNAVAILABLE"


def test_a_plaintext_client_is_refused_by_the_mtls_server(mtls_server):
    assert _list_models(mtls_server.target) == "UNAVAILABLE"
    with grpc.insecure_channel(mtls_server.target) as channel:  # the raw method path too, not only the client class
        call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(field_varint(3, 5), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.proc.poll() is None
