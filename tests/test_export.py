"""export_model: the ONNX graph matches PyTorch, carries its metadata, and refuses what it cannot prove."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

from charrnn import modelfile as mf
from charrnn.exporter.export import PRODUCER_NAME, ExportError, export_model
from charrnn.exporter.parity import check_parity, cpu_session
from testkit.modelfactory import DEFAULT_VOCAB, make_model, make_model_file, make_model_repo


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_both(model, sess, meta, tokens: np.ndarray, state: tuple[np.ndarray, ...]):
    """(onnx outputs, torch outputs), each [logits, *state]."""
    feeds = {mf.INPUT_TOKENS: tokens, **{i: s for (i, _), s in zip(meta.state_names(), state)}}
    got = sess.run([mf.OUTPUT_LOGITS, *(o for _, o in meta.state_names())], feeds)
    with torch.no_grad():
        logits, new = model(torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state))
    return got, [logits.numpy(), *(s.numpy() for s in new)]


@pytest.mark.parametrize("cell, layers, hidden", [("lstm", 2, 24), ("gru", 2, 24), ("rnn", 3, 12), ("lstm", 1, 8)])
def test_exported_graph_matches_pytorch_at_any_batch_and_steps(tmp_path, cell, layers, hidden):
    model = make_model(cell=cell, layers=layers, hidden=hidden, seed=3)
    report = export_model(model, list(DEFAULT_VOCAB), tmp_path / "m.onnx")
    assert report.max_delta_logits <= 1e-4 and report.max_delta_state <= 1e-4 and report.max_error <= 1e-4
    sess = session(report.path)
    meta = mf.ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    rng = np.random.default_rng(0)
    # Shapes the exporter's own check did not use, including batch 1 with many steps.
    for batch, steps in [(1, 100), (2, 1), (5, 7), (16, 3)]:
        tokens = rng.integers(0, len(DEFAULT_VOCAB), (batch, steps), dtype=np.int64)
        state = tuple(rng.normal(0, 0.5, (layers, batch, hidden)).astype(np.float32) for _ in meta.state_names())
        got, want = run_both(model, sess, meta, tokens, state)
        assert got[0].shape == (batch, steps, len(DEFAULT_VOCAB))
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == np.float32
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cell", mf.CELLS)
def test_prefill_then_single_steps_equals_one_long_call(tmp_path, cell):
    model = make_model(cell=cell, layers=2, hidden=16, seed=1)
    path = make_model_repo(tmp_path, cell=cell, layers=2, hidden=16, seed=0) / "tiny" / "1" / mf.MODEL_FILE
    sess = session(path)  # seed 0 + version 1 is the weights of make_model(seed=1)
    meta = mf.ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, meta.vocab_size, (3, 12), dtype=np.int64)
    zeros = tuple(np.zeros((2, 3, 16), np.float32) for _ in meta.state_names())
    whole, want = run_both(model, sess, meta, tokens, zeros)
    np.testing.assert_allclose(whole[0], want[0], atol=1e-4, rtol=0)
    feeds = {mf.INPUT_TOKENS: tokens[:, :8], **{i: s for (i, _), s in zip(meta.state_names(), zeros)}}
    out = sess.run(None, feeds)  # prefill: 8 steps
    logits = [out[0]]
    for t in range(8, 12):  # decode: one step at a time, state fed back
        state = dict(zip([i for i, _ in meta.state_names()], out[1:]))
        out = sess.run(None, {mf.INPUT_TOKENS: tokens[:, t : t + 1], **state})
        logits.append(out[0])
    np.testing.assert_allclose(np.concatenate(logits, axis=1), whole[0], atol=1e-5, rtol=0)
    for a, b in zip(out[1:], whole[1:]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_metadata_round_trips_through_onnxruntime(tmp_path):
    model = make_model(cell="gru", layers=2, hidden=8, embed_dim=5)
    train_config = {"lr": 0.002, "batch_size": 32, "data": tmp_path / "corpus.txt"}
    report = export_model(
        model,
        list(DEFAULT_VOCAB),
        tmp_path / "m.onnx",
        val_loss=1.4375,
        train_steps=1234,
        corpus_sha256="0123456789abcdef" * 4,
        corpus_chars=1115394,
        train_config=train_config,
    )
    sess = session(report.path)
    assert sess.get_modelmeta().producer_name == PRODUCER_NAME
    props = sess.get_modelmeta().custom_metadata_map
    meta = mf.ModelMetadata.from_props(props)
    assert meta == report.metadata
    assert meta.vocab == tuple(DEFAULT_VOCAB)
    assert (meta.cell, meta.layers, meta.hidden, meta.embed_dim) == ("gru", 2, 8, 5)
    assert (meta.val_loss, meta.train_steps, meta.corpus_chars) == (1.4375, 1234, 1115394)
    assert meta.corpus_sha256 == "0123456789abcdef" * 4
    assert meta.train_config == {"lr": 0.002, "batch_size": 32, "data": str(tmp_path / "corpus.txt")}
    assert meta.created.endswith("+00:00")
    meta.check_io(sess.get_inputs(), sess.get_outputs())


def test_unknown_val_loss_is_written_as_nan(tmp_path):
    report = make_model_file(tmp_path / "m.onnx")
    props = session(report.path).get_modelmeta().custom_metadata_map
    assert props[mf.KEY_VAL_LOSS] == "nan"
    assert math.isnan(mf.ModelMetadata.from_props(props).val_loss)


def test_unicode_vocabulary_round_trips_exactly(tmp_path):
    vocab = [
        "\n", " ", "a", "é",  # precomposed U+00E9
        "e", "\u0301",  # a combining acute accent, its own character
        "ж", "Я",  # Cyrillic
        "漢", "字",  # CJK
        "😀", "🦀",  # astral plane: one code point, two UTF-16 units
        "\u200d", "\t", "\x00",  # zero-width joiner, tab, NUL
    ]
    report = export_model(make_model(vocab=vocab, hidden=8), vocab, tmp_path / "m.onnx")
    props = session(report.path).get_modelmeta().custom_metadata_map
    assert mf.ModelMetadata.from_props(props).vocab == tuple(vocab)
    assert json.loads(props[mf.KEY_VOCAB])[10] == 0x1F600


@pytest.mark.parametrize(
    "vocab, message",
    [
        (list("ab") + ["e\u0301"], r"vocab\[2\] must be one character \(one code point\), got .* \(U\+0065 U\+0301\)"),
        (list("ab") + ["\ud800"], r"cannot export: charrnn.vocab\[2\] is a surrogate \(U\+D800\)"),
        (list("aba"), r"cannot export: charrnn.vocab repeats characters: 'a'"),
        (list("abcd"), r"vocab has 4 characters, the model's vocab_size is 3"),
    ],
)
def test_a_vocabulary_the_reader_would_refuse_is_not_exported(tmp_path, vocab, message):
    model = make_model(vocab="xyz", hidden=8)
    with pytest.raises(ValueError, match=message):
        export_model(model, vocab, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_parity_failure_leaves_no_file(tmp_path):
    model = make_model(cell="lstm", layers=2, hidden=32, seed=5)
    report = export_model(model, list(DEFAULT_VOCAB), tmp_path / "ok.onnx")
    # float32 recurrences in two runtimes differ by rounding: small, but not zero.
    assert 0 < report.max_error <= 1e-4
    out = tmp_path / "tight" / "m.onnx"
    with pytest.raises(ExportError, match=r"ONNX and PyTorch disagree beyond tolerance .*error="):
        export_model(model, list(DEFAULT_VOCAB), out, tolerance=report.max_error / 2)
    assert list(out.parent.iterdir()) == []  # neither the file nor its temporary


def test_export_replaces_an_existing_file_whole(tmp_path):
    path = tmp_path / "m.onnx"
    make_model_file(path, hidden=8, seed=1)
    first = path.read_bytes()
    make_model_file(path, hidden=8, seed=2)
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_model_repo_factory_lays_out_versions(tmp_path):
    root = make_model_repo(tmp_path / "models", name="small", versions=(1, 3), cell="rnn", hidden=8)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.onnx"))
    assert files == ["small/1/model.onnx", "small/3/model.onnx"]
    a, b = (session(root / "small" / v / mf.MODEL_FILE) for v in ("1", "3"))
    feeds = {"tokens": np.zeros((1, 4), np.int64), "h": np.zeros((1, 1, 8), np.float32)}
    assert not np.allclose(a.run(None, feeds)[0], b.run(None, feeds)[0])  # versions have their own weights


def test_the_reader_needs_neither_torch_nor_onnx(tmp_path):
    report = make_model_file(tmp_path / "m.onnx", cell="lstm", layers=2, hidden=8, vocab="\nab😀")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        sys.modules["onnx"] = None
        import numpy as np, onnxruntime as ort
        from charrnn import modelfile as mf
        sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        meta = mf.ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
        meta.check_io(sess.get_inputs(), sess.get_outputs())
        zeros = np.zeros((meta.layers, 2, meta.hidden), np.float32)
        logits, h, c = sess.run(None, {"tokens": np.zeros((2, 3), np.int64), "h": zeros, "c": zeros})
        print(meta.cell, meta.layers, meta.hidden, "".join(meta.vocab).encode("unicode_escape").decode(), logits.shape)
        """
    )
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-c", script, str(report.path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["lstm", "2", "8", r"\nab\U0001f600", "(2,", "3,", "4)"]


def test_parity_check_tells_a_different_model_apart(tmp_path):
    report = make_model_file(tmp_path / "m.onnx", cell="gru", hidden=8, seed=1)
    other = make_model(cell="gru", hidden=8, seed=2)  # same shapes, other weights
    results = check_parity(other, cpu_session(report.path), report.metadata)
    assert [(r.batch, r.steps) for r in results] == [(1, 1), (3, 17), (8, 64)]
    assert all(not r.within(1e-4) and r.max_error > 1e-2 for r in results)
