"""The CUDA side of a model: state rows gathered, joined and replaced on the GPU, and the decode step bound.

The recurrent state lives in ``OrtValue``s on the device between steps. Rows
are gathered and joined by one-node graphs (Gather, Concat) built in
graphs.py; a row written into a slot is a Concat then a Gather. The decode
step binds the model's logits output on the device and feeds it to the sampler
graph (sampler.py) on the same device, so only ids cross to the host; a K-step
call (decode_graph.py) binds the same way, with only its ids and the
log-probabilities coming back.

``device="cpu"`` is the same code on the CPU provider, OrtValues in host
memory: the device path's dry run (runtime.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from charrnn import modelfile as mf
from charrnn.service import graphs
from charrnn.service.sampler import SamplerInputs, Picked

CUDA_PROVIDER = "CUDAExecutionProvider"


def run_bound(session: ort.InferenceSession, feeds: dict, names: list[str], keep: set[str],
              device: str) -> dict:
    """One call of ``session`` with I/O binding: OrtValue feeds bound where they are, host arrays copied in;
    the outputs named in ``keep`` left on ``device`` as OrtValues, the rest of ``names`` copied to the host."""
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, value)
    for name in names:
        binding.bind_output(name, device if name in keep else "cpu", 0)
    session.run_with_iobinding(binding)
    return {name: value if name in keep else value.numpy() for name, value in zip(names, binding.get_outputs())}


class DeviceStateOps:
    """Gathers and joins state rows on the GPU with two one-node graphs, so the state stays there."""

    def __init__(self, device: str = "cuda") -> None:
        self.device = device
        providers = [CUDA_PROVIDER] if device == "cuda" else ["CPUExecutionProvider"]
        self._gather = ort.InferenceSession(graphs.gather_rows_model(), providers=providers)
        self._concat = ort.InferenceSession(graphs.concat_rows_model(), providers=providers)
        self._copy = ort.InferenceSession(graphs.identity_model(3), providers=providers)

    def copy(self, source: ort.OrtValue, into: ort.OrtValue) -> None:
        """Writes ``source`` into the buffer ``into`` (the same shape), on the device."""
        b = self._copy.io_binding()
        b.bind_ortvalue_input("x", source)
        b.bind_ortvalue_output("y", into)
        self._copy.run_with_iobinding(b)

    def gather(self, value: ort.OrtValue, rows: np.ndarray) -> ort.OrtValue:
        b = self._gather.io_binding()
        b.bind_ortvalue_input("state", value)
        b.bind_cpu_input("rows", np.ascontiguousarray(rows, np.int64))
        b.bind_output("out", self.device, 0)
        self._gather.run_with_iobinding(b)
        return b.get_outputs()[0]

    def concat(self, a: ort.OrtValue, c: ort.OrtValue) -> ort.OrtValue:
        b = self._concat.io_binding()
        b.bind_ortvalue_input("a", a)
        b.bind_ortvalue_input("b", c)
        b.bind_output("out", self.device, 0)
        self._concat.run_with_iobinding(b)
        return b.get_outputs()[0]

    def place(self, value: ort.OrtValue, slots: np.ndarray, rows: ort.OrtValue) -> ort.OrtValue:
        """value with batch rows ``slots`` replaced by ``rows``: gather from [value; rows]."""
        batch = value.shape()[1]
        index = np.arange(batch, dtype=np.int64)
        index[slots] = batch + np.arange(len(slots), dtype=np.int64)
        return self.gather(self.concat(value, rows), index)

    def decode(self, model, tokens: np.ndarray, state: tuple, params: tuple, controls: SamplerInputs | None):
        """One bound step of ``model`` (runtime.LoadedModel) then the sampler, logits kept on the device."""
        step = {mf.INPUT_TOKENS: np.ascontiguousarray(tokens, np.int64), **dict(zip(model.state_inputs, state))}
        got = run_bound(model.session, step, list(model.outputs), set(model.outputs), self.device)
        from charrnn.service.sampler import feeds, filtered

        temperature, top_k, top_p, u = params
        sampler = model.sampler.session(controls is not None,
                                        filtered(temperature, top_k, top_p, model.metadata.vocab_size))
        names = [o.name for o in sampler.get_outputs()]  # ids (and log-probabilities): the only tensors that cross
        picked = run_bound(sampler, {"logits": got[mf.OUTPUT_LOGITS], **feeds(temperature, top_k, top_p, u, controls)},
                           names, set(), self.device)
        return Picked(*(picked[n] for n in names)), tuple(got[o] for o in model.outputs[1:])
