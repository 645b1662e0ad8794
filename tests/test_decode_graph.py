"""The K-step decode graph (service/decode_graph.py) against K single steps of the model and the sampler.

One call of the fused graph must give the ids that K calls of ``LoadedModel.run``
plus the sampler give with the same uniforms, and the same state after them:
plain and filtered rows, greedy rows, with controls (bias, penalties with the
counts moved on between steps, log-probabilities) and with a regex automaton.
"""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from charrnn.exporter.export import export_model
from charrnn.service.automata import AutomatonTable
from charrnn.service.constraints import compile_regex
from charrnn.service.decode_graph import (
    AutomatonInputs,
    BoundDecode,
    DecodeGraph,
    allowed_bias,
    build_decode_graph,
)
from charrnn.service.runtime import load_model
from charrnn.service.sampler import SamplerInputs, filtered
from charrnn.service.sampling import uniforms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit.modelfactory import DEFAULT_VOCAB, make_model

V = len(DEFAULT_VOCAB)
CELLS = {"lstm": (2, 16), "gru": (1, 16), "rnn": (1, 8)}  # cell -> (layers, hidden)
PATTERNS = (r"([a-z]+ )+", r"(ab|ba|c)+", r"[A-Z]+[a-z]*", r"(x|yz|, )+")  # none ever completes: always extendable
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """cell -> path of a tiny exported model whose logits are peaked (the head scaled up), so that greedy,
    top-k and top-p rows differ from plain ones."""
    root = tmp_path_factory.mktemp("decode")
    paths = {}
    for seed, (cell, (layers, hidden)) in enumerate(CELLS.items()):
        model = make_model(cell=cell, layers=layers, hidden=hidden, seed=seed)
        with torch.no_grad():
            model.head.weight.mul_(8.0)
        paths[cell] = root / f"{cell}.onnx"
        export_model(model, list(DEFAULT_VOCAB), paths[cell], corpus_sha256="0" * 64, check=False)
    return paths


@functools.cache
def loaded(path):
    return load_model(path, "tiny", 1, "cpu", threads=1)


@functools.cache
def fused(path, steps: int, controlled: bool = False, logprobs: bool = False, regex: bool = False,
          loop: bool = False) -> DecodeGraph:
    return DecodeGraph(path, steps, controlled=controlled, logprobs=logprobs, regex=regex, loop=loop, threads=1)


def rows(data, batch: int) -> dict:
    """Per-row controls of ``batch`` rows: temperature (0 = greedy), top-k, top-p, seeds, positions."""
    draw = lambda s: np.array(data.draw(st.lists(s, min_size=batch, max_size=batch)))
    return {
        "temperature": draw(st.sampled_from([0.0, 0.0, 0.3, 0.8, 1.0, 1.7])).astype(np.float32),
        "top_k": draw(st.sampled_from([0, 0, 1, 2, 5, V - 1, V, V + 3])).astype(np.int64),
        "top_p": draw(st.sampled_from([1.0, 1.0, 0.95, 0.6, 0.2, 1e-6])).astype(np.float32),
        "seeds": np.array(data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=batch, max_size=batch)),
                          np.uint64),
        "positions": draw(st.integers(0, 10_000)).astype(np.int64),
        "ids": draw(st.integers(0, V - 1)).astype(np.int64),
        "state_seed": data.draw(st.integers(0, 2**31)),
    }


def start(model, r: dict, batch: int):
    """A nonzero state, as a stream in the middle of its text has."""
    rng = np.random.default_rng(r["state_seed"])
    return tuple((0.5 * rng.standard_normal(s.shape)).astype(np.float32) for s in model.zero_state(batch))


def draws(r: dict, steps: int) -> np.ndarray:
    """u float32 [B, K]: each row's uniforms at its next K positions (what the engine feeds)."""
    return np.stack([uniforms(r["seeds"], r["positions"] + k) for k in range(steps)], axis=1).astype(np.float32)


def single_steps(model, r: dict, state, u, controls: SamplerInputs | None = None, table: AutomatonTable | None = None):
    """K calls of model.run + the sampler, the counts and automaton states moved on on the host between them."""
    tokens, picked_all = r["ids"][:, None], []
    for k in range(u.shape[1]):
        step_controls = controls
        if controls is not None and table is not None:
            bias = controls.bias.copy()
            bias[~table.mask[table.state[: len(bias)]]] = -np.inf  # as controls.ControlRows.sampler_controls
            step_controls = SamplerInputs(bias, controls.counts, controls.presence, controls.frequency,
                                          controls.repetition, controls.n_top)
        logits, state = model.run(tokens, state)
        picked = model.sample(logits, r["temperature"], r["top_k"], r["top_p"], u[:, k], step_controls)
        tokens = picked.ids
        picked_all.append(picked)
        if controls is not None:
            controls.counts[np.arange(len(tokens)), tokens[:, 0]] += 1.0
        if table is not None:
            table.step(slice(0, len(tokens)), tokens[:, 0])
    return picked_all, state


def assert_same_state(got, want) -> None:
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", list(CELLS))
@SETTINGS
@given(data=st.data(), batch=st.integers(1, 9), steps=st.integers(1, 8))
def test_k_steps_in_one_call_pick_what_k_single_steps_pick(models, cell, data, batch, steps):
    model, r = loaded(models[cell]), rows(data, batch)
    state, u = start(model, r, batch), draws(r, steps)
    ids, new_state = fused(models[cell], steps).run(r["ids"], state, r["temperature"], r["top_k"], r["top_p"], u)
    picked, want_state = single_steps(model, r, state, u)
    assert ids.shape == (batch, steps) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, np.concatenate([p.ids for p in picked], axis=1))
    assert_same_state(new_state, want_state)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@SETTINGS
@given(data=st.data(), batch=st.integers(1, 9), steps=st.integers(1, 8), logprobs=st.booleans())
def test_controlled_k_steps_move_the_counts_as_the_host_does(models, cell, data, batch, steps, logprobs):
    model, r = loaded(models[cell]), rows(data, batch)
    state, u = start(model, r, batch), draws(r, steps)
    rng = np.random.default_rng(r["state_seed"])
    bias = rng.choice([0.0, 0.0, 0.0, 2.5, -1.0, -np.inf], (batch, V)).astype(np.float32)
    bias[np.arange(batch), rng.integers(0, V, batch)] = 1.0  # every row keeps a character it may draw
    controls = SamplerInputs(
        bias=bias, counts=rng.choice([0.0, 0.0, 1.0, 3.0], (batch, V)).astype(np.float32),
        presence=rng.choice([0.0, 0.5, 1.5], batch).astype(np.float32),
        frequency=rng.choice([0.0, 0.3, -0.2], batch).astype(np.float32),
        repetition=rng.choice([1.0, 1.3, 0.8], batch).astype(np.float32),
        n_top=data.draw(st.integers(1, V)))
    counts = controls.counts.copy()
    got, new_state = fused(models[cell], steps, controlled=True, logprobs=logprobs).decode(
        r["ids"], state, r["temperature"], r["top_k"], r["top_p"], u, controls)
    np.testing.assert_array_equal(controls.counts, counts)  # the caller's counts are not written
    picked, want_state = single_steps(model, r, state, u, controls)
    np.testing.assert_array_equal(got.ids, np.concatenate([p.ids for p in picked], axis=1))
    np.testing.assert_array_equal(got.counts, controls.counts)
    assert_same_state(new_state, want_state)
    if logprobs:
        np.testing.assert_allclose(got.logprob, np.concatenate([p.logprob for p in picked], axis=1), atol=1e-6)
        np.testing.assert_allclose(got.top_logprobs, np.stack([p.top_logprobs for p in picked], axis=1), atol=1e-6)
        np.testing.assert_array_equal(got.top_ids, np.stack([p.top_ids for p in picked], axis=1))
    else:
        assert got.logprob is None and got.top_ids is None


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@SETTINGS
@given(data=st.data(), batch=st.integers(1, 9), steps=st.integers(1, 8))
def test_a_regex_automaton_steps_inside_the_graph(models, cell, data, batch, steps):
    model, r = loaded(models[cell]), rows(data, batch)
    state, u = start(model, r, batch), draws(r, steps)
    table = AutomatonTable(V, batch)
    for row in range(batch):
        pattern = data.draw(st.sampled_from((None,) + PATTERNS))  # None: the row has no regex (state 0)
        if pattern is not None:
            table.start(row, pattern, lambda p=pattern: compile_regex(p, tuple(DEFAULT_VOCAB), 1000))
    rng = np.random.default_rng(r["state_seed"])
    controls = SamplerInputs.neutral(batch, V)
    controls.bias[:] = rng.choice([0.0, 0.0, 1.5, -2.0], (batch, V))
    automaton = AutomatonInputs(table.trans, allowed_bias(table.mask), table.state[:batch].copy())
    got, new_state = fused(models[cell], steps, controlled=True, regex=True).decode(
        r["ids"], state, r["temperature"], r["top_k"], r["top_p"], u, controls, automaton)
    picked, want_state = single_steps(model, r, state, u, controls, table)
    np.testing.assert_array_equal(got.ids, np.concatenate([p.ids for p in picked], axis=1))
    np.testing.assert_array_equal(got.automaton_state, table.state[:batch])
    assert got.automaton_state.dtype == np.int32
    assert table.mask[table.state[:batch]].any(axis=1).all()  # every row is still inside its pattern
    assert_same_state(new_state, want_state)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("steps", [1, 3])
def test_the_loop_graph_picks_as_the_unrolled_one(models, cell, steps):
    model, batch = loaded(models[cell]), 6
    r = {"temperature": np.array([0, 0.7, 1, 1.2, 0.5, 1], np.float32), "top_k": np.array([0, 3, 0, 0, 10, 0]),
         "top_p": np.array([1, 1, 0.8, 1, 0.9, 1], np.float32), "seeds": np.arange(batch, dtype=np.uint64) * 977,
         "positions": np.arange(batch), "ids": np.arange(batch) * 7, "state_seed": 3}
    state, u = start(model, r, batch), draws(r, steps)
    args = (r["ids"], state, r["temperature"], r["top_k"], r["top_p"], u)
    looped, loop_state = fused(models[cell], steps, loop=True).run(*args)
    unrolled, unrolled_state = fused(models[cell], steps).run(*args)
    np.testing.assert_array_equal(looped, unrolled)
    assert_same_state(loop_state, unrolled_state)
    controls = SamplerInputs.neutral(batch, V)
    controls.presence[:] = 0.7
    got, _ = fused(models[cell], steps, controlled=True, logprobs=True, loop=True).decode(*args, controls)
    want, _ = fused(models[cell], steps, controlled=True, logprobs=True).decode(*args, controls)
    for name in ("ids", "counts", "logprob", "top_logprobs", "top_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_the_weights_are_in_the_graph_once(models):
    import onnx

    one = onnx.load(str(models["lstm"]))
    eight = onnx.load_from_string(build_decode_graph(models["lstm"], 8, filtered=True, controlled=True,
                                                     logprobs=True, regex=True))
    weights = {t.name for t in one.graph.initializer}
    assert weights <= {t.name for t in eight.graph.initializer}
    assert sum(t.name in weights for t in eight.graph.initializer) == len(weights)
    assert sum(n.op_type == "LSTM" for n in eight.graph.node) == 8 * sum(n.op_type == "LSTM" for n in one.graph.node)
    assert [i.name for i in eight.graph.input] == ["tokens", "h", "c", "temperature", "top_k", "top_p", "u", "bias",
                                                   "counts", "presence", "frequency", "repetition", "n_top",
                                                   "transitions", "allowed", "automaton_state"]
    assert [o.name for o in eight.graph.output] == ["ids", "h_out", "c_out", "counts_out", "logprob", "top_logprobs",
                                                    "top_ids", "automaton_state_out"]


def test_bad_arguments_are_refused(models):
    with pytest.raises(ValueError, match="steps"):
        build_decode_graph(models["gru"], 0, filtered=False)
    with pytest.raises(ValueError, match="controlled"):
        build_decode_graph(models["gru"], 2, filtered=False, regex=True)
    graph = fused(models["gru"], 2)
    with pytest.raises(ValueError, match="controls"):
        graph.run(np.zeros(1, np.int64), (np.zeros((1, 1, 16), np.float32),), np.ones(1), np.zeros(1), np.ones(1),
                  np.zeros((1, 2)), SamplerInputs.neutral(1, V))


@SETTINGS
@given(st.data(), st.sampled_from(sorted(CELLS)), st.integers(1, 9), st.sampled_from([1, 3, 8]))
def test_the_io_bound_call_gives_the_ids_and_state_of_the_graph_call_after_call(models, data, cell, batch, steps):
    """BoundDecode (the CUDA path's shape: buffers made once, the state swapped between two of them) on the CPU
    provider: three calls in a row, each from the state the last left on the device, against DecodeGraph.run."""
    r = rows(data, batch)
    graph = fused(models[cell], steps)
    bound = BoundDecode(graph, batch, filtered=filtered(r["temperature"], r["top_k"], r["top_p"], V))
    state = start(loaded(models[cell]), r, batch)
    bound.set_state(state)
    tokens = r["ids"]
    for call in range(3):
        r["positions"] = r["positions"] + steps
        u = draws(r, steps)
        want, state = graph.run(tokens, state, r["temperature"], r["top_k"], r["top_p"], u)
        got = bound.run(tokens, r["temperature"], r["top_k"], r["top_p"], u)
        assert np.array_equal(got, want), f"call {call}"
        for a, b in zip(bound.state(), state):
            np.testing.assert_allclose(a, b, atol=1e-6)
        tokens = want[:, -1]


def test_the_io_bound_call_refuses_what_it_does_not_run(models):
    with pytest.raises(ValueError, match="device='cuda'"):
        BoundDecode(fused(models["lstm"], 2), 4, cuda_graph=True)
    with pytest.raises(ValueError, match="plain K-step graph"):
        BoundDecode(fused(models["lstm"], 2, controlled=True), 4)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.sampled_from(sorted(CELLS)), st.sampled_from([1, 4]))
def test_the_bucketed_call_follows_the_state_through_joins_sizes_and_sampler_paths(models, data, cell, steps):
    """BucketDecode (the engine's plain K-step call on the device path) on the CPU provider: calls at two batch
    sizes and both sampler paths, where between some calls the state is replaced as a join or a compaction
    replaces it; each call's ids and state against DecodeGraph.run on host arrays, and the state copied into
    a size's buffers exactly when it did not come from them."""
    from charrnn.service.cudaops import DeviceStateOps
    from charrnn.service.decode_graph import BucketDecode

    graph = fused(models[cell], steps)
    bucketed = BucketDecode(graph, "cpu", DeviceStateOps("cpu"))
    host = lambda state: tuple(np.array(v.numpy()) for v in state)
    device = lambda state: tuple(ort.OrtValue.ortvalue_from_numpy(a.copy(), "cpu", 0) for a in state)
    r, held, copies, last = None, None, 0, (None, None)  # last: (the size and path of the last call, its state)
    for call in range(data.draw(st.integers(2, 8), label="calls")):
        batch = data.draw(st.sampled_from([3, 5]), label="batch")
        if r is None or batch != len(r["ids"]) or data.draw(st.booleans(), label="replaced"):
            r = rows(data, batch)  # a new membership: state and rows from elsewhere
            held = device(start(loaded(models[cell]), r, batch))
        u = draws(r, steps)
        want, want_state = graph.run(r["ids"], host(held), r["temperature"], r["top_k"], r["top_p"], u)
        key = (batch, filtered(r["temperature"], r["top_k"], r["top_p"], V))
        copies += (key, held) != last or key not in bucketed._bound
        got, held = bucketed.decode(r["ids"][:, None], held, r["temperature"], r["top_k"], r["top_p"], u)
        assert np.array_equal(got, want), f"call {call}"
        assert_same_state(host(held), want_state)
        assert sum(b.copies for b in bucketed._bound.values()) == copies
        last = (key, held)
        r["ids"], r["positions"] = want[:, -1], r["positions"] + steps


def test_a_captured_trial_that_disagrees_is_told_apart(models):
    """agree: what the CUDA-graph trial at load compares (a capture that is wrong without failing)."""
    from charrnn.service.decode_graph import agree

    ids = [np.arange(6).reshape(2, 3), np.arange(6).reshape(2, 3) + 1]
    state = (np.ones((1, 2, 4), np.float32),)
    assert agree((ids, state), ([i.copy() for i in ids], (state[0] + 1e-7,)))
    assert not agree((ids, state), ([ids[0], ids[1] * 0], state))
    assert not agree((ids, state), (ids, (state[0] + 0.1,)))


def test_cuda_graphs_refused_leave_the_bucketed_call_running_without_them(models, caplog):
    """Asked for where they cannot be had (here the CPU provider, which BoundDecode refuses them on; on a GPU,
    a session onnxruntime will not capture or a trial that disagrees), CUDA graphs turn off with the reason in
    the log, and the calls go on, warmed sizes included, giving the graph's ids."""
    import logging

    from charrnn.service.cudaops import DeviceStateOps
    from charrnn.service.decode_graph import BucketDecode
    from charrnn.service.slots import captured_extents

    graph = fused(models["gru"], 3)
    bucketed = BucketDecode(graph, "cpu", DeviceStateOps("cpu"), cuda_graph=True, label="gru@1")
    with caplog.at_level(logging.WARNING, logger="charrnn.service.decode_graph"):
        bucketed.prepare(captured_extents(5))  # the trial, on the thread that will make the calls
    assert bucketed.cuda_graph is False and "cuda_graph needs device='cuda'" in bucketed.why_not
    assert "CUDA graphs off for gru@1: ValueError: cuda_graph needs device='cuda'" in caplog.text
    assert captured_extents(130) == [64, 128, 130] and captured_extents(64) == [64] and captured_extents(5) == [5]
    bucketed.warm(captured_extents(5))
    assert sorted(bucketed._bound) == [(5, False)]
    rng = np.random.default_rng(3)
    state = tuple(rng.standard_normal((1, 5, 16)).astype(np.float32) for _ in graph.state_inputs)
    args = (np.arange(5, dtype=np.int64), np.full(5, 0.9, np.float32), np.zeros(5, np.int64),
            np.ones(5, np.float32), rng.random((5, 3)).astype(np.float32))
    want, _ = graph.run(args[0], state, *args[1:])
    got, _ = bucketed.decode(args[0][:, None], tuple(ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0) for a in state),
                             *args[1:])
    assert np.array_equal(got, want)
