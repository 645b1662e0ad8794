"""Every rule of service/validation.py, table-driven: the message names the field, the value and the rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from charrnn.modelfile import ModelMetadata
from charrnn.service import errors
from charrnn.service.validation import Limits, generate_fields, request_id_of, validate_request
from charrnn.v1 import generator_pb2 as pb

VOCAB = tuple("\nabcdefgh :")
META = ModelMetadata(vocab=VOCAB, cell="lstm", layers=1, hidden=8, val_loss=1.0, train_steps=1, corpus_sha256="0" * 64)
LIMITS = Limits(max_chars=500, max_prime_chars=20)


def _validate(**fields):
    fields.setdefault("max_chars", 10)
    return validate_request(generate_fields(pb.GenerateRequest(**fields)), META, LIMITS, now=5.0, deadline=None)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"max_chars": 0}, r"max_chars must be in \[1, 500\], got 0$"),
        ({"max_chars": 501}, r"max_chars must be in \[1, 500\], got 501 \(the server's --max-chars"),
        ({"prime": "a" * 21}, r"prime must be at most 20 characters long, got 21 characters \(.*--max-prime-chars"),
        ({"prime": "abZ!Zé"}, r"prime must be made of .* got 3 characters outside it: 'Z' \(U\+005A LATIN CAPITAL "
         r"LETTER Z\), '!' \(U\+0021 EXCLAMATION MARK\), 'é' \(U\+00E9"),
        ({"prime": "a\x07"}, r"got 1 character outside it: \(U\+0007\)"),
        ({"temperature": -0.5}, r"temperature must be a finite number in \[0, 100\] \(0 means greedy\), got -0.5"),
        ({"temperature": math.nan}, r"temperature must be .* got nan"),
        ({"temperature": math.inf}, r"temperature must be .* got inf"),
        ({"temperature": 100.5}, r"temperature must be .* got 100.5"),
        ({"top_p": 1.5}, r"top_p must be in \[0, 1\] \(0 or 1 means off\), got 1.5"),
        ({"top_p": -0.25}, r"top_p must be in \[0, 1\].* got -0.25"),
        ({"top_p": math.nan}, r"top_p must be in \[0, 1\].* got nan"),
        ({"stop": ["x"] * 17}, r"stop must be at most 16 sequences, got 17 sequences"),
        ({"stop": ["ab", ""]}, r"stop\[1\] must be a non-empty string of at most 64 characters, got ''"),
        ({"stop": ["a" * 65]}, r"stop\[0\] must be .* got 65 characters"),
        ({"request_id": "bad\nid"}, r"request_id must be at most 128 printable ASCII characters, got 'bad\\nid'"),
        ({"request_id": "x" * 129}, r"request_id must be at most 128 printable ASCII"),
    ],
)
def test_bad_field_is_refused_naming_field_value_and_rule(fields, match):
    with pytest.raises(errors.InvalidArgument, match=match) as info:
        _validate(**fields)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.field.split("[")[0] in fields


def test_defaults_follow_the_proto():
    req = _validate(prime="ab")
    assert req.sampling.temperature == 1.0  # unset temperature
    assert req.sampling.top_p == 1.0  # 0 means off
    assert req.sampling.top_k == 0
    assert req.prime_ids.dtype == np.int64 and req.prime_ids.tolist() == [1, 2]
    assert req.arrived == 5.0 and req.deadline is None and req.max_chars == 10
    assert len(req.request_id) == 16  # made up


def test_empty_prime_starts_at_a_newline():
    assert _validate().prime_ids.tolist() == [VOCAB.index("\n")]
    no_newline = ModelMetadata(vocab=tuple("xyz"), cell="gru", layers=1, hidden=4, val_loss=0.0, train_steps=0,
                               corpus_sha256="")
    req = validate_request(generate_fields(pb.GenerateRequest(max_chars=1)), no_newline, LIMITS, now=0.0, deadline=None)
    assert req.prime_ids.tolist() == [0]


def test_values_at_the_edges_are_accepted():
    req = _validate(max_chars=500, prime="a" * 20, temperature=0.0, top_p=1.0, stop=["x" * 64] * 16, seed=7,
                    request_id="r-1 ~")
    assert req.sampling.temperature == 0.0 and req.sampling.seed == 7 and req.request_id == "r-1 ~"
    assert _validate(temperature=100.0).sampling.temperature == 100.0


def test_top_k_at_or_above_vocab_size_means_off():
    assert _validate(top_k=3).sampling.top_k == 3
    assert _validate(top_k=len(VOCAB)).sampling.top_k == 0
    assert _validate(top_k=10**6).sampling.top_k == 0


def test_unset_seed_is_drawn_per_request_and_a_set_seed_is_kept():
    seeds = {_validate().sampling.seed for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert _validate(seed=2**64 - 1).sampling.seed == 2**64 - 1


def test_request_id_is_kept_or_made_up():
    assert request_id_of(pb.GenerateRequest(request_id="abc")) == "abc"
    made = {request_id_of(pb.GenerateRequest()) for _ in range(3)}
    assert len(made) == 3
