"""charrnn-export: checkpoint -> MODELS/<name>/<version>/model.onnx, and every way it refuses."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from charrnn import modelfile as mf
from charrnn.exporter.cli import main
from charrnn.training.checkpoint import save_checkpoint
from testkit.modelfactory import DEFAULT_VOCAB, make_model

SCRIPT = Path(sys.executable).parent / "charrnn-export"
SHA = "5eed" * 16


def write_checkpoint(path: Path, *, step: int = 40, val_loss: float = 2.5, seed: int = 0, **model_args) -> Path:
    """A checkpoint with the documented keys, of an untrained model: no training needed."""
    model = make_model(seed=seed, **{"cell": "lstm", "layers": 2, "hidden": 16, **model_args})
    save_checkpoint(
        path,
        dict(
            model_config=dataclasses.asdict(model.config),
            train_config={"lr": 0.002, "steps": step, "data": "/data/corpus.txt"},
            model=model.state_dict(),
            vocab=list(DEFAULT_VOCAB),
            step=step,
            val_loss=val_loss,
            best_val_loss=val_loss,
            corpus={"sha256": SHA, "chars": 4321, "sources": ["corpus.txt"]},
        ),
    )
    return path


def props(path: Path) -> dict[str, str]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.get_modelmeta().custom_metadata_map


def run_script(*args) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"{SCRIPT} missing: install the package (pip install -e '.[export]')"
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_console_script_publishes_the_next_version_each_time(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run / "best.pt", step=40, val_loss=2.5)
    repo = tmp_path / "models"
    first = run_script(run, "--name", "tiny", "--repo", repo)
    assert first.returncode == 0, first.stderr
    path = repo / "tiny" / "1" / mf.MODEL_FILE
    assert path.is_file()
    assert f"{path} ({path.stat().st_size} bytes)" in first.stdout
    assert "max|d logits|=" in first.stdout and "lstm layers=2 hidden=16" in first.stdout
    meta = mf.ModelMetadata.from_props(props(path))
    assert (meta.train_steps, meta.val_loss, meta.corpus_sha256, meta.corpus_chars) == (40, 2.5, SHA, 4321)
    assert meta.train_config == {"lr": 0.002, "steps": 40, "data": "/data/corpus.txt"}
    second = run_script(run / "best.pt", "--name", "tiny", "--repo", repo)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "2"]


def test_a_run_folder_means_its_best_checkpoint_else_its_last(tmp_path, capsys):
    run = tmp_path / "run"
    write_checkpoint(run / "last.pt", step=90, val_loss=1.9)
    assert main([str(run), "--name", "m", "--repo", str(tmp_path / "models")]) == 0
    assert props(tmp_path / "models/m/1/model.onnx")[mf.KEY_TRAIN_STEPS] == "90"
    write_checkpoint(run / "best.pt", step=60, val_loss=1.7)
    assert main([str(run), "--name", "m", "--repo", str(tmp_path / "models")]) == 0
    assert props(tmp_path / "models/m/2/model.onnx")[mf.KEY_TRAIN_STEPS] == "60"
    assert f"checkpoint  {run / 'best.pt'}" in capsys.readouterr().out


def test_an_explicit_version_and_the_next_default_after_it(tmp_path):
    ck = write_checkpoint(tmp_path / "ck.pt", cell="gru")
    repo = tmp_path / "models"
    assert main([str(ck), "--name", "g", "--repo", str(repo), "--version", "5"]) == 0
    assert main([str(ck), "--name", "g", "--repo", str(repo)]) == 0
    assert sorted(p.name for p in (repo / "g").iterdir()) == ["5", "6"]


def test_an_existing_version_is_refused_unless_forced(tmp_path, capsys):
    repo = tmp_path / "models"
    assert main([str(write_checkpoint(tmp_path / "a.pt", seed=1)), "--name", "m", "--repo", str(repo)]) == 0
    before = (repo / "m/1/model.onnx").read_bytes()
    other = write_checkpoint(tmp_path / "b.pt", seed=2)
    assert main([str(other), "--name", "m", "--repo", str(repo), "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{repo / 'm' / '1'} already exists" in err and "--force" in err and "publish 2" in err
    assert (repo / "m/1/model.onnx").read_bytes() == before
    assert main([str(other), "--name", "m", "--repo", str(repo), "--version", "1", "--force"]) == 0
    assert (repo / "m/1/model.onnx").read_bytes() != before
    assert sorted(p.name for p in (repo / "m/1").iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "", "x" * 129, "with space", "tiny@2"])
def test_a_bad_model_name_is_refused(tmp_path, capsys, name):
    ck = write_checkpoint(tmp_path / "ck.pt")
    assert main([str(ck), "--name", name, "--repo", str(tmp_path / "models")]) == 2
    rule = "model name must be 1 to 128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
    assert f"{rule}, got {name!r}" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_a_corrupt_checkpoint_is_refused_naming_its_path(tmp_path):
    bad = tmp_path / "run" / "best.pt"
    bad.parent.mkdir()
    good = write_checkpoint(tmp_path / "good.pt")
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a write cut short
    done = run_script(bad.parent, "--name", "m", "--repo", tmp_path / "models")
    assert done.returncode == 2
    assert done.stderr.startswith(f"charrnn-export: {bad}: cannot be read as a checkpoint")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"weights": [1, 2]}, r"not a charrnn checkpoint \(no format='charrnn-checkpoint'\)"),
        ({"format": "charrnn-checkpoint", "format_version": 1}, r"checkpoint is missing model_config, model, vocab"),
    ],
)
def test_a_file_that_is_not_a_charrnn_checkpoint_is_refused(tmp_path, capsys, payload, message):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    assert main([str(path), "--name", "m", "--repo", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"charrnn-export: {path}: ")
    assert re.search(message, err)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "ck.pt")
    ck = torch.load(path, weights_only=False)
    ck["model_config"]["hidden"] = 32  # the state_dict is still 16 wide
    torch.save(ck, path)
    assert main([str(path), "--name", "m", "--repo", str(tmp_path / "models")]) == 2
    assert f"charrnn-export: {path}: model weights do not fit model_config" in capsys.readouterr().err


def test_a_missing_checkpoint_is_refused_naming_its_path(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--name", "m", "--repo", str(tmp_path / "models")]) == 2
    assert f"{tmp_path / 'nope'}: no such checkpoint file or run folder" in capsys.readouterr().err


def test_a_parity_failure_exits_nonzero_and_publishes_nothing(tmp_path, capsys):
    # Two float32 runtimes round differently, so at tolerance 0 this real model fails the check
    # (test_export pins that the difference is nonzero but far below the default tolerance).
    ck = write_checkpoint(tmp_path / "ck.pt", layers=2, hidden=32, seed=5)
    repo = tmp_path / "models"
    assert main([str(ck), "--name", "m", "--repo", str(repo), "--tolerance", "0"]) == 1
    err = capsys.readouterr().err
    assert f"nothing published under {repo / 'm'}: ONNX and PyTorch disagree beyond tolerance 0" in err
    assert not (repo / "m").exists()  # no version, no staging folder, no empty name folder


def test_a_negative_tolerance_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "ck.pt"), "--name", "m", "--tolerance", "-1"])
    assert e.value.code == 2
    assert "--tolerance must be >= 0, got -1.0" in capsys.readouterr().err


def test_published_versions_are_readable_by_other_users(tmp_path):
    # A training Job writes the repository; serving pods, maybe as another user, read it.
    write_checkpoint(tmp_path / "ck.pt")
    old = os.umask(0o022)
    try:
        assert main([str(tmp_path / "ck.pt"), "--name", "m", "--repo", str(tmp_path / "models")]) == 0
        assert main([str(tmp_path / "ck.pt"), "--name", "m", "--repo", str(tmp_path / "models"),
                     "--version", "1", "--force"]) == 0
    finally:
        os.umask(old)
    version = tmp_path / "models" / "m" / "1"
    assert stat.S_IMODE(version.stat().st_mode) == 0o755
    assert stat.S_IMODE((version / mf.MODEL_FILE).stat().st_mode) == 0o644
