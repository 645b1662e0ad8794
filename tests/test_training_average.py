"""--ema-decay: a moving average of the weights, evaluated beside them; the better of the two is best.pt."""

from __future__ import annotations

import json

import pytest
import torch

from charrnn.training.batches import val_lanes
from charrnn.training.checkpoint import load_checkpoint
from charrnn.training.cli import main
from charrnn.training.corpus import prepare_corpus
from charrnn.training.loop import evaluate
from charrnn.training.model import CharRNN, ModelConfig
from charrnn.training.runtime import Runtime
from tests.test_training_cli import TINY, make_corpus

# A learning rate high enough that the weights jitter around their plateau: there the average wins. fp32, so
# that the losses the run records are the ones val_loss_of measures again on a CPU with bf16 units too.
NOISY = [*TINY, "--lr", "0.1", "--ema-decay", "0.9", "--eval-interval", "5", "--max-steps", "40", "--sample-chars", "0",
         "--precision", "fp32"]


def val_loss_of(ckpt: dict, data, run_dir) -> float:
    """The validation loss of the weights a checkpoint holds, measured afresh."""
    model = CharRNN(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    corpus = prepare_corpus(str(data), run_dir)
    return evaluate(model, val_lanes(corpus.val, ckpt["train_config"]["seq_len"]), 0, Runtime(torch.device("cpu"), 0, 1))


def test_both_weights_are_evaluated_and_best_pt_keeps_the_better(tmp_path):
    data = make_corpus(tmp_path / "c.txt", words=400)
    run = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(run), *NOISY]) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_val_loss" in r for r in evals) and len(evals) == 8
    early, late = evals[0], evals[-1]
    assert early["val_loss"] < early["ema_val_loss"]  # the average lags while the loss falls fast ...
    assert late["ema_val_loss"] < late["val_loss"]  # ... and is smoother once it has flattened
    best_loss, best_step, kind = min(
        (min(r["val_loss"], r["ema_val_loss"]), r["step"], "ema" if r["ema_val_loss"] < r["val_loss"] else "raw") for r in evals
    )
    best = load_checkpoint(run / "best.pt")
    assert (best["val_loss"], best["step"], best["weights"]) == (best_loss, best_step, kind) and kind == "ema"
    assert best["val_loss"] == pytest.approx(val_loss_of(best, data, tmp_path / "again"), abs=1e-6)
    last = load_checkpoint(run / "last.pt")
    assert last["weights"] == "raw" and last["val_loss"] == late["val_loss"]  # last.pt resumes the training weights
    assert last["val_loss"] == pytest.approx(val_loss_of(last, data, tmp_path / "again"), abs=1e-6)
    assert last["ema"]["n_averaged"] == 40  # one update per step


def test_resuming_with_another_ema_decay_is_refused(tmp_path, capsys):
    data = make_corpus(tmp_path / "c.txt", words=400)
    base = ["--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--max-steps", "5", "--eval-interval", "5"]
    assert main(base) == 0
    assert main([*base, "--ema-decay", "0.99", "--max-steps", "10", "--resume"]) == 2
    assert "--ema-decay must be 0.0 as in the checkpoint being resumed" in capsys.readouterr().err
