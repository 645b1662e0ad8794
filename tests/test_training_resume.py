"""Resuming a killed run, early stopping, and stopping on a diverged loss."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import torch

from charrnn.training.checkpoint import load_checkpoint
from charrnn.training.cli import main
from tests.test_training_cli import TINY, losses, make_corpus
from tests.test_training_regularisation import EVERY_OPTION

# Dropout on, several epochs (the corpus is short), evaluation every 5 steps.
RUN = [*TINY, "--dropout", "0.3", "--embed-dropout", "0.1", "--eval-interval", "5", "--max-steps", "60"]


def metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def kill_and_resume(tmp_path, run: list[str]) -> tuple:
    """The run uninterrupted in WHOLE, and in CUT killed after its third evaluation and resumed."""
    data = make_corpus(tmp_path / "c.txt", words=400)  # about 30 batches per epoch: the run crosses epochs
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["--data", str(data), "--out", str(whole), *run]) == 0
    cmd = [sys.executable, "-m", "charrnn.training.cli", "--data", str(data), "--out", str(cut), *run]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while len(metrics(cut)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: wherever it was, it stops
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(cut / "last.pt")["step"]
    assert 5 <= killed_at < 60
    assert main(["--data", str(data), "--out", str(cut), *run, "--resume"]) == 0
    return whole, cut


def test_run_killed_at_any_moment_resumes_to_the_same_losses(tmp_path):
    whole, cut = kill_and_resume(tmp_path, RUN)
    assert losses(cut) == losses(whole)  # exact: the same floats, step for step
    assert [m["step"] for m in metrics(cut)] == list(range(5, 65, 5))
    assert [m["val_loss"] for m in metrics(cut)] == [m["val_loss"] for m in metrics(whole)]
    assert load_checkpoint(cut / "last.pt")["step"] == 60


# Every option for a better model at once: weight-drop, locked dropout, the moving average, varied windows.
RUN_EVERY_OPTION = [*TINY, *EVERY_OPTION, "--eval-interval", "5", "--max-steps", "60"]


def test_a_run_with_every_option_killed_at_any_moment_resumes_exactly(tmp_path):
    whole, cut = kill_and_resume(tmp_path, RUN_EVERY_OPTION)
    steps = [(json.loads(line)["loss"], json.loads(line)["seq_len"]) for line in (cut / "steps.jsonl").read_text().splitlines()]
    assert steps == [(json.loads(line)["loss"], json.loads(line)["seq_len"]) for line in (whole / "steps.jsonl").read_text().splitlines()]
    assert len({length for _, length in steps}) > 3  # the windows did vary
    for key in ("val_loss", "ema_val_loss", "epoch"):
        assert [m[key] for m in metrics(cut)] == [m[key] for m in metrics(whole)], key
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(cut / "last.pt")
    for weights in ("model", "ema"):
        assert a[weights].keys() == b[weights].keys() and all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights])


def test_resume_without_a_checkpoint_starts_fresh_and_resuming_a_finished_run_stops_at_once(tmp_path):
    data = make_corpus(tmp_path / "c.txt", words=400)
    run = ["--data", str(data), "--out", str(tmp_path / "r"), *RUN, "--max-steps", "10"]
    assert main([*run, "--resume"]) == 0
    first = losses(tmp_path / "r")
    assert len(first) == 10
    assert main([*run, "--resume", "--max-steps", "20"]) == 0  # a longer budget continues the same run
    assert losses(tmp_path / "r")[:10] == first and len(losses(tmp_path / "r")) == 20
    assert main([*run, "--resume", "--max-steps", "20"]) == 0
    assert len(losses(tmp_path / "r")) == 20 and load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 20


def test_resume_with_another_model_shape_is_refused(tmp_path, capsys):
    data = make_corpus(tmp_path / "c.txt", words=400)
    base = ["--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--max-steps", "5", "--eval-interval", "5"]
    assert main(base) == 0
    assert main([*base, "--hidden", "48", "--resume"]) == 2
    assert "--hidden must be 32 as in the checkpoint being resumed" in capsys.readouterr().err


def test_patience_stops_after_evaluations_without_improvement(tmp_path):
    data = make_corpus(tmp_path / "c.txt", words=400)
    # A learning rate too small to move any float32 weight: the validation loss never improves.
    rc = main(["--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--lr", "1e-12", "--eval-interval", "2",
               "--patience", "3", "--max-steps", "100", "--sample-chars", "0"])
    assert rc == 0
    assert [m["step"] for m in metrics(tmp_path / "r")] == [2, 4, 6, 8]
    assert load_checkpoint(tmp_path / "r" / "best.pt")["step"] == 2


def test_diverging_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    data = make_corpus(tmp_path / "c.txt", words=400)
    base = ["--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--eval-interval", "10", "--sample-chars", "0"]
    assert main([*base, "--max-steps", "10"]) == 0
    good = load_checkpoint(tmp_path / "r" / "last.pt")
    rc = main([*base, "--max-steps", "200", "--resume", "--lr", "1e4", "--grad-clip", "0"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "try a smaller --lr" in err
    after = load_checkpoint(tmp_path / "r" / "last.pt")
    assert after["step"] == 10 and after["val_loss"] == good["val_loss"]
    assert math.isfinite(after["val_loss"])


def test_logs_are_cut_back_to_the_checkpoint_step(tmp_path):
    from charrnn.training.runlog import RunLog

    log = RunLog(tmp_path)
    log.add_steps([{"step": s, "loss": 1.0, "lr": 0.1} for s in range(1, 13)])
    for step in (5, 10):
        log.add_metrics({"step": step, "train_loss": 1.0, "val_loss": 1.0, "lr": 0.1, "chars_per_sec": 1.0, "elapsed": 1.0})
        log.add_samples(step, 1.0, [(0.5, f"text at {step}"), (1.0, "more")])
    with open(log.steps, "a") as f:
        f.write('{"step": 13, "lo')  # a line cut short by a kill
    log.restart_at(5)
    assert [r["step"] for r in log.read("steps")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in log.read("metrics")] == [5]
    text = log.samples.read_text()
    assert "text at 5" in text and "text at 10" not in text and text.count("=== step") == 1


def as_an_earlier_version_wrote_it(path):
    """Rewrites a last.pt of fixed windows the way charrnn wrote it before the options of issue 16 and the
    nested settings: train_config flat, each rank's place a window index, no average, no window draws."""
    ckpt = torch.load(path, weights_only=False)
    train = dict(ckpt["train_config"])
    model = train.pop("model")
    for name in ("vocab_size", "weight_drop", "locked_dropout_input", "locked_dropout_between", "locked_dropout_output"):
        model.pop(name)
        ckpt["model_config"].pop(name, None)
    for name in ("ema_decay", "epoch_offset", "seq_len_sd", "seq_len_half_prob"):
        train.pop(name)
    ckpt["train_config"] = {**train, **model}
    for rank in ckpt["resume"]["ranks"]:
        rank["position"] = rank.pop("cursor") // train["seq_len"]
    del ckpt["resume"]["windows"], ckpt["ema"], ckpt["weights"]
    torch.save(ckpt, path)


def test_a_checkpoint_of_an_earlier_version_resumes_to_the_same_losses(tmp_path):
    data = make_corpus(tmp_path / "c.txt", words=400)
    run = ["--data", str(data), *RUN, "--max-steps", "20"]
    assert main([*run, "--out", str(tmp_path / "whole")]) == 0
    assert main([*run, "--out", str(tmp_path / "old"), "--max-steps", "10"]) == 0
    as_an_earlier_version_wrote_it(tmp_path / "old" / "last.pt")
    assert main([*run, "--out", str(tmp_path / "old"), "--resume"]) == 0
    assert losses(tmp_path / "old") == losses(tmp_path / "whole")
    whole, old = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("whole", "old"))
    assert all(torch.equal(whole[k], old[k]) for k in whole)
