"""charrnn-serve's flags: one table in docs/configuration.md, an env twin for each, clear errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from charrnn.service.config import (
    TABLE_BEGIN,
    TABLE_END,
    ServeConfig,
    build_parser,
    env_name,
    flag_name,
    flags_table,
    parse_args,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _docs_table() -> str:
    text = DOCS.read_text(encoding="utf-8")
    return text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()


def test_docs_table_is_the_generated_one():
    assert _docs_table() == flags_table(), "run: python -m charrnn.service.config --write-docs docs/configuration.md"


def test_docs_table_lists_exactly_the_parsers_flags_and_env_vars():
    parser_flags = {s for a in build_parser({})._actions for s in a.option_strings} - {"-h", "--help"}
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(CHARRNN_[A-Z_]+)` \|", _docs_table(), flags=re.M)
    assert {flag for flag, _ in rows} == parser_flags
    for flag, env in rows:
        assert env == "CHARRNN_" + flag[2:].replace("-", "_").upper()


def test_defaults(tmp_path):
    c = parse_args(["--models", str(tmp_path)], env={})
    assert (c.port, c.metrics_port, c.host, c.drain_grace, c.batching) == (50051, 8000, "0.0.0.0", 20.0, True)
    assert (c.max_chars, c.max_prime_chars, c.log_format, c.tls) == (10000, 4096, "text", False)


# A value for every field, different from its default, as it is written on the command line.
VALUES = {
    "host": "127.0.0.1", "port": "0", "metrics_port": "9100", "device": "cpu", "default_model": "tiny",
    "batching": "off", "max_active_streams": "8", "max_queue": "3", "max_queue_wait": "1.5", "max_chars": "77",
    "max_prime_chars": "9", "threads": "2", "flush_interval": "0.01", "drain_grace": "3", "reload_interval": "0.5", "tls_cert": "c.pem",
    "tls_key": "k.pem", "tls_client_ca": "ca.pem", "log_format": "json", "log_level": "debug",
    "max_message_bytes": "65536", "frontends": "3", "max_n": "4", "max_regex_states": "50", "max_score_chars": "500", "step_timeout": "5", "engine_restart_backoff": "0.2", "engine_max_backoff": "4",
    "engine_max_failures": "2", "engine_failure_window": "10", "http_port": "8080",
    "decode_steps": "4", "overlap": "on", "cuda_graphs": "on",
}


def test_every_field_has_a_test_value():
    assert set(VALUES) | {"models"} == {f.name for f in dataclasses.fields(ServeConfig)}


def test_every_flag_has_an_env_twin_and_the_flag_wins(tmp_path):
    env = {env_name(name): raw for name, raw in VALUES.items()} | {"CHARRNN_MODELS": str(tmp_path)}
    from_env = parse_args([], env=env)
    argv = [a for name, raw in VALUES.items() for a in (flag_name(name), raw)] + ["--models", str(tmp_path)]
    from_flags = parse_args(argv, env={})
    assert from_env == from_flags
    assert from_env.batching is False and from_env.max_queue_wait == 1.5 and from_env.models == str(tmp_path)
    assert parse_args(["--port", "123"], env=env).port == 123  # the command line beats the environment


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--port", "70000"], {}, r"--port \(or CHARRNN_PORT\) must be in \[0, 65535\] .*got 70000"),
        (["--http-port", "-2"], {}, r"--http-port \(or CHARRNN_HTTP_PORT\) must be in \[-1, 65535\] \(-1 is off.*got -2"),
        (["--drain-grace", "-1"], {}, r"--drain-grace \(or CHARRNN_DRAIN_GRACE\) must be a number >= 0, got -1.0"),
        (["--max-active-streams", "0"], {}, r"--max-active-streams .* must be >= 1, got 0"),
        (["--decode-steps", "0"], {}, r"--decode-steps \(or CHARRNN_DECODE_STEPS\) must be in \[1, 64\], got 0"),
        (["--flush-interval", "2"], {}, r"--flush-interval \(or CHARRNN_FLUSH_INTERVAL\) must be in \[0, 1\] seconds, got 2.0"),
        (["--tls-cert", "c.pem"], {}, r"--tls-key .* must be given together with --tls-cert"),
        (["--step-timeout", "0"], {}, r"--step-timeout \(or CHARRNN_STEP_TIMEOUT\) must be a number > 0, got 0.0"),
        (["--engine-max-backoff", "0.01"], {}, r"--engine-max-backoff .* must be a number >= --engine-restart-backoff"),
        (["--engine-max-failures", "0"], {}, r"--engine-max-failures .* must be >= 1, got 0"),
        (["--tls-client-ca", "ca.pem"], {}, r"--tls-client-ca .* used only with --tls-cert"),
        ([], {"CHARRNN_PORT": "abc"}, r"CHARRNN_PORT must be a whole number, got 'abc'"),
        ([], {"CHARRNN_DEVICE": "tpu"}, r"CHARRNN_DEVICE must be one of auto, cpu, cuda, got 'tpu'"),
        (["--device", "tpu"], {}, r"argument --device: invalid choice: 'tpu'"),
        (["--batching", "maybe"], {}, r"argument --batching: must be on or off, got 'maybe'"),
        ([], {"CHARRNN_BATCHING": "yes"}, r"CHARRNN_BATCHING must be one of on, off, got 'yes'"),
    ],
)
def test_bad_values_exit_2_naming_flag_value_and_rule(tmp_path, capsys, argv, env, message):
    with pytest.raises(SystemExit) as info:
        parse_args(["--models", str(tmp_path)] + argv, env=env)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_models_is_required_and_must_be_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([], env={})
    assert "--models (or CHARRNN_MODELS) must be a model repository folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--models", str(tmp_path / "nope")], env={})
    assert "must be a folder, got" in capsys.readouterr().err
