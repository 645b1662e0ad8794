"""onnxruntime underneath the engine: which device, and one model file as a checked, runnable session.

``select_device`` turns "auto" | "cpu" | "cuda" into the device the server will
use, once, at start-up. ``load_model`` opens one model file, checks it against
the contract in charrnn/modelfile.py and returns a ``LoadedModel`` whose
``run`` advances a batch of streams by any number of steps.

The recurrent state is opaque to the engine: a tuple ``(h,)`` or ``(h, c)``,
each [layers, batch, hidden] float32, held as numpy arrays on the CPU and as
onnxruntime ``OrtValue``s on CUDA, where it stays on the device between steps
(I/O binding) and only the logits come back to the host.

That second way is the device path (cudaops.py). ``load_model(...,
device_path=True)`` takes it on the CPU too, with OrtValues in host memory and
the CPU provider: the CUDA path's code, bindings and batch policy (first
characters drawn by the batch step, bucketed extents) run without a GPU, so
tests/test_device_path.py checks them against the CPU's own path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnxruntime as ort

from charrnn import modelfile as mf
from charrnn.service.sampler import SamplerInputs, Picked, Sampler

if TYPE_CHECKING:  # pragma: no cover
    from charrnn.service import cudaops

log = logging.getLogger("charrnn.service.runtime")

DEVICES = ("auto", "cpu", "cuda")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
K_STEP_DEVICES = ("cpu", "cuda")  # where the engine has a fused K-step decode (LoadedModel.k_step_decoder)

State = tuple  # (h,) or (h, c): each [L, B, H] float32, np.ndarray on CPU, ort.OrtValue on the device path


def cuda_unusable_reason() -> str | None:
    """None when onnxruntime can run a graph on CUDA here, else a one-line reason."""
    return _cuda_probe()


@functools.cache
def _cuda_probe() -> str | None:
    if CUDA_PROVIDER not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install the onnxruntime-gpu package)"
    # onnxruntime-gpu lists the provider even when the CUDA libraries are missing
    # and then prints a page of errors at the first session; load the provider's
    # library ourselves first, so a missing library becomes one readable reason.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        ort.preload_dlls(directory="")  # CUDA/cuDNN from the nvidia-* wheels, when installed
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as e:
        missing = str(e).split(":")[0]
        return f"{missing} missing" if "cannot open shared object" in str(e) else str(e)
    # The libraries load; a session on a real GPU is the final proof (no GPU, driver too old).
    from charrnn.service.graphs import identity_model  # onnx: only where that session is tried (graphs.py)

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # fatal only: the reason is reported below, in one line
        sess = ort.InferenceSession(identity_model(), opts, providers=[CUDA_PROVIDER, CPU_PROVIDER])
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"; the message says why
        return str(e).strip().splitlines()[0][:200]
    if sess.get_providers()[0] != CUDA_PROVIDER:
        return "onnxruntime did not place a test graph on the GPU (no CUDA device?)"
    return None


def select_device(requested: str) -> str:
    """Turns "auto" | "cpu" | "cuda" into "cpu" | "cuda"; "cuda" where CUDA is not usable raises RuntimeError."""
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    ort.set_default_logger_severity(3)  # onnxruntime's own warnings are not the service's log
    if requested == "cpu":
        log.info("device: cpu (as requested)")
        return "cpu"
    reason = cuda_unusable_reason()
    if requested == "cuda":
        if reason:
            raise RuntimeError(f"--device cuda: CUDA is not usable: {reason}; use --device cpu or auto")
        log.info("device: cuda (as requested)")
        return "cuda"
    if reason:
        log.info("device: cpu (CUDA not usable: %s)", reason)
        return "cpu"
    log.info("device: cuda (CUDA usable, chosen by --device auto)")
    return "cuda"


@dataclass
class LoadedModel:
    """One checked model version and its onnxruntime session."""

    name: str
    version: int
    path: Path
    metadata: mf.ModelMetadata
    device: str  # "cpu" | "cuda"
    session: ort.InferenceSession
    # The state in OrtValues, every call I/O-bound (cudaops.py): always on CUDA; on the CPU, its dry run.
    device_path: bool = False
    state_inputs: tuple[str, ...] = field(init=False, repr=False)  # state inputs: ("h",) or ("h", "c")
    outputs: tuple[str, ...] = field(init=False, repr=False)  # logits, then state outputs
    _ops: "cudaops.DeviceStateOps | None" = field(init=False, repr=False, default=None)
    _sampler: Sampler | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        pairs = self.metadata.state_names()
        self.state_inputs = tuple(i for i, _ in pairs)
        self.outputs = (mf.OUTPUT_LOGITS, *(o for _, o in pairs))
        if self.device == "cuda":
            self.device_path = True
        if self.device_path:
            from charrnn.service import cudaops

            self._ops = cudaops.DeviceStateOps(self.device)

    @property
    def sampler(self) -> Sampler:
        """The sampler graph on this model's device (created at the first use)."""
        if self._sampler is None:
            self._sampler = Sampler([CUDA_PROVIDER, CPU_PROVIDER] if self.device == "cuda" else None)
        return self._sampler

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def state_ops(self) -> "cudaops.DeviceStateOps | None":
        """The device path's state operations (gather, join, copy on the device); None on the CPU's path."""
        return self._ops

    def zero_state(self, batch: int) -> State:
        """The state of ``batch`` streams that have read nothing yet."""
        m = self.metadata
        zeros = [np.zeros((m.layers, batch, m.hidden), np.float32) for _ in self.state_inputs]
        if self._ops is None:
            return tuple(zeros)
        return tuple(ort.OrtValue.ortvalue_from_numpy(z, self.device, 0) for z in zeros)

    def run(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """tokens int64 [B, T], state -> logits float32 [B, T, V] (host memory), new state."""
        if self._ops is None:
            feeds = {mf.INPUT_TOKENS: tokens, **dict(zip(self.state_inputs, state))}
            logits, *new = self.session.run(self.outputs, feeds)
            return logits, tuple(new)
        from charrnn.service.cudaops import run_bound

        feeds = {mf.INPUT_TOKENS: np.ascontiguousarray(tokens, np.int64), **dict(zip(self.state_inputs, state))}
        # The logits are the only tensor that crosses to the host.
        got = run_bound(self.session, feeds, list(self.outputs), set(self.outputs[1:]), self.device)
        return got[mf.OUTPUT_LOGITS], tuple(got[o] for o in self.outputs[1:])

    def decode(self, tokens: np.ndarray, state: State, temperature: np.ndarray, top_k: np.ndarray,
               top_p: np.ndarray, u: np.ndarray, controls: SamplerInputs | None = None) -> tuple[Picked, State]:
        """One step of every row and its next character: tokens int64 [B, 1] -> (Picked, new state).

        On CUDA the logits stay on the device and go straight into the sampler; only ids (and
        log-probabilities when asked) come back to the host.
        """
        if self._ops is None:
            logits, state = self.run(tokens, state)
            return self.sampler.sample(logits, temperature, top_k, top_p, u, controls), state
        return self._ops.decode(self, tokens, state, (temperature, top_k, top_p, u), controls)

    def k_step_decoder(self, steps: int, prebuilt: dict | None = None, cuda_graphs: bool = False):
        """The fused K-step decode of this model (decode_graph.Decoder), or None on a device outside
        K_STEP_DEVICES; ``cuda_graphs``: its plain calls as captured CUDA graphs (on CUDA; ignored elsewhere)."""
        if self.device not in K_STEP_DEVICES:
            return None
        from charrnn.service.decode_graph import Decoder

        return Decoder(self, steps, self.session.get_session_options().intra_op_num_threads, prebuilt,
                       cuda_graphs=cuda_graphs)

    def sample(self, logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
               u: np.ndarray, controls: SamplerInputs | None = None) -> Picked:
        """Next characters from host logits float32 [k, V] (a prefill's last step, a cached prime)."""
        return self.sampler.sample(logits, temperature, top_k, top_p, u, controls)

    def place(self, state: State, slots: np.ndarray, rows: State) -> State:
        """``state`` with batch rows ``slots`` (int64 [k]) replaced by ``rows`` (batch k); in place on the CPU."""
        if self._ops is None:
            for target, source in zip(state, rows):
                target[:, slots, :] = source
            return state
        return tuple(self._ops.place(s, slots, r) for s, r in zip(state, rows))

    def resize(self, state: State, batch: int) -> State:
        """The first ``batch`` rows of ``state``, or all of them and zero rows after."""
        have = (state[0].shape() if self._ops is not None else state[0].shape)[1]
        if batch <= have:
            rows = np.arange(batch, dtype=np.int64)
            if self._ops is not None:
                return self.gather(state, rows)
            return tuple(np.ascontiguousarray(s[:, :batch]) for s in state)
        return self.concat([state, self.zero_state(batch - have)])

    def gather(self, state: State, rows: np.ndarray) -> State:
        """The state of batch rows ``rows`` (int64 [n]), in that order."""
        if self._ops is None:
            return tuple(np.take(s, rows, axis=1) for s in state)
        return tuple(self._ops.gather(s, rows) for s in state)

    def concat(self, states: Sequence[State]) -> State:
        """Joins the batches of several states, in order."""
        if len(states) == 1:
            return states[0]
        if self._ops is None:
            return tuple(np.concatenate(parts, axis=1) for parts in zip(*states))
        return tuple(functools.reduce(self._ops.concat, parts) for parts in zip(*states))

    def state_numpy(self, state: State) -> tuple[np.ndarray, ...]:
        """The state as host arrays (for tests and parity checks)."""
        return tuple(s if isinstance(s, np.ndarray) else s.numpy() for s in state)


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Options of every model session: ``threads`` intra-op threads (0 = one per core)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # one graph node at a time; the parallelism is inside the matmuls
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would otherwise spin between steps and take the core
    # the asyncio loop needs to send the characters.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def load_model(path: str | os.PathLike, name: str, version: int, device: str, threads: int = 0,
               trial: bool = True, device_path: bool = False) -> LoadedModel:
    """Opens and checks one model file; raises ModelFormatError('<path>: <why>') when it breaks the contract.

    ``trial=False`` leaves out the trial step (``trial_step``), for a caller that times it apart;
    ``device_path``: on the CPU, the CUDA path's code (see the module docstring).
    """
    path = Path(path)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda (see select_device), got {device!r}")
    if not path.is_file():
        raise mf.ModelFormatError(f"{path}: no such file")
    providers = [CPU_PROVIDER] if device == "cpu" else [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER]
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise mf.ModelFormatError(f"{path}: onnxruntime cannot load it as an ONNX model ({first})") from None
    if device == "cuda" and session.get_providers()[0] != CUDA_PROVIDER:
        raise mf.ModelFormatError(f"{path}: onnxruntime would not place this model on CUDA")
    try:
        meta = mf.ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    except mf.ModelFormatError as e:
        raise mf.ModelFormatError(f"{path}: {e}") from None
    try:
        meta.check_io(session.get_inputs(), session.get_outputs())
    except mf.ModelFormatError as e:
        raise mf.ModelFormatError(f"{path}: {e}") from None
    model = LoadedModel(name=name, version=version, path=path, metadata=meta, device=device, session=session,
                        device_path=device_path)
    if trial:
        trial_step(model)
    return model


def trial_step(model: LoadedModel) -> None:
    """One real step at batch 2: output shapes must match the metadata (catches symbolic dims too)."""
    m = model.metadata
    try:
        logits, state = model.run(np.zeros((2, 1), np.int64), model.zero_state(2))
    except Exception as e:  # noqa: BLE001
        raise mf.ModelFormatError(f"{model.path}: a trial step failed: {str(e).strip()[:300]}") from None
    if logits.shape != (2, 1, m.vocab_size):
        raise mf.ModelFormatError(
            f"{model.path}: a trial step gave logits {list(logits.shape)}, expected [2, 1, {m.vocab_size}] "
            f"(vocab_size from the metadata)"
        )
    for name, s in zip(model.outputs[1:], model.state_numpy(state)):
        if s.shape != (m.layers, 2, m.hidden):
            raise mf.ModelFormatError(
                f"{model.path}: a trial step gave {name} {list(s.shape)}, expected "
                f"[{m.layers}, 2, {m.hidden}] (layers, batch, hidden from the metadata)"
            )
