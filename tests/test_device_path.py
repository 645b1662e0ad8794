"""The device path (cudaops.py: the state in OrtValues, every call I/O-bound, CUDA's batch policy) on the CPU.

The server takes this path on CUDA only, so without a GPU its code would never run here. Loaded with
``device_path=True`` on the CPU provider, it runs the same code (one-node Gather and Concat graphs for the
state's rows, the bound model step and sampler, the bound K-step call, first characters drawn by the batch
step, bucketed extents), and a seeded stream's text must be the CPU path's: hypothesis-drawn requests with
stops, bias, penalties, log-probabilities and regexes, all at once through one engine each, at K = 1 and at a
drawn K (with and without --overlap), against the CPU path at K = 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charrnn.service.runtime import load_model
from testkit.requests import engine_outputs, generation_request

PRIMES = ("ROMEO:", "a", "\n", "The quick brown fox jumps over")
REGEXES = (r"[a-z ]{3,30}\.", r"(ab|ba)+c?", r"(a|b){1,4}")


@pytest.fixture(scope="module")
def models(model_repo):
    path = model_repo / "tiny" / "1" / "model.onnx"
    return load_model(path, "tiny", 1, "cpu"), load_model(path, "tiny", 1, "cpu", device_path=True)


@st.composite
def specs(draw):
    spec = {"prime": draw(st.sampled_from(PRIMES)), "max_chars": draw(st.integers(1, 60)),
            "seed": draw(st.integers(0, 2**63 - 1)), "temperature": draw(st.sampled_from([0.0, 0.7, 1.0])),
            "top_k": draw(st.sampled_from([0, 3])), "top_p": draw(st.sampled_from([0.0, 0.8]))}
    extra = draw(st.sampled_from(["", "stop", "bias", "penalty", "logprobs", "regex"]))
    if extra == "stop":
        spec["stop"] = tuple(draw(st.lists(st.text("aeiou t", min_size=1, max_size=2), max_size=2, unique=True)))
    elif extra == "bias":
        spec["logit_bias"] = {"a": 3.0, "z": -5.0}
    elif extra == "penalty":
        spec["frequency_penalty"] = 0.7
    elif extra == "logprobs":
        spec["logprobs"] = 2
    elif extra == "regex":
        spec["regex"] = draw(st.sampled_from(REGEXES))
    return spec


def _outputs(model, steps: int, requests: list, overlap: bool = False) -> list[tuple]:
    got = engine_outputs(model, requests, max_active=16, max_queue=256, decode_steps=steps, overlap=overlap)
    for req, (text, _, lps) in zip(requests, got):
        assert len(lps) == (len(text) if req.logprobs else 0)
    return got


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(specs(), min_size=1, max_size=30), st.integers(2, 9), st.booleans())
def test_the_device_path_gives_the_cpu_paths_text_at_one_step_and_at_k(models, requests, steps, overlap):
    cpu, device = models
    reqs = [generation_request(cpu.metadata, s.pop("prime"), s.pop("max_chars"), **s) for s in
            [dict(r) for r in requests]]
    want = _outputs(cpu, 1, reqs)
    assert _outputs(device, 1, reqs) == want
    assert _outputs(device, steps, reqs, overlap) == want


def test_the_device_path_keeps_its_state_in_ortvalues_and_takes_cudas_batch_policy(models):
    """What makes it the device path and not the CPU's: state OrtValues, first characters left to the batch step
    (one prime character held), extents in buckets."""
    from charrnn.service.batch import Batch, Outbox
    from charrnn.service.metrics import CoreStats
    from charrnn.service.slots import BUCKET

    cpu, device = models
    assert type(device.zero_state(2)[0]).__name__ == "OrtValue" and isinstance(cpu.zero_state(2)[0], np.ndarray)
    batch = Batch(device, 256, outbox=Outbox(), stats=CoreStats())
    assert batch.held == 1 and Batch(cpu, 4, outbox=Outbox(), stats=CoreStats()).held == 0
    batch.slots.place(np.array([3]), device.zero_state(1))
    assert batch.slots.extent == BUCKET


def test_the_device_paths_plain_calls_run_bound_per_batch_size(models):
    """The plain K-step calls take BucketDecode on the device path (the CPU's path calls the graph as it is);
    CUDA graphs, asked for on the CPU, stay off."""
    cpu, device = models
    assert cpu.k_step_decoder(4).bucketed is None
    decoder = device.k_step_decoder(4, cuda_graphs=True)
    assert decoder.bucketed is not None and decoder.cuda_graphs is False
    state = device.zero_state(3)
    ids, after = decoder.decode(np.zeros((3, 1), np.int64), state, np.ones(3), np.zeros(3), np.ones(3),
                                np.full((3, 4), 0.5), None)
    assert ids.ids.shape == (3, 4) and decoder.bucketed._bound[(3, False)].copies == 1
    decoder.decode(ids.ids[:, -1:], after, np.ones(3), np.zeros(3), np.ones(3), np.full((3, 4), 0.5), None)
    assert decoder.bucketed._bound[(3, False)].copies == 1  # the state it left is where the next call reads


def test_with_cuda_graphs_the_extents_are_the_captured_sizes_and_rows_keep_their_state(models):
    """Slots.sizes (set by Batch.prepare when CUDA graphs stay on): every extent is one of the doubling sizes,
    growing and compacting; the rows moved keep their state."""
    from charrnn.service.slots import BUCKET, Slots, captured_extents

    _, device = models
    assert captured_extents(300) == [BUCKET, 2 * BUCKET, 4 * BUCKET, 300]
    assert captured_extents(BUCKET) == [BUCKET] and captured_extents(40) == [40]
    s = Slots(device, 300)
    assert [s._round(n) for n in (1, 65, 130, 257)] == [64, 128, 192, 300]  # without sizes: multiples of BUCKET
    s.sizes = captured_extents(300)
    taken = s.allocate(200)
    m = device.metadata
    rows = np.random.default_rng(0).standard_normal((m.layers, 200, m.hidden)).astype(np.float32)
    s.place(taken[:70], device.concat([_rows(device, rows[:, :70])]))
    assert s.extent == 128
    s.place(taken[70:], device.concat([_rows(device, rows[:, 70:])]))
    assert s.extent == 256
    s.active[taken] = True
    s.free(taken[:150])  # 50 rows left, at slots 150..199
    moved = s.compact()
    assert s.extent == BUCKET and sorted(moved[1]) == list(range(50))
    got = np.array(s.state[0].numpy())[:, :50]
    assert s.state[0].shape() == [m.layers, BUCKET, m.hidden]
    np.testing.assert_array_equal(got, rows[:, 150:])


def _rows(model, array: np.ndarray):
    import onnxruntime as ort

    return tuple(ort.OrtValue.ortvalue_from_numpy(array.copy(), "cpu", 0) for _ in model.state_inputs)
