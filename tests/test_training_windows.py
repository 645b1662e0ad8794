"""Varied training windows: a random offset per epoch and AWD-LSTM's window lengths, with the learning rate to match."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from charrnn.training.batches import Lanes, Windows, train_lanes
from charrnn.training.cli import main
from charrnn.training.corpus import CorpusError
from tests.test_training_cli import TINY, make_corpus


def test_fixed_windows_draw_nothing():
    w = Windows(128, seed=1)
    before = w.state()
    assert [w.next_length() for _ in range(5)] == [128] * 5 and w.epoch_start() == 0
    assert w.state() == before and w.reach == 128


def test_varied_lengths_centre_on_seq_len_with_a_share_around_half_of_it():
    w = Windows(128, sd=8.0, half_prob=0.2, seed=1)
    lengths = [w.next_length() for _ in range(5000)]
    short = [n for n in lengths if n < 96]  # more than 4 sd below 128: drawn around 64
    assert 0.17 < len(short) / len(lengths) < 0.23
    assert statistics.mean(short) == pytest.approx(64, abs=1)
    assert statistics.mean(n for n in lengths if n >= 96) == pytest.approx(128, abs=1)
    assert statistics.stdev(n for n in lengths if n >= 96) == pytest.approx(8, abs=0.5)
    wide = Windows(16, sd=40.0, seed=1)
    assert {min(wide.next_length() for _ in range(2000)), max(wide.next_length() for _ in range(2000))} == {5, 32}


def test_epoch_offsets_fall_anywhere_below_seq_len():
    w = Windows(16, epoch_offset=True, seed=2)
    offsets = {w.epoch_start() for _ in range(500)}
    assert offsets == set(range(16)) and w.reach == 15 + 16


def test_the_draws_repeat_from_a_saved_state():
    w = Windows(64, epoch_offset=True, sd=5.0, half_prob=0.1, seed=3)
    w.next_length()
    saved = w.state()
    ahead = [(w.epoch_start(), w.next_length()) for _ in range(20)]
    again = Windows(64, epoch_offset=True, sd=5.0, half_prob=0.1, seed=99)
    again.set_state(saved)
    assert [(again.epoch_start(), again.next_length()) for _ in range(20)] == ahead


def test_windows_of_varied_length_tile_each_lane_without_gap_or_overlap():
    tokens = np.arange(1001) % 256  # token i is i: a window shows where it lies
    lanes = Lanes(tokens.astype(np.uint8), seq_len=10, count=4)
    cursor, seen = 3, []
    for length in [10, 4, 17, 9, 12]:
        assert lanes.fits(cursor, length)
        x, y = lanes.read(cursor, length)
        assert x.shape == y.shape == (4, length) and (y[:, :-1] == x[:, 1:]).all()
        seen.append(x[0])
        cursor += length
    assert np.concatenate(seen).tolist() == list(range(3, cursor))
    assert not lanes.fits(lanes.lane_len - 5, 6) and lanes.fits(lanes.lane_len - 5, 5)


def test_a_corpus_too_short_for_the_longest_varied_window_is_a_clear_error():
    train_lanes(np.zeros(65, np.uint8), 4, 16)  # fixed windows of 16 fit
    with pytest.raises(CorpusError, match=r"x --seq-len 16 \(varied: up to 47 characters into a lane\) needs at least 189"):
        train_lanes(np.zeros(65, np.uint8), 4, 16, reach=Windows(16, epoch_offset=True, sd=2.0, seed=0).reach)


def test_each_step_trains_on_its_drawn_length_at_a_learning_rate_scaled_to_it(tmp_path):
    data = make_corpus(tmp_path / "c.txt", words=400)
    run = tmp_path / "run"
    args = [*TINY, "--seq-len-sd", "3", "--seq-len-half-prob", "0.2", "--epoch-offset", "--max-steps", "30"]
    assert main(["--data", str(data), "--out", str(run), *args]) == 0
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    lengths = [s["seq_len"] for s in steps]
    assert len(set(lengths)) > 5 and min(lengths) >= 5 and max(lengths) <= 32
    for s in steps:  # the tiny preset's learning rate is a constant 1e-2
        assert s["lr"] == pytest.approx(1e-2 * s["seq_len"] / 16)
