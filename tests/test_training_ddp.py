"""Data-parallel training under torchrun: two CPU processes (gloo) stay in step on different lanes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from charrnn.training.checkpoint import load_checkpoint
from tests.test_training_cli import make_corpus
from tests.test_training_regularisation import EVERY_OPTION


@pytest.mark.parametrize("options", [[], EVERY_OPTION], ids=["plain", "every-option"])
def test_two_ranks_train_their_own_lanes_and_end_with_identical_weights(tmp_path, options):
    # With varied windows the ranks must draw the same lengths (one learning rate), or their weights part.
    data = make_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "charrnn.training.cli", "--data", str(data), "--out", str(run), "--preset", "tiny",
           "--device", "cpu", "--max-steps", "12", "--eval-interval", "6", "--sample-chars", "0", *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(run / "last.pt")
    ranks = ckpt["resume"]["ranks"]
    assert ckpt["step"] == 12 and len(ranks) == 2
    # Each rank's digest of its own weights, taken at the checkpoint: the replicas are equal.
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # ...though they read different text: the states they carry into the next window differ.
    assert not torch.equal(ranks[0]["carried"][0], ranks[1]["carried"][0])
    # Rank 0 alone writes the logs.
    assert [line.count('"step"') for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 1]
