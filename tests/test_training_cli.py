"""charrnn-train end to end on tiny corpora: the run folder, bad inputs, settings, repeatability."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from charrnn.training.checkpoint import load_checkpoint
from charrnn.training.cli import build_parser, config_from_args, main
from charrnn.training.config import MODEL_FIELDS, ConfigError, TrainConfig
from charrnn.training.model import CharRNN, ModelConfig
from charrnn.training.optim import lr_at
from charrnn.training.presets import PRESETS

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away from home".split()
TINY = ["--preset", "tiny", "--sample-chars", "20", "--threads", "1", "--device", "cpu"]


def make_corpus(path, words=3000, seed=0):
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return path


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def test_run_folder_holds_checkpoints_metrics_curves_and_samples(tmp_path):
    data = make_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(run), *TINY, "--max-steps", "40", "--eval-interval", "20"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [20, 40]
    for m in metrics:
        assert {"step", "train_loss", "val_loss", "lr", "chars_per_sec", "elapsed"} <= m.keys()
        assert m["chars_per_sec"] > 0
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] < 3.5  # it learns (uniform over 26 chars is 3.26+)
    assert len(losses(run)) == 40
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (run / "samples.txt").read_text()
    assert samples.count("=== step") == 2 and samples.count("--- temperature 0.5") == 2
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert last["step"] == 40 and best["val_loss"] == min(m["val_loss"] for m in metrics)
    assert best["corpus"]["chars"] == len(data.read_text()) and len(best["corpus"]["sha256"]) == 64
    model = CharRNN(ModelConfig(**best["model_config"]))
    model.load_state_dict(best["model"])  # what the exporter does
    assert best["vocab"] == sorted(set(data.read_text()))


def test_a_run_file_that_cannot_be_written_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    # A full disk or a read-only folder can meet the curves or sample files before any checkpoint.
    data = make_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    (run / "curves.png").mkdir(parents=True)  # writing the picture fails with an OSError
    code = main(["--data", str(data), "--out", str(run), *TINY, "--max-steps", "20", "--eval-interval", "20"])
    assert code == 2
    err = capsys.readouterr().err
    assert "charrnn-train: error:" in err and "curves.png" in err and "--resume" in err
    assert "Traceback" not in err


def test_unicode_corpus_trains_and_its_vocabulary_round_trips(tmp_path):
    rng = random.Random(1)
    pieces = ["Привет", "мир", "你好", "世界", "🙂", "🚀", "e\u0301", "café", "naïve", "𝄞", "the", "fox"]
    text = " ".join(rng.choice(pieces) for _ in range(1500))
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["--data", str(tmp_path / "u.txt"), "--out", str(run), *TINY, "--max-steps", "20", "--eval-interval", "20"]) == 0
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["vocab"] == sorted(set(text))  # code points, not bytes: one entry per character
    assert all(len(ch) == 1 for ch in ckpt["vocab"]) and "\u0301" in ckpt["vocab"] and "🚀" in ckpt["vocab"]
    model = CharRNN(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert model.config.vocab_size == len(ckpt["vocab"])
    sampled = (run / "samples.txt").read_text(encoding="utf-8").split("--- temperature 1.0\n")[1]
    assert set(sampled.strip()) <= set(ckpt["vocab"])


def test_same_seed_repeats_exactly_on_cpu(tmp_path):
    data = make_corpus(tmp_path / "c.txt")
    args = ["--data", str(data), *TINY, "--max-steps", "15", "--eval-interval", "15", "--dropout", "0.0", "--sample-chars", "0"]
    assert main([*args, "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--seed", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "4"]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")
    wa, wb = load_checkpoint(tmp_path / "a" / "last.pt")["model"], load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_empty_training_file_is_a_clear_error_before_training(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "charrnn.training.cli", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "run"), "--preset", "tiny"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 2
    assert "empty.txt: the corpus is empty" in proc.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_corpus_too_short_for_one_batch_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("To be, or not to be: that is the question.")
    rc = main(["--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "run"), *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "training split has" in err and "--batch-size 4 x --seq-len 16 needs at least 65" in err
    assert not (tmp_path / "run" / "steps.jsonl").exists()


def test_flags_override_the_preset():
    args = build_parser().parse_args(["--data", "d", "--out", "o", "--preset", "shakespeare", "--hidden", "64", "--no-tie-weights"])
    cfg = config_from_args(args)
    assert cfg.model.hidden == 64 and cfg.model.tie_weights is False and cfg.preset == "shakespeare"
    assert cfg.model.layers == PRESETS["shakespeare"]["layers"] and cfg.model.dropout == PRESETS["shakespeare"]["dropout"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_configuration(name):
    cfg = config_from_args(build_parser().parse_args(["--data", "d", "--out", "o", "--preset", name]))
    assert cfg.preset == name
    model = ModelConfig(**{k: v for k, v in PRESETS[name].items() if k in MODEL_FIELDS})  # embed_dim 0 resolved
    for field, value in PRESETS[name].items():
        assert (getattr(cfg.model, field) == getattr(model, field)) if field in MODEL_FIELDS else getattr(cfg, field) == value, field


@pytest.mark.parametrize("settings,message", [
    ({"cell": "transformer"}, "--cell must be one of lstm, gru, rnn, got 'transformer'"),
    ({"batch_size": 0}, "--batch-size must be an integer >= 1, got 0"),
    ({"dropout": 1.0}, r"--dropout must be in \[0, 1\), got 1.0"),
    ({"lr": float("nan")}, "--lr must be a finite number > 0, got nan"),
    ({"max_time": -1.0}, "--max-time must be a finite number >= 0, got -1.0"),
    ({"device": "tpu"}, "--device must be one of auto, cpu, cuda, got 'tpu'"),
    ({"patience": -2}, "--patience must be an integer >= 0, got -2"),
    ({"tie_weights": True, "embed_dim": 64}, r"--embed-dim must be 0 or equal to --hidden \(256\) with --tie-weights, got 64"),
    ({"weight_drop": 1.0}, r"--weight-drop must be in \[0, 1\), got 1.0"),
    ({"weight_drop": -0.1}, r"--weight-drop must be in \[0, 1\), got -0.1"),
    ({"locked_dropout_input": 1.5}, r"--locked-dropout-input must be in \[0, 1\), got 1.5"),
    ({"locked_dropout_between": -0.5}, r"--locked-dropout-between must be in \[0, 1\), got -0.5"),
    ({"locked_dropout_output": 1.0}, r"--locked-dropout-output must be in \[0, 1\), got 1.0"),
    ({"locked_dropout_output": 0.3, "dropout": 0.2}, r"--dropout must be 0 when a --locked-dropout-\* rate is set .*got 0.2"),
    ({"locked_dropout_input": 0.1, "embed_dropout": 0.1}, r"--embed-dropout must be 0 when a --locked-dropout-\* rate .*got 0.1"),
    ({"locked_dropout_between": 0.2, "layers": 1}, r"--locked-dropout-between must be 0 with --layers 1 .*got 0.2"),
    ({"ema_decay": 1.0}, r"--ema-decay must be in \[0, 1\) \(0: no average\), got 1.0"),
    ({"ema_decay": -0.9}, r"--ema-decay must be in \[0, 1\) \(0: no average\), got -0.9"),
    ({"seq_len_sd": -1.0}, "--seq-len-sd must be a finite number >= 0, got -1.0"),
    ({"seq_len_sd": float("inf")}, "--seq-len-sd must be a finite number >= 0, got inf"),
    ({"seq_len_half_prob": 1.5}, r"--seq-len-half-prob must be in \[0, 1\], got 1.5"),
])
def test_bad_settings_name_the_flag_the_value_and_the_rule(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_flat(data="d", out="o", max_steps=10, **settings)


def test_a_bad_setting_on_the_command_line_exits_2_with_the_rule(tmp_path, capsys):
    data = make_corpus(tmp_path / "c.txt")
    assert main(["--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--weight-drop", "1.5"]) == 2
    assert "charrnn-train: error: --weight-drop must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_cosine_schedule_needs_a_budget():
    with pytest.raises(ConfigError, match="--max-steps must be set"):
        TrainConfig(data="d", out="o", lr_schedule="cosine", max_steps=0, max_time=0)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(data="d", out="o", lr=1.0, warmup=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0) == pytest.approx(1 / 11)
    assert lr_at(cfg, 10, 0) == pytest.approx(1.0)
    assert lr_at(cfg, 60, 0) == pytest.approx(0.55)
    assert lr_at(cfg, 110, 0) == pytest.approx(0.1)
    timed = TrainConfig(data="d", out="o", lr=1.0, warmup=0, max_steps=0, max_time=100.0)
    assert lr_at(timed, 5, 50.0) == pytest.approx(0.55)


def test_docs_flag_table_lists_every_flag_of_the_parser():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    table = text.split("## Flags", 1)[1].split("\n## ", 1)[0]
    documented = {flag for row in table.splitlines() if row.startswith("| `--")
                  for flag in re.findall(r"`(--[a-z-]+)", row.split(" | ")[0])}
    parser_flags = {s for a in build_parser()._actions for s in a.option_strings} - {"-h", "--help"}
    assert documented == parser_flags
