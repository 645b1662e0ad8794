"""Vectorised sampling: each row depends on its own logits, parameters and draw only."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.service import sampling


def draws(seed: int, n: int) -> np.ndarray:
    return sampling.uniforms(sampling.seed_array([seed] * n), np.arange(n))


def test_uniforms_are_the_splitmix64_sequence_of_each_seed():
    # SplitMix64 reference values for seed 0 (first three outputs), scaled to [0, 1) by the top 53 bits.
    want = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    got = sampling.uniforms(sampling.seed_array([0, 0, 0]), np.arange(3))
    assert got.tolist() == [(w >> 11) / 2**53 for w in want]


def test_a_draw_depends_only_on_its_seed_and_position():
    seeds = sampling.seed_array([5, 2**64 - 1, 2**70 + 3, 5])
    batch = sampling.uniforms(seeds, np.array([0, 3, 9, 7]))
    alone = [sampling.uniforms(seeds[i : i + 1], np.array([c]))[0] for i, c in enumerate([0, 3, 9, 7])]
    assert batch.tolist() == alone
    assert np.all((batch >= 0) & (batch < 1))


def test_uniforms_look_uniform():
    u = draws(123, 100_000)
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 10_000) < 500)  # about 5 standard deviations


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).normal(size=(64, 30)).astype(np.float32)
    n = len(logits)
    got = sampling.sample(logits, np.zeros(n), np.zeros(n, int), np.ones(n), draws(1, n))
    assert got.tolist() == logits.argmax(axis=1).tolist()


def test_top_k_1_is_argmax_at_any_temperature():
    logits = np.random.default_rng(1).normal(size=(64, 30)).astype(np.float32)
    n = len(logits)
    got = sampling.sample(logits, np.full(n, 3.0), np.ones(n, int), np.ones(n), draws(2, n))
    assert got.tolist() == logits.argmax(axis=1).tolist()


PROBS = np.array([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    "top_k, top_p, want",
    [
        (0, 1.0, [0.4, 0.3, 0.2, 0.1]),  # plain softmax
        (2, 1.0, [4 / 7, 3 / 7, 0, 0]),  # two most likely, renormalised
        (0, 0.65, [4 / 7, 3 / 7, 0, 0]),  # 0.4 < 0.65, 0.4 + 0.3 reaches it
        (0, 0.3, [1, 0, 0, 0]),  # the most likely is always kept
        (3, 0.8, [4 / 9, 3 / 9, 2 / 9, 0]),  # top-k first (renormalised), then top-p: 4/9 + 3/9 < 0.8
        (3, 0.75, [4 / 7, 3 / 7, 0, 0]),  # ... and 4/9 + 3/9 >= 0.75 drops the third
    ],
)
def test_sampled_frequencies_follow_the_filtered_distribution(top_k, top_p, want):
    n = 200_000
    logits = np.tile(np.log(PROBS).astype(np.float32), (n, 1))
    got = sampling.sample(logits, np.ones(n), np.full(n, top_k), np.full(n, top_p), draws(9, n))
    freq = np.bincount(got, minlength=4) / n
    assert np.allclose(freq, want, atol=0.005)


def test_temperature_sharpens_and_flattens():
    n = 100_000
    logits = np.tile(np.log(PROBS).astype(np.float32), (n, 1))
    for t in (0.5, 2.0):
        got = sampling.sample(logits, np.full(n, t), np.zeros(n, int), np.ones(n), draws(4, n))
        want = PROBS ** (1 / t) / (PROBS ** (1 / t)).sum()
        assert np.allclose(np.bincount(got, minlength=4) / n, want, atol=0.006)


def test_each_row_is_sampled_the_same_whatever_the_other_rows_ask():
    rng = np.random.default_rng(3)
    n = 200
    logits = rng.normal(size=(n, 65)).astype(np.float32)
    temperature = rng.choice([0.0, 0.7, 1.0, 1.3], size=n)
    top_k = rng.choice([0, 1, 5, 40], size=n)
    top_p = rng.choice([1.0, 0.9, 0.5], size=n)
    u = draws(11, n)
    batch = sampling.sample(logits, temperature, top_k, top_p, u)
    for i in range(n):
        s = slice(i, i + 1)
        assert sampling.sample(logits[s], temperature[s], top_k[s], top_p[s], u[s])[0] == batch[i]


def test_a_draw_at_the_top_of_the_range_never_picks_a_filtered_character():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
    almost_one = np.array([np.nextafter(1.0, 0.0)])
    got = sampling.sample(logits, np.ones(1), np.array([2]), np.ones(1), almost_one)
    assert got[0] in (0, 1)
