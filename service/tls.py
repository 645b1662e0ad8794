"""TLS and mutual TLS credentials for the server and its clients, from PEM files.

Server: --tls-cert and --tls-key turn TLS on; --tls-client-ca also requires every
client to present a certificate signed by that CA (mutual TLS).
Client: --tls-ca trusts a private CA (else the system roots); --tls-cert and
--tls-key present a client certificate.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} must be a readable PEM file, got {path!r}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} must be a PEM file (text with '-----BEGIN ...' blocks), got {path!r}")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``; with ``client_ca`` clients need a certificate."""
    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    if client_ca:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read(client_ca, "--tls-client-ca"), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Credentials for ``grpc.secure_channel``; ``ca`` empty trusts the system's roots."""
    if bool(cert) != bool(key):
        raise ValueError(f"--tls-cert and --tls-key must be given together, got cert={cert!r} key={key!r}")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca") if ca else None,
        private_key=_read(key, "--tls-key") if key else None,
        certificate_chain=_read(cert, "--tls-cert") if cert else None,
    )
