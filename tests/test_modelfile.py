"""The model file contract from the reader's side: every rule of charrnn.modelfile, one row each.

These tests need neither torch nor onnx: the reader (the service) has neither.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from charrnn import modelfile as mf

DELETE = object()  # a row's value meaning "remove this key"


def valid_props(cell: str = "lstm") -> dict[str, str]:
    return mf.ModelMetadata(
        vocab=tuple("\nab"),
        cell=cell,
        layers=2,
        hidden=8,
        val_loss=1.25,
        train_steps=100,
        corpus_sha256="ab" * 32,
        embed_dim=4,
        corpus_chars=1000,
        created="2026-01-01T00:00:00+00:00",
        train_config={"lr": 0.002, "steps": 100},
    ).to_props()


def test_valid_props_round_trip_every_field():
    meta = mf.ModelMetadata.from_props(valid_props())
    assert meta.vocab == ("\n", "a", "b")
    assert (meta.cell, meta.layers, meta.hidden, meta.embed_dim) == ("lstm", 2, 8, 4)
    assert (meta.val_loss, meta.train_steps, meta.corpus_chars) == (1.25, 100, 1000)
    assert meta.corpus_sha256 == "ab" * 32
    assert meta.created == "2026-01-01T00:00:00+00:00"
    assert meta.train_config == {"lr": 0.002, "steps": 100}
    assert meta.format_version == mf.FORMAT_VERSION
    assert mf.ModelMetadata.from_props(meta.to_props()) == meta


def test_optional_keys_take_their_defaults_and_unknown_keys_are_ignored():
    props = valid_props()
    for key in (mf.KEY_EMBED_DIM, mf.KEY_CORPUS_CHARS, mf.KEY_CREATED, mf.KEY_TRAIN_CONFIG):
        del props[key]
    props["charrnn.some_future_key"] = "whatever"
    meta = mf.ModelMetadata.from_props(props)
    assert (meta.embed_dim, meta.corpus_chars, meta.created, meta.train_config) == (0, 0, "", {})


@pytest.mark.parametrize("raw", ["nan", "NaN"])
def test_val_loss_nan_means_never_evaluated(raw):
    assert math.isnan(mf.ModelMetadata.from_props({**valid_props(), mf.KEY_VAL_LOSS: raw}).val_loss)


def test_empty_corpus_hash_means_unknown():
    assert mf.ModelMetadata.from_props({**valid_props(), mf.KEY_CORPUS_SHA256: ""}).corpus_sha256 == ""


BAD_PROPS = [
    # (key, value or DELETE, message pattern)
    *[(key, DELETE, f"metadata is missing {key}") for key in mf.REQUIRED_KEYS],
    (mf.KEY_FORMAT_VERSION, "2", r"charrnn.format_version is 2, this charrnn reads 1; upgrade"),
    (mf.KEY_FORMAT_VERSION, "0", r"charrnn.format_version must be >= 1, got 0"),
    (mf.KEY_FORMAT_VERSION, "one", r"charrnn.format_version must be a decimal integer, got 'one'"),
    (mf.KEY_FORMAT_VERSION, "1.0", r"charrnn.format_version must be a decimal integer, got '1.0'"),
    (mf.KEY_VOCAB, "[65,", r"charrnn.vocab is not valid JSON"),
    (mf.KEY_VOCAB, "[]", r"charrnn.vocab must be a non-empty JSON list of code points, got '\[\]'"),
    (mf.KEY_VOCAB, '"AB"', r"charrnn.vocab must be a non-empty JSON list of code points"),
    (mf.KEY_VOCAB, '{"0": 65}', r"charrnn.vocab must be a non-empty JSON list of code points"),
    (mf.KEY_VOCAB, "[65, 55296]", r"charrnn.vocab\[1\] is a surrogate \(U\+D800\), which is not a character"),
    (mf.KEY_VOCAB, "[65, 57343]", r"charrnn.vocab\[1\] is a surrogate \(U\+DFFF\)"),
    (mf.KEY_VOCAB, "[65, -1]", r"charrnn.vocab\[1\] must be a code point in \[0, 0x10FFFF\], got -1"),
    (mf.KEY_VOCAB, "[65, 1114112]", r"charrnn.vocab\[1\] must be a code point in \[0, 0x10FFFF\], got 1114112"),
    (mf.KEY_VOCAB, '[65, "B"]', r"charrnn.vocab\[1\] must be a code point .* got 'B'"),
    (mf.KEY_VOCAB, "[65, 66.0]", r"charrnn.vocab\[1\] must be a code point .* got 66.0"),
    (mf.KEY_VOCAB, "[65, true]", r"charrnn.vocab\[1\] must be a code point .* got True"),
    (mf.KEY_VOCAB, "[65, 66, 65]", r"charrnn.vocab repeats characters: 'A' \(U\+0041 LATIN CAPITAL LETTER A\)"),
    (mf.KEY_VOCAB, "[10, 10]", r"charrnn.vocab repeats characters: \(U\+000A\)"),
    (mf.KEY_CELL, "transformer", r"charrnn.cell must be one of lstm, gru, rnn, got 'transformer'"),
    (mf.KEY_CELL, "LSTM", r"charrnn.cell must be one of lstm, gru, rnn, got 'LSTM'"),
    (mf.KEY_LAYERS, "-1", r"charrnn.layers must be >= 1, got -1"),
    (mf.KEY_LAYERS, "0", r"charrnn.layers must be >= 1, got 0"),
    (mf.KEY_LAYERS, "2.0", r"charrnn.layers must be a decimal integer, got '2.0'"),
    (mf.KEY_LAYERS, " 2", r"charrnn.layers must be a decimal integer, got ' 2'"),
    (mf.KEY_LAYERS, "\u0662", r"charrnn.layers must be a decimal integer"),  # ARABIC-INDIC DIGIT TWO
    (mf.KEY_HIDDEN, "0", r"charrnn.hidden must be >= 1, got 0"),
    (mf.KEY_HIDDEN, "", r"charrnn.hidden must be a decimal integer, got ''"),
    (mf.KEY_TRAIN_STEPS, "-5", r"charrnn.train_steps must be >= 0, got -5"),
    (mf.KEY_EMBED_DIM, "-1", r"charrnn.embed_dim must be >= 0, got -1"),
    (mf.KEY_CORPUS_CHARS, "many", r"charrnn.corpus_chars must be a decimal integer, got 'many'"),
    (mf.KEY_VAL_LOSS, "low", r"charrnn.val_loss must be a number, got 'low'"),
    (mf.KEY_VAL_LOSS, "-0.5", r"charrnn.val_loss must be a finite number >= 0, or nan, got -0.5"),
    (mf.KEY_VAL_LOSS, "inf", r"charrnn.val_loss must be a finite number >= 0, or nan, got inf"),
    (mf.KEY_CORPUS_SHA256, "xyz", r"charrnn.corpus_sha256 must be 64 lowercase hex digits, or empty .* got 'xyz'"),
    (mf.KEY_CORPUS_SHA256, "AB" * 32, r"charrnn.corpus_sha256 must be 64 lowercase hex digits"),
    (mf.KEY_TRAIN_CONFIG, "{", r"charrnn.train_config is not valid JSON"),
    (mf.KEY_TRAIN_CONFIG, "[1, 2]", r"charrnn.train_config must be a JSON object, got list"),
]


@pytest.mark.parametrize(
    "key, value, message", BAD_PROPS, ids=[f"{k}={'<deleted>' if v is DELETE else v}" for k, v, _ in BAD_PROPS]
)
def test_each_metadata_rule_is_enforced_with_a_message(key, value, message):
    props = valid_props()
    if value is DELETE:
        del props[key]
    else:
        props[key] = value
    with pytest.raises(mf.ModelFormatError, match=message):
        mf.ModelMetadata.from_props(props)


def test_missing_keys_are_all_named_at_once():
    props = {k: v for k, v in valid_props().items() if k not in (mf.KEY_VOCAB, mf.KEY_CELL)}
    with pytest.raises(mf.ModelFormatError, match=r"missing charrnn.vocab, charrnn.cell \(is this a charrnn model"):
        mf.ModelMetadata.from_props(props)


def test_vocab_travels_as_code_points():
    vocab = ("\n", "é", "😀")
    props = dataclasses.replace(mf.ModelMetadata.from_props(valid_props()), vocab=vocab).to_props()
    assert json.loads(props[mf.KEY_VOCAB]) == [0x0A, 0xE9, 0x1F600]  # not UTF-8 bytes, not UTF-16 units
    assert mf.ModelMetadata.from_props(props).vocab == vocab


# --- graph inputs and outputs ---------------------------------------------------------------------


@dataclasses.dataclass
class Arg:
    """What onnxruntime's NodeArg carries: name, type, shape (ints fixed, str/None symbolic)."""

    name: str
    type: str
    shape: list


def graph_io(layers=2, hidden=8, vocab=3, cell="lstm"):
    inputs = [Arg("tokens", "tensor(int64)", ["batch", "steps"]), Arg("h", "tensor(float)", [layers, "batch", hidden])]
    outputs = [
        Arg("logits", "tensor(float)", ["batch", "steps", vocab]),
        Arg("h_out", "tensor(float)", [layers, "batch", hidden]),
    ]
    if cell == "lstm":
        inputs.append(Arg("c", "tensor(float)", [layers, "batch", hidden]))
        outputs.append(Arg("c_out", "tensor(float)", [layers, "batch", hidden]))
    return inputs, outputs


@pytest.mark.parametrize("cell", mf.CELLS)
def test_graph_io_that_fits_the_metadata_passes(cell):
    meta = mf.ModelMetadata.from_props(valid_props(cell))
    meta.check_io(*graph_io(cell=cell))
    inputs, outputs = graph_io(cell=cell)
    inputs[0].shape = [None, "T"]  # any symbolic naming will do
    meta.check_io(inputs, outputs)


def _edit(where, name, **changes):
    def apply(inputs, outputs):
        args = {"in": inputs, "out": outputs}[where]
        if changes.get("drop"):
            args[:] = [a for a in args if a.name != name]
            return
        if changes.get("add"):
            args.append(Arg(name, "tensor(float)", [1]))
            return
        arg = next(a for a in args if a.name == name)
        for field, value in changes.items():
            setattr(arg, field, value)

    return apply


BAD_IO = [
    (_edit("in", "c", drop=True), r"graph inputs must be tokens, h, c for a lstm model, got tokens, h"),
    (_edit("in", "extra", add=True), r"graph inputs must be tokens, h, c .* got tokens, h, c, extra"),
    (_edit("out", "c_out", drop=True), r"graph outputs must be logits, h_out, c_out for a lstm model"),
    (_edit("in", "tokens", type="tensor(int32)"), r"graph input 'tokens' must be .* got tensor\(int32\)"),
    (_edit("in", "tokens", shape=[1, "steps"]), r"graph input 'tokens' .* got tensor\(int64\) \[1, 'steps'\]"),
    (_edit("in", "tokens", shape=["batch", 1]), r"graph input 'tokens' .* got .*\['batch', 1\]"),
    (_edit("in", "tokens", shape=["batch"]), r"graph input 'tokens' .* got .*\['batch'\]"),
    (_edit("in", "h", shape=[2, "batch", 16]), r"graph input 'h' must be tensor\(float\) \[2, batch, 8\]"),
    (_edit("in", "c", shape=[1, "batch", 8]), r"graph input 'c' must be tensor\(float\) \[2, batch, 8\]"),
    (_edit("in", "h", type="tensor(double)"), r"graph input 'h' must be tensor\(float\)"),
    (
        _edit("out", "logits", shape=["batch", "steps", 4]),
        r"graph output 'logits' must be tensor\(float\) \[batch, steps, 3\]",
    ),
    (_edit("out", "h_out", shape=[2, 5, 8]), r"graph output 'h_out' must be tensor\(float\) \[2, batch, 8\]"),
]


@pytest.mark.parametrize("edit, message", BAD_IO, ids=[m.split(" must")[0][:40] for _, m in BAD_IO])
def test_each_graph_io_rule_is_enforced_with_a_message(edit, message):
    meta = mf.ModelMetadata.from_props(valid_props("lstm"))
    inputs, outputs = graph_io(cell="lstm")
    edit(inputs, outputs)
    with pytest.raises(mf.ModelFormatError, match=message):
        meta.check_io(inputs, outputs)


def test_a_gru_graph_must_not_carry_cell_state():
    meta = mf.ModelMetadata.from_props(valid_props("gru"))
    with pytest.raises(mf.ModelFormatError, match=r"graph inputs must be tokens, h for a gru model, got tokens, h, c"):
        meta.check_io(*graph_io(cell="lstm"))


# --- model names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "tiny", "Shakespeare-2x512_v1.3", "0", "a" * 128])
def test_model_names_that_are_allowed(name):
    assert mf.check_model_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "_x", "a/b", "..", "a b", "a\n", "é", "a" * 129, "a@1"])
def test_model_names_that_are_refused(name):
    with pytest.raises(mf.ModelFormatError, match=r"model name must be 1 to 128 characters from A-Z") as e:
        mf.check_model_name(name)
    assert str(e.value).endswith(f"got {name!r}")
