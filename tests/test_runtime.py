"""Device selection and model loading on real onnxruntime sessions."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from charrnn import modelfile as mf
from charrnn.service import graphs, runtime

CUDA_REASON = runtime.cuda_unusable_reason()
needs_no_cuda = pytest.mark.skipif(CUDA_REASON is None, reason="CUDA is usable on this machine")


@needs_no_cuda
def test_auto_takes_the_cpu_with_one_log_line_saying_why(caplog):
    with caplog.at_level(logging.INFO, logger="charrnn.service.runtime"):
        assert runtime.select_device("auto") == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "charrnn.service.runtime"]
    assert lines == [f"device: cpu (CUDA not usable: {CUDA_REASON})"]
    assert "\n" not in CUDA_REASON and len(CUDA_REASON) < 200


@needs_no_cuda
def test_asking_for_cuda_where_it_is_not_usable_is_an_error_at_start():
    with pytest.raises(RuntimeError, match="CUDA is not usable: .*use --device cpu or auto"):
        runtime.select_device("cuda")


def test_cpu_is_taken_when_asked_and_unknown_devices_are_refused():
    assert runtime.select_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        runtime.select_device("gpu")


@pytest.fixture(scope="module")
def tiny_path(model_repo):
    return model_repo / "tiny" / "1" / mf.MODEL_FILE


def test_loaded_model_runs_like_the_raw_session(tiny_path):
    model = runtime.load_model(tiny_path, "tiny", 1, "cpu", threads=1)
    assert (model.name, model.version, model.device, model.label) == ("tiny", 1, "cpu", "tiny@1")
    assert model.metadata.cell == "lstm" and model.metadata.hidden == 16
    raw = ort.InferenceSession(str(tiny_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.metadata.vocab_size, size=(3, 5))
    h, c = (rng.normal(size=(1, 3, 16)).astype(np.float32) for _ in range(2))
    logits, (h2, c2) = model.run(tokens, (h, c))
    want = raw.run(None, {"tokens": tokens, "h": h, "c": c})
    for got, ref in zip((logits, h2, c2), want):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_state_rows_can_be_gathered_and_joined(tiny_path):
    model = runtime.load_model(tiny_path, "tiny", 1, "cpu")
    _, state = model.run(np.arange(12).reshape(4, 3), model.zero_state(4))
    picked = model.gather(state, np.array([3, 1]))
    joined = model.concat([picked, model.zero_state(2)])
    for full, part, both in zip(state, picked, joined):
        np.testing.assert_array_equal(part, full[:, [3, 1]])
        assert both.shape == (1, 4, 16) and not both[:, 2:].any()
        np.testing.assert_array_equal(both[:, :2], part)


def test_a_gru_has_one_state_tensor(model_repo):
    model = runtime.load_model(model_repo / "other" / "1" / mf.MODEL_FILE, "other", 1, "cpu")
    assert len(model.zero_state(2)) == 1
    logits, state = model.run(np.zeros((2, 4), np.int64), model.zero_state(2))
    assert logits.shape == (2, 4, model.metadata.vocab_size) and state[0].shape == (1, 2, 16)


def rewrite(src, dst, change):
    proto = onnx.load(str(src))
    change(proto)
    onnx.save(proto, str(dst))
    return dst


def set_prop(proto, key, value):
    for p in proto.metadata_props:
        if p.key == key:
            p.value = value


def test_bad_files_are_refused_with_the_path_and_the_reason(tiny_path, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(graphs.identity_model())  # valid ONNX, no charrnn metadata
    cases = {
        tmp_path / "missing.onnx": "no such file",
        junk: "onnxruntime cannot load it as an ONNX model",
        plain: "metadata is missing charrnn.format_version",
        rewrite(tiny_path, tmp_path / "vocab.onnx", lambda p: set_prop(p, mf.KEY_VOCAB, "[97, 98]")):
            r"graph output 'logits' must be tensor\(float\) \[batch, steps, 2\] \(vocab_size from the metadata\), "
            r"got tensor\(float\) \[.*61\]",
        rewrite(tiny_path, tmp_path / "hidden.onnx", lambda p: set_prop(p, mf.KEY_HIDDEN, "32")):
            r"graph input 'h' must be tensor\(float\) \[1, batch, 32\] \(layers, hidden from the metadata\), "
            r"got tensor\(float\) \[1, .*16\]",
        rewrite(tiny_path, tmp_path / "cell.onnx", lambda p: set_prop(p, mf.KEY_CELL, "gru")):
            "graph inputs must be tokens, h for a gru model, got tokens, h, c",
        rewrite(tiny_path, tmp_path / "version.onnx", lambda p: set_prop(p, mf.KEY_FORMAT_VERSION, "99")):
            "charrnn.format_version is 99",
    }
    for path, reason in cases.items():
        with pytest.raises(mf.ModelFormatError, match=reason) as info:
            runtime.load_model(path, "x", 1, "cpu")
        assert str(info.value).startswith(f"{path}: ")


def test_a_renamed_graph_input_is_refused(tiny_path, tmp_path):
    def rename(proto):
        for node in proto.graph.node:
            node.input[:] = ["tokenz" if i == "tokens" else i for i in node.input]
        proto.graph.input[0].name = "tokenz"

    path = rewrite(tiny_path, tmp_path / "renamed.onnx", rename)
    with pytest.raises(mf.ModelFormatError, match="graph inputs must be tokens, h, c for a lstm model, got tokenz, h, c"):
        runtime.load_model(path, "x", 1, "cpu")


@pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA not usable here: {CUDA_REASON}")
def test_cuda_keeps_the_state_on_the_device_and_matches_the_cpu(tiny_path, tmp_path):
    cpu = runtime.load_model(tiny_path, "tiny", 1, "cpu")
    gpu = runtime.load_model(shutil.copy(tiny_path, tmp_path / "m.onnx"), "tiny", 1, "cuda")
    tokens = np.arange(10).reshape(2, 5)
    lc, sc = cpu.run(tokens, cpu.zero_state(2))
    lg, sg = gpu.run(tokens, gpu.zero_state(2))
    assert all(isinstance(s, ort.OrtValue) and s.device_name() == "cuda" for s in sg)
    np.testing.assert_allclose(lg, lc, atol=1e-4)
    joined = gpu.concat([gpu.gather(sg, np.array([1])), gpu.zero_state(1)])
    np.testing.assert_allclose(gpu.state_numpy(joined)[0][:, 0], sc[0][:, 1], atol=1e-4)
