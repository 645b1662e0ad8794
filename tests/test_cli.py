"""charrnn-generate without a server to talk to: errors name the server and exit non-zero."""

from __future__ import annotations

import socket

import pytest

from charrnn.service import generate_cli


def test_unreachable_server_exits_1_naming_it(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = generate_cli.main(["--server", f"127.0.0.1:{port}", "--prime", "ROMEO:", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert "charrnn-generate: UNAVAILABLE: " in err and f"(server 127.0.0.1:{port})" in err


def test_missing_tls_file_exits_2(tmp_path, capsys):
    rc = generate_cli.main(["--tls-ca", str(tmp_path / "ca.pem"), "--list"])
    assert rc == 2 and "--tls-ca must be a readable PEM file" in capsys.readouterr().err


def test_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        generate_cli.main(["--max-chars", "many"])
    assert info.value.code == 2 and "--max-chars: invalid int value" in capsys.readouterr().err


def test_server_defaults_to_env(monkeypatch):
    monkeypatch.setenv("CHARRNN_SERVER", "example.invalid:1234")
    assert generate_cli.build_parser().parse_args([]).server == "example.invalid:1234"
