"""The sampler: one ONNX graph that picks every row's next character, on the model's device.

Per row, from that row's own values only: temperature (0 is greedy), top-k,
top-p, then one uniform number (sampling.uniforms, SplitMix64 of the row's seed
and position) picks by inverse CDF over the characters sorted by probability
(ties: the lower index first, as ONNX TopK specifies). The same graph runs on
the CPU and the CUDA provider, so there is one sampler, not two; on CUDA the
logits never leave the device and only ids come back.

Two variants of the graph, so that a batch that uses no control pays nothing
for them:

- ``plain``: logits, temperature, top_k, top_p, u -> ids;
- ``controlled``: also an additive bias per row and character (logit_bias and
  the constraint mask, -inf where a character may not be drawn), the counts of
  each character generated so far with presence, frequency and repetition
  penalties (vLLM's meanings), and log-probabilities of the model's own
  distribution (softmax of the raw logits) for the chosen character and the
  ``n_top`` most likely ones.

Shapes: B rows, V characters. logits float32 [B, 1, V] (a step's output as is).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:  # pragma: no cover
    from charrnn.service.graphs import Graph

CPU = ["CPUExecutionProvider"]


def _graph(controlled: bool, filtered: bool) -> bytes:
    from charrnn.service.graphs import Graph  # onnx: imported by the processes that build a sampler (graphs.py)

    g = Graph("charrnn_sampler" + ("_controlled" if controlled else "") + ("_filtered" if filtered else ""))
    logits = g.input("logits", np.float32, 3)  # [B, 1, V]
    temperature = g.input("temperature", np.float32, 1)  # [B], 0 = greedy
    top_k = g.input("top_k", np.int64, 1)  # [B], 0 = off
    top_p = g.input("top_p", np.float32, 1)  # [B], 1 = off
    u = g.input("u", np.float32, 1)  # [B] in [0, 1]
    i64 = lambda v: g.const(v, np.int64)  # noqa: E731
    axis0, axis1 = i64([0]), i64([1])
    col = lambda x: g.node("Unsqueeze", [x, axis1])  # noqa: E731 - [B] -> [B, 1]
    zero, one = g.const(0.0), g.const(1.0)
    raw = g.node("Squeeze", [logits, axis1])  # [B, V]

    z = _penalised(g, raw, col) if controlled else raw
    z = g.node("Sub", [z, g.node("ReduceMax", [z], axes=[1], keepdims=1)])  # the most likely is 0, the rest < 0
    # Dividing by the temperature keeps that order. A greedy row is divided by 1e-37 instead: its
    # maxima stay 0 and every other character falls to -inf, so its weights are 1 at its maxima
    # and 0 elsewhere, and with a draw of 0 it takes the first maximum, as argmax does.
    greedy = g.node("LessOrEqual", [temperature, zero])
    z = g.node("Div", [z, col(g.node("Where", [greedy, g.const(1e-37), temperature]))])  # [B, V]
    vocab = g.node("Gather", [g.node("Shape", [z]), i64(1)], axis=0)  # scalar V

    # Rows that sample the whole vocabulary (the usual batch) and greedy rows pick in vocabulary
    # order, on the transposed weights [V, B]: the running sum then goes down the columns, all
    # rows at once.
    w = g.node("Exp", [g.node("Transpose", [z], perm=[1, 0])])  # [V, B]
    draw = g.node("Where", [greedy, zero, u])
    plain = _pick(g, w, draw, axis=0)  # [B]

    if not filtered:  # no row of this batch has top-k or top-p: the vocabulary-order picks are all
        g.output(col(plain), "ids", np.int64, 2)
        if controlled:
            _logprobs(g, raw, col(plain), axis1, col)
        return g.model()
    # Rows with top-k or top-p pick over the characters sorted by probability: only they are
    # sorted (onnxruntime's TopK costs microseconds a row), then written back.
    k_on = g.node("And", [g.node("Greater", [top_k, i64(0)]), g.node("Less", [top_k, vocab])])
    filtered = g.node("And", [g.node("Not", [greedy]), g.node("Or", [k_on, g.node("Less", [top_p, one])])])
    rows = g.node("Squeeze", [g.node("NonZero", [filtered]), axis0])  # [m]
    zf = g.node("Gather", [z, rows], axis=0)  # [m, V]
    values, order = g.node("TopK", [zf, g.node("Unsqueeze", [vocab, axis0])], outputs=2, axis=1, largest=1,
                           sorted=1)  # [m, V] each, most likely first; ties: the lower index first
    wf = g.node("Exp", [values])
    rank = g.node("Range", [i64(0), vocab, i64(1)])  # [V]
    k = g.node("Gather", [g.node("Where", [k_on, top_k, vocab]), rows], axis=0)  # [m]
    wf = g.node("Mul", [wf, g.cast(g.node("Less", [rank, col(k)]), np.float32)])
    # Top-p over what top-k kept: the most likely characters until their mass reaches p (the first stays).
    p = g.node("Div", [wf, g.node("ReduceSum", [wf, axis1], keepdims=1)])
    before = g.node("Sub", [g.node("CumSum", [p, i64(1)]), p])
    pf = g.node("Gather", [top_p, rows], axis=0)
    keep = g.node("Or", [g.node("Less", [before, col(pf)]), col(g.node("GreaterOrEqual", [pf, one]))])
    wf = g.node("Mul", [wf, g.cast(keep, np.float32)])
    picked = _pick(g, g.node("Transpose", [wf], perm=[1, 0]), g.node("Gather", [u, rows], axis=0), axis=0)
    chosen = g.node("Squeeze", [g.node("GatherElements", [order, col(picked)], axis=1), axis1])  # [m]
    ids = g.node("ScatterElements", [plain, rows, chosen], axis=0)  # [B]
    ids = col(ids)  # [B, 1] int64: feeds the next step as is
    g.output(ids, "ids", np.int64, 2)

    if controlled:
        _logprobs(g, raw, ids, axis1, col)
    return g.model()


def _logprobs(g: Graph, raw: str, ids: str, axis1: str, col) -> None:
    """The model's own distribution: log-softmax of the raw logits [B, V], before every control."""
    top = g.node("ReduceMax", [raw], axes=[1], keepdims=1)
    shifted = g.node("Sub", [raw, top])
    logp = g.node("Sub", [shifted, g.node("Log", [g.node("ReduceSum", [g.node("Exp", [shifted]), axis1],
                                                                keepdims=1)])])  # [B, V]
    g.output(g.node("GatherElements", [logp, ids], axis=1), "logprob", np.float32, 2)  # [B, 1]
    n_top = g.input("n_top", np.int64, 1)  # [1]: alternatives returned per row (>= 1)
    top_lp, top_id = g.node("TopK", [logp, n_top], outputs=2, axis=1, largest=1, sorted=1)
    g.output(top_lp, "top_logprobs", np.float32, 2)  # [B, n_top]
    g.output(top_id, "top_ids", np.int64, 2)


def _penalised(g: Graph, raw: str, col) -> str:
    """raw [B, V] with the repetition, frequency and presence penalties and the bias applied (vLLM's order)."""
    zero = g.const(0.0)
    bias = g.input("bias", np.float32, 2)  # [B, V]: logit_bias, and -inf where a constraint forbids
    counts = g.input("counts", np.float32, 2)  # [B, V]: times each character was generated
    presence = g.input("presence", np.float32, 1)  # [B]
    frequency = g.input("frequency", np.float32, 1)  # [B]
    repetition = g.input("repetition", np.float32, 1)  # [B], 1 = off
    seen = g.node("Greater", [counts, zero])
    r = col(repetition)
    # Repetition: a seen character's logit is divided by r when positive, multiplied by r otherwise.
    repeated = g.node("Where", [g.node("Greater", [raw, zero]), g.node("Div", [raw, r]), g.node("Mul", [raw, r])])
    z = g.node("Where", [seen, repeated, raw])
    z = g.node("Sub", [z, g.node("Mul", [col(frequency), counts])])
    z = g.node("Sub", [z, g.node("Mul", [col(presence), g.cast(seen, np.float32)])])
    return g.node("Add", [z, bias])


def _pick(g: Graph, w: str, draw: str, axis: int) -> str:
    """Inverse CDF over weights w [V, n] (one column a row): the first index whose running sum exceeds draw * total.

    Counting only sums below the total keeps the pick on a character with weight, also when
    draw * total rounds up to the total. Returns int64 [n].
    """
    cdf = g.node("CumSum", [w, g.const(axis, np.int64)])
    total = g.node("ReduceMax", [cdf], axes=[axis], keepdims=1)  # [1, n]: the running sum only grows
    target = g.node("Mul", [g.node("Unsqueeze", [draw, g.const([axis], np.int64)]), total])
    below = g.node("And", [g.node("LessOrEqual", [cdf, target]), g.node("Less", [cdf, total])])
    count = g.node("ReduceSum", [g.cast(below, np.float32), g.const([axis], np.int64)], keepdims=0)
    return g.cast(count, np.int64)


VARIANTS = ((False, False), (False, True), (True, False), (True, True))  # (controlled, filtered)
_PREBUILT: dict[tuple[bool, bool], bytes] = {}  # read_graphs: the variants another process built


@functools.cache
def graph(controlled: bool, filtered: bool = True) -> bytes:
    """The serialized sampler graph (see the module docstring). Without ``filtered`` it has no top-k / top-p
    path: a batch where no row asks for either runs that smaller graph, and its rows pick the same."""
    return _PREBUILT.get((controlled, filtered)) or _graph(controlled, filtered)


def _file(folder: str | Path, controlled: bool, filtered: bool) -> Path:
    return Path(folder) / f"sampler-{controlled:d}{filtered:d}.onnx"


def write_graphs(folder: str | Path) -> None:
    """Builds every variant once and writes it into ``folder``. The server does this at start, and its engine
    core processes read them (``read_graphs``): building needs the onnx package, whose import costs a process
    0.7 s of CPU, which a core's start, restart or reload would otherwise pay each time."""
    for controlled, filtered in VARIANTS:
        _file(folder, controlled, filtered).write_bytes(graph(controlled, filtered))


def read_graphs(folder: str | Path) -> None:
    """Takes the variants ``write_graphs`` wrote into ``folder`` (an engine core process)."""
    for controlled, filtered in VARIANTS:
        _PREBUILT[(controlled, filtered)] = _file(folder, controlled, filtered).read_bytes()


@dataclass
class SamplerInputs:
    """The controlled variant's extra inputs for B rows (rows that use none hold the neutral values)."""

    bias: np.ndarray  # float32 [B, V]: logit_bias plus -inf where a constraint forbids the character
    counts: np.ndarray  # float32 [B, V]: characters generated so far, per character
    presence: np.ndarray  # float32 [B]
    frequency: np.ndarray  # float32 [B]
    repetition: np.ndarray  # float32 [B], 1 = off
    n_top: int = 1  # alternatives per row in the log-probabilities (>= 1)

    @classmethod
    def neutral(cls, rows: int, vocab: int) -> "SamplerInputs":
        return cls(bias=np.zeros((rows, vocab), np.float32), counts=np.zeros((rows, vocab), np.float32),
                   presence=np.zeros(rows, np.float32), frequency=np.zeros(rows, np.float32),
                   repetition=np.ones(rows, np.float32))


def feeds(temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, u: np.ndarray,
          controls: SamplerInputs | None = None, n_top: bool = True) -> dict[str, np.ndarray]:
    """The sampler's inputs but the logits, as host arrays of the graph's types: ``u`` [B] (or [B, K] for the
    K-step graph, decode_graph.py); with ``controls`` the controlled variant's too (``n_top``: and the number of
    alternatives, for a graph that returns log-probabilities)."""
    out = {"temperature": np.ascontiguousarray(temperature, np.float32),
           "top_k": np.ascontiguousarray(top_k, np.int64),
           "top_p": np.ascontiguousarray(top_p, np.float32),
           "u": np.ascontiguousarray(u, np.float32)}
    if controls is not None:
        out.update({name: np.ascontiguousarray(getattr(controls, name), np.float32)
                    for name in ("bias", "counts", "presence", "frequency", "repetition")})
        if n_top:
            out["n_top"] = np.array([controls.n_top], np.int64)
    return out


@dataclass
class Picked:
    """What the sampler returns for B rows: ids, and with controls the log-probabilities."""

    ids: np.ndarray  # int64 [B, 1]
    logprob: np.ndarray | None = None  # float32 [B, 1]: log p(chosen) under the raw logits
    top_logprobs: np.ndarray | None = None  # float32 [B, n_top], descending
    top_ids: np.ndarray | None = None  # int64 [B, n_top]


class Sampler:
    """Both graph variants as onnxruntime sessions on one device."""

    def __init__(self, providers: list | None = None, threads: int = 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # [B, V] work with V ~ 100: threads cost more than they give
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers or CPU
        self._sessions = {(c, f): ort.InferenceSession(graph(c, f), opts, providers=providers) for c, f in VARIANTS}

    def sample(self, logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
               u: np.ndarray, controls: SamplerInputs | None = None) -> Picked:
        """Host arrays in, host arrays out. logits float32 [B, 1, V] or [B, V]; the rest [B]."""
        if logits.ndim == 2:
            logits = logits[:, None, :]
        inputs = {"logits": np.ascontiguousarray(logits, np.float32),
                  **feeds(temperature, top_k, top_p, u, controls)}
        session = self.session(controls is not None, filtered(inputs["temperature"], inputs["top_k"],
                                                              inputs["top_p"], logits.shape[-1]))
        if controls is None:
            return Picked(session.run(None, inputs)[0])
        ids, logprob, top_lp, top_id = session.run(None, inputs)
        return Picked(ids, logprob, top_lp, top_id)

    def session(self, controlled: bool, filtered: bool = True) -> ort.InferenceSession:
        """The session of one variant, for callers that bind device memory (cudaops.py)."""
        return self._sessions[(controlled, filtered)]


def filtered(temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, vocab: int) -> bool:
    """Whether some row samples with top-k or top-p (and so needs the graph's sorted path)."""
    on = ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0)
    return bool((on & (temperature > 0)).any())
