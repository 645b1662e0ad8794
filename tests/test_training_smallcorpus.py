"""A corpus of a few KB is memorised within a few epochs: a time budget stops once validation stops improving."""

from __future__ import annotations

import json
import random

import pytest

from charrnn.training.checkpoint import load_checkpoint
from charrnn.training.cli import build_parser, config_from_args
from charrnn.training.config import TIME_BUDGET_PATIENCE, TrainConfig
from charrnn.training.loop import run_training

SYLLABLES = "ma ri an el jo sa li na ka th er on ly be de ro is ta mi ch".split()
# A 1x128 LSTM on 1.2 KB: validation is best after about 4 epochs (40 steps), then rises at every evaluation.
# --max-time is far above what the run needs: it only sets the default patience.
RUN = ["--preset", "tiny", "--hidden", "128", "--embed-dim", "16", "--batch-size", "8", "--seq-len", "16",
       "--lr", "1e-2", "--eval-interval", "10", "--max-steps", "150", "--max-time", "600",
       "--sample-chars", "0", "--threads", "1", "--device", "cpu"]


def make_names(path, lines=200, seed=0):
    """Names-like lines ("Mariel", "Jothon"), one per line, as in the baby-names demo but 30x shorter."""
    rng = random.Random(seed)
    path.write_text("".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() + "\n"
                            for _ in range(lines)))
    return path


def train(tmp_path, *flags):
    data = make_names(tmp_path / "names.txt")
    cfg = config_from_args(build_parser().parse_args(["--data", str(data), "--out", str(tmp_path / "run"), *RUN, *flags]))
    return cfg, run_training(cfg)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_time_budget_stops_by_patience_once_validation_stops_improving(tmp_path, capsys):
    cfg, result = train(tmp_path)
    assert cfg.patience == TIME_BUDGET_PATIENCE  # not given: on, because --max-time is set
    evals = metrics(tmp_path / "run")
    assert result.stopped_by == "patience" and result.step < 150
    assert evals[-1]["stopped_by"] == "patience" and "stopped_by" not in evals[-2]
    best = min(evals, key=lambda m: m["val_loss"])
    assert evals[-TIME_BUDGET_PATIENCE - 1] is best  # it stopped at the fifth evaluation past the minimum, not later
    assert result.best_val_loss == best["val_loss"] < evals[-1]["val_loss"]
    kept = load_checkpoint(tmp_path / "run" / "best.pt")
    assert (kept["step"], kept["val_loss"]) == (best["step"], best["val_loss"])  # what charrnn-export reads
    assert "stopping: 5 evaluations without a better validation loss" in capsys.readouterr().out

    # The same command again (as after a kill, or to "finish" the run) has nothing left to do.
    steps = (tmp_path / "run" / "steps.jsonl").read_text()
    _, again = train(tmp_path, "--resume")
    assert (again.stopped_by, again.step) == ("patience", result.step)
    assert (tmp_path / "run" / "steps.jsonl").read_text() == steps
    assert "nothing to do" in capsys.readouterr().out


def test_patience_0_given_explicitly_trains_to_the_budget_past_the_minimum(tmp_path):
    cfg, result = train(tmp_path, "--patience", "0")
    assert cfg.patience == 0
    evals = metrics(tmp_path / "run")
    assert (result.stopped_by, result.step) == ("max_steps", 150) and evals[-1]["stopped_by"] == "max_steps"
    best_at = min(range(len(evals)), key=lambda i: evals[i]["val_loss"])
    assert len(evals) - 1 - best_at > TIME_BUDGET_PATIENCE  # patience would have stopped it
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step"] == evals[best_at]["step"]


@pytest.mark.parametrize(("settings", "patience"), [
    ({"max_steps": 100}, 0),  # a step budget is a plan: the cosine ends at its last step
    ({"max_steps": 0, "max_time": 120.0}, TIME_BUDGET_PATIENCE),
    ({"max_steps": 100, "max_time": 120.0}, TIME_BUDGET_PATIENCE),
    ({"max_steps": 0, "max_time": 120.0, "patience": 0}, 0),
    ({"max_steps": 0, "max_time": 120.0, "patience": 2}, 2),
    ({"max_steps": 100, "patience": 3}, 3),
])
def test_patience_left_unset_is_on_with_a_time_budget_only(settings, patience):
    assert TrainConfig(data="d", out="o", **settings).patience == patience
