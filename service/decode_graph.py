"""K characters of every row in one onnxruntime call: the model step and the sampler, fused K times.

``build_decode_graph`` reads an exported model file and writes one ONNX graph
that, for k = 1..K, runs the model's step on each row's last character, the
sampler graph (sampler.py, the one sampler definition; its nodes are copied in,
not rewritten) on the logits with the row's k-th uniform ``u[:, k-1]``, and
feeds the drawn id to step k + 1. One call replaces K calls of ``model.run``
plus K sampler calls, and gives the same ids: the nodes are the same nodes, on
the same kernels (tests/test_decode_graph.py checks the equality).

Inputs (B rows, V characters, L layers, H hidden):

- ``tokens`` int64 [B, 1]: each row's last character; the model's state
  inputs (``h``, and ``c`` for an LSTM) [L, B, H], as in the model file;
- ``temperature`` [B], ``top_k`` int64 [B], ``top_p`` [B]: as the sampler's;
- ``u`` float32 [B, K]: each row's uniforms for its next K characters
  (sampling.uniforms at positions n .. n + K - 1);
- controlled: ``bias`` [B, V] (logit_bias, -inf where a character is
  forbidden; the same for all K steps), ``counts`` [B, V], ``presence``,
  ``frequency``, ``repetition`` [B]; ``n_top`` int64 [1] with logprobs;
- regex (controlled only): ``transitions`` int32 [S, V] (automata.py's global
  table), ``allowed`` float32 [S, V] (0 where the state allows a character,
  -inf elsewhere: ``allowed_bias``), ``automaton_state`` int32 [B]. Each step
  adds the row's ``allowed[state]`` to its bias, samples, and moves the state
  to ``transitions[state, id]``. A row whose match is complete has every
  character forbidden: its draw is kept inside the vocabulary (Clip), and the
  caller ends the row there.

Outputs: ``ids`` int64 [B, K], the model's state outputs (``h_out``, ``c_out``)
after K steps; controlled: ``counts_out`` [B, V] (the input counts plus one for
each character drawn); with logprobs ``logprob`` [B, K], ``top_logprobs``
float32 [B, K, n_top], ``top_ids`` int64 [B, K, n_top]; regex:
``automaton_state_out`` int32 [B].

A row that should stop inside the K characters (a stop sequence, a complete
regex match, its length) goes on in the graph: the caller keeps the ids up to
the stop and drops the rest (and that row's state, which has moved on).

Two shapes of the same computation: K copies of the step's nodes (unrolled,
each step's names prefixed ``k<step>/``, the weights shared once), or an ONNX
Loop whose body is one step. Both give the same ids. On the CPU
(bench/kstep.py, bench/results/kstep-2x256.md) the unrolled graph is ahead at
K <= 4 (the Loop operator's own cost per call and per iteration), and the two
are level within the noise of a shared machine at K = 8 and 16; the unrolled
graph is the default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from charrnn.service import sampler as sampler_graphs
from charrnn.service.runtime import CPU_PROVIDER, CUDA_PROVIDER, State, session_options
from charrnn.service.sampler import SamplerInputs

from charrnn import modelfile as mf

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger("charrnn.service.decode_graph")
LOGPROB_OUTPUTS = ("logprob", "top_logprobs", "top_ids")  # the controlled sampler's, per step
STEPS_KEY = "charrnn.decode_steps"  # metadata: K


def build_decode_graph(model_path_or_bytes: str | Path | bytes, steps: int, *, filtered: bool,
                       controlled: bool = False, logprobs: bool = False, regex: bool = False,
                       loop: bool = False, lowered: bool = False) -> bytes:
    """The serialized K-step decode graph of a model file (see the module docstring).

    ``filtered`` takes the sampler's top-k / top-p path (without it, rows pick as if neither were
    asked, like the sampler's plain variant); ``logprobs`` (controlled only) adds the
    log-probabilities of each step; ``regex`` (controlled only) the automaton inputs; ``loop``
    builds an ONNX Loop instead of K unrolled copies; ``lowered``: the model's recurrent operators as
    MatMul and element-wise nodes (cells.py; not bit for bit the operators', so not the engine's).
    """
    import onnx
    from onnx import checker, compose, helper, version_converter

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if (logprobs or regex) and not controlled:
        raise ValueError("logprobs and regex need controlled=True (the controlled sampler)")
    model = (onnx.load_from_string(model_path_or_bytes) if isinstance(model_path_or_bytes, (bytes, bytearray))
             else onnx.load(str(model_path_or_bytes)))
    meta = mf.ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    sampler = onnx.load_from_string(sampler_graphs.graph(controlled, filtered))
    opset = max(_opset(model), _opset(sampler))
    if _opset(model) < opset:
        model = version_converter.convert_version(model, opset)
    if _opset(sampler) < opset:
        sampler = version_converter.convert_version(sampler, opset)
    if lowered:
        from charrnn.service.cells import lower_cells

        model = lower_cells(model)
    # The sampler's constants (c0, c1, ...) once, under names the model cannot have.
    sampler_graph = compose.add_prefix_graph(sampler.graph, "sampler/", rename_nodes=False, rename_edges=False,
                                             rename_inputs=False, rename_outputs=False, rename_value_infos=False)
    b = _Builder(model.graph, sampler_graph, meta, steps, controlled, logprobs, regex)
    graph = b.loop() if loop else b.unrolled()

    imports = {(o.domain, o.version) for o in model.opset_import if o.domain not in ("", "ai.onnx")}
    out = helper.make_model(graph, ir_version=max(model.ir_version, sampler.ir_version),
                            opset_imports=[helper.make_opsetid("", opset),
                                           *(helper.make_opsetid(d, v) for d, v in sorted(imports))],
                            producer_name="charrnn.decode_graph")
    for p in model.metadata_props:
        out.metadata_props.add(key=p.key, value=p.value)
    out.metadata_props.add(key=STEPS_KEY, value=str(steps))
    checker.check_model(out, full_check=True)
    return out.SerializeToString()


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


class _Builder:
    """Nodes, inputs and outputs of the decode graph; ``unrolled()`` / ``loop()`` return the GraphProto."""

    def __init__(self, model, sampler, meta: mf.ModelMetadata, steps: int, controlled: bool, logprobs: bool,
                 regex: bool):
        from onnx import TensorProto, helper

        self.h = helper
        self.FLOAT, self.INT64 = TensorProto.FLOAT, TensorProto.INT64
        self.model, self.sampler, self.meta, self.steps = model, sampler, meta, steps
        self.controlled, self.logprobs, self.regex = controlled, logprobs, regex
        self.state_pairs = meta.state_names()
        self.inits = list(model.initializer) + list(sampler.initializer)
        self.init_names = {t.name for t in self.inits}
        self.nodes: list = []
        self._n = 0

    # -- small helpers ------------------------------------------------------------------------------
    def const(self, value, dtype) -> str:
        from onnx import numpy_helper

        name = f"decode/c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, into: list | None = None, **attrs) -> str:
        if out is None:
            self._n += 1
            out = f"decode/t{self._n}"
        (self.nodes if into is None else into).append(self.h.make_node(op, inputs, [out], **attrs))
        return out

    def tensor(self, name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
        return self.h.make_tensor_value_info(name, elem, dims)

    def inputs(self) -> list:
        from onnx import TensorProto as T

        V = self.meta.vocab_size
        model_inputs = {i.name: i for i in self.model.input}
        vis = [self.tensor(mf.INPUT_TOKENS, T.INT64, ["batch", 1])]
        vis += [model_inputs[i] for i, _ in self.state_pairs]
        vis += [self.tensor("temperature", T.FLOAT, ["batch"]), self.tensor("top_k", T.INT64, ["batch"]),
                self.tensor("top_p", T.FLOAT, ["batch"]), self.tensor("u", T.FLOAT, ["batch", self.steps])]
        if self.controlled:
            vis += [self.tensor("bias", T.FLOAT, ["batch", V]), self.tensor("counts", T.FLOAT, ["batch", V]),
                    self.tensor("presence", T.FLOAT, ["batch"]), self.tensor("frequency", T.FLOAT, ["batch"]),
                    self.tensor("repetition", T.FLOAT, ["batch"])]
        if self.logprobs:
            vis.append(self.tensor("n_top", T.INT64, [1]))
        if self.regex:
            vis += [self.tensor("transitions", T.INT32, ["states", V]), self.tensor("allowed", T.FLOAT, ["states", V]),
                    self.tensor("automaton_state", T.INT32, ["batch"])]
        return vis

    def outputs(self) -> list:
        from onnx import TensorProto as T

        model_outputs = {o.name: o for o in self.model.output}
        vis = [self.tensor("ids", T.INT64, ["batch", self.steps])]
        vis += [model_outputs[o] for _, o in self.state_pairs]
        if self.controlled:
            vis.append(self.tensor("counts_out", T.FLOAT, ["batch", self.meta.vocab_size]))
        if self.logprobs:
            vis += [self.tensor("logprob", T.FLOAT, ["batch", self.steps]),
                    self.tensor("top_logprobs", T.FLOAT, ["batch", self.steps, "n_top"]),
                    self.tensor("top_ids", T.INT64, ["batch", self.steps, "n_top"])]
        if self.regex:
            vis.append(self.tensor("automaton_state_out", T.INT32, ["batch"]))
        return vis

    def copy(self, graph, prefix: str, sources: dict[str, str]) -> tuple[list, dict[str, str]]:
        """``graph``'s nodes with every edge prefixed, its inputs read from ``sources``; and its outputs' new names.

        Initializers keep their names: every copy reads the one tensor."""
        from onnx import GraphProto, compose

        g = GraphProto()
        g.node.extend(graph.node)
        g.input.extend(i for i in graph.input if i.name not in self.init_names)
        g.output.extend(graph.output)
        compose.add_prefix_graph(g, prefix, rename_inputs=False, rename_initializers=False, rename_value_infos=False,
                                 inplace=True, name_map=dict(sources))
        return list(g.node), {o.name: prefix + o.name for o in graph.output}

    def step(self, prefix: str, tokens: str, state: list[str], u: str, counts: str | None, astate: str | None,
             into: list) -> dict:
        """One model step and one sampler call, appended to ``into``; returns the names of what it made."""
        bias = "bias"
        if astate is not None:  # the row's automaton state forbids characters: -inf added to its bias
            bias = self.node("Add", ["bias", self.node("Gather", [self.allowed, astate], into=into, axis=0)],
                             into=into)
        sources = {mf.INPUT_TOKENS: tokens, **{i: s for (i, _), s in zip(self.state_pairs, state)}}
        nodes, made = self.copy(self.model, prefix, sources)
        into.extend(nodes)
        sources = {"logits": made[mf.OUTPUT_LOGITS], "u": u}
        if counts is not None:
            sources.update(counts=counts, bias=bias)
        nodes, picked = self.copy(self.sampler, prefix + "s/", sources)
        into.extend(nodes)
        out = {"ids": picked["ids"], "state": [made[o] for _, o in self.state_pairs]}
        if self.logprobs:
            out.update({k: picked[k] for k in LOGPROB_OUTPUTS})
        if counts is not None:  # counts += one-hot of the drawn ids
            hit = self.node("Equal", [picked["ids"], self.vocab_row], into=into)
            out["counts"] = self.node("Add", [counts, self.node("Cast", [hit], into=into, to=self.FLOAT)], into=into)
        if astate is not None:  # state = transitions[state, id]
            # A row whose match is complete has every character forbidden, and what it draws is not used
            # (it ends there); its id is kept inside the vocabulary so that no gather below can fail.
            out["ids"] = picked["ids"] = self.node("Clip", [picked["ids"], self.zero64, self.last_id], into=into)
            flat = self.node("Add", [self.node("Mul", [self.node("Cast", [astate], into=into, to=self.INT64), self.vocab],
                                               into=into),
                                     self.node("Squeeze", [picked["ids"], self.axis1], into=into)], into=into)
            out["astate"] = self.node("Gather", [self.flat_transitions, flat], into=into, axis=0)
        return out

    def shared(self) -> None:
        """Constants and the tensors every step reads, made once at the top of the graph."""
        V = self.meta.vocab_size
        self.axis1 = self.const([1], np.int64)
        self.vocab_row = self.const(np.arange(V, dtype=np.int64)[None, :], np.int64)  # [1, V]
        self.vocab = self.const(V, np.int64)
        if self.regex:
            self.allowed = "allowed"
            self.flat_transitions = self.node("Reshape", ["transitions", self.const([-1], np.int64)])
            self.zero64, self.last_id = self.const(0, np.int64), self.const(V - 1, np.int64)

    # -- the two shapes -----------------------------------------------------------------------------
    def unrolled(self):
        self.shared()
        tokens, state = mf.INPUT_TOKENS, [i for i, _ in self.state_pairs]
        counts = "counts" if self.controlled else None
        astate = "automaton_state" if self.regex else None
        per_step: list[dict] = []
        for k in range(self.steps):
            u = self.node("Gather", ["u", self.const(k, np.int64)], axis=1)  # [B]
            out = self.step(f"k{k + 1}/", tokens, state, u, counts, astate, self.nodes)
            per_step.append(out)
            tokens, state = out["ids"], out["state"]
            counts, astate = out.get("counts"), out.get("astate")
        self.join([o["ids"] for o in per_step], "ids")
        for (_, o), s in zip(self.state_pairs, state):
            self.node("Identity", [s], out=o)
        if self.controlled:
            self.node("Identity", [counts], out="counts_out")
        if self.logprobs:
            self.join([o["logprob"] for o in per_step], "logprob")
            for name in ("top_logprobs", "top_ids"):
                rows = [self.node("Unsqueeze", [o[name], self.axis1]) for o in per_step]  # [B, 1, n_top]
                self.join(rows, name)
        if self.regex:
            self.node("Identity", [astate], out="automaton_state_out")
        return self.finish(self.nodes)

    def join(self, names: list[str], out: str) -> None:
        """``out`` = the steps' [B, 1, ...] tensors joined along axis 1."""
        if len(names) > 1:
            self.node("Concat", names, out=out, axis=1)
        else:
            self.node("Identity", names, out=out)

    def loop(self):
        from onnx import TensorProto as T

        self.shared()
        body: list = []
        model_inputs = {i.name: i for i in self.model.input}
        V = self.meta.vocab_size
        carried = [(mf.INPUT_TOKENS, self.tensor("b/tokens", T.INT64, ["batch", 1]))]
        carried += [(i, _renamed(model_inputs[i], "b/" + i)) for i, _ in self.state_pairs]
        if self.controlled:
            carried.append(("counts", self.tensor("b/counts", T.FLOAT, ["batch", V])))
        if self.regex:
            carried.append(("automaton_state", self.tensor("b/automaton_state", T.INT32, ["batch"])))
        b_in = [self.tensor("b/iter", T.INT64, []), self.tensor("b/cond", T.BOOL, [])] + [vi for _, vi in carried]
        u = self.node("Gather", ["u", "b/iter"], into=body, axis=1)
        out = self.step("b/", "b/tokens", [f"b/{i}" for i, _ in self.state_pairs], u,
                        "b/counts" if self.controlled else None, "b/automaton_state" if self.regex else None, body)
        b_out = [self.node("Identity", ["b/cond"], out="b/out/cond", into=body)]
        b_out.append(self.node("Identity", [out["ids"]], out="b/out/tokens", into=body))
        b_out += [self.node("Identity", [s], out=f"b/out/{i}", into=body) for (i, _), s in zip(self.state_pairs,
                                                                                              out["state"])]
        if self.controlled:
            b_out.append(self.node("Identity", [out["counts"]], out="b/out/counts", into=body))
        if self.regex:
            b_out.append(self.node("Identity", [out["astate"]], out="b/out/automaton_state", into=body))
        scans = ["ids"] + (["logprob", "top_logprobs", "top_ids"] if self.logprobs else [])
        b_out += [self.node("Identity", [out[s]], out=f"b/out/scan_{s}", into=body) for s in scans]
        types = {"ids": T.INT64, "logprob": T.FLOAT, "top_logprobs": T.FLOAT, "top_ids": T.INT64}
        out_vis = [self.tensor("b/out/cond", T.BOOL, []), self.tensor("b/out/tokens", T.INT64, ["batch", 1])]
        out_vis += [_renamed(model_inputs[i], f"b/out/{i}") for i, _ in self.state_pairs]
        if self.controlled:
            out_vis.append(self.tensor("b/out/counts", T.FLOAT, ["batch", V]))
        if self.regex:
            out_vis.append(self.tensor("b/out/automaton_state", T.INT32, ["batch"]))
        out_vis += [self.tensor(f"b/out/scan_{s}", types[s], ["batch", None]) for s in scans]
        body = _prune(body, b_out)
        body_graph = self.h.make_graph(body, "charrnn_decode_step", b_in, out_vis)

        finals = ["loop/tokens"] + [o for _, o in self.state_pairs]
        if self.controlled:
            finals.append("counts_out")
        if self.regex:
            finals.append("automaton_state_out")
        stacked = [f"loop/{s}" for s in scans]  # [K, B, ...]
        self.nodes.append(self.h.make_node("Loop", [self.const(self.steps, np.int64), ""] + [n for n, _ in carried],
                                           finals + stacked, body=body_graph))
        ids = self.node("Transpose", ["loop/ids"], perm=[1, 0, 2])  # [B, K, 1]
        self.node("Squeeze", [ids, self.const([2], np.int64)], out="ids")
        if self.logprobs:
            lp = self.node("Transpose", ["loop/logprob"], perm=[1, 0, 2])
            self.node("Squeeze", [lp, self.const([2], np.int64)], out="logprob")
            for name in ("top_logprobs", "top_ids"):
                self.node("Transpose", [f"loop/{name}"], out=name, perm=[1, 0, 2])
        return self.finish(self.nodes)

    def finish(self, nodes: list):
        outputs = self.outputs()
        nodes = _prune(nodes, [o.name for o in outputs])
        used = _used(nodes)  # every input stays (a variant that ignores top_k takes it all the same)
        inits = [t for t in self.inits if t.name in used]
        return self.h.make_graph(nodes, "charrnn_decode", self.inputs(), outputs, initializer=inits)


def _renamed(vi, name: str):
    from onnx import ValueInfoProto

    out = ValueInfoProto()
    out.CopyFrom(vi)
    out.name = name
    return out


def _node_inputs(node) -> set[str]:
    """Every name a node reads, those its subgraphs read from the outer scope included (over-approximated)."""
    names = set(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in g.node:
                names |= _node_inputs(n)
    return names


def _used(nodes: list) -> set[str]:
    names: set[str] = set()
    for n in nodes:
        names |= _node_inputs(n)
    return names


def _prune(nodes: list, outputs: list[str]) -> list:
    """The nodes (in topological order) that some of ``outputs`` needs."""
    needed, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed |= _node_inputs(n)
    return keep[::-1]


def allowed_bias(mask: np.ndarray) -> np.ndarray:
    """A bool [S, V] table of allowed characters (automata.AutomatonTable.mask) as the ``allowed`` input."""
    return np.where(mask, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


@dataclass
class AutomatonInputs:
    """The regex inputs: the global automaton table and each row's state in it."""

    transitions: np.ndarray  # int32 [S, V]
    allowed: np.ndarray  # float32 [S, V]: 0 or -inf (allowed_bias)
    state: np.ndarray  # int32 [B]


@dataclass
class Decoded:
    """What one K-step call returns besides the state."""

    ids: np.ndarray  # int64 [B, K]
    counts: np.ndarray | None = None  # float32 [B, V]: the input counts plus the K characters drawn
    logprob: np.ndarray | None = None  # float32 [B, K]
    top_logprobs: np.ndarray | None = None  # float32 [B, K, n_top]
    top_ids: np.ndarray | None = None  # int64 [B, K, n_top]
    automaton_state: np.ndarray | None = None  # int32 [B]


class DecodeGraph:
    """The K-step decode graph of one model file as onnxruntime sessions (the CPU unless ``providers`` say
    otherwise): one per sampler path, made at first use."""

    def __init__(self, model_path_or_bytes: str | Path | bytes, steps: int, *, controlled: bool = False,
                 logprobs: bool = False, regex: bool = False, loop: bool = False, threads: int = 0,
                 metadata: mf.ModelMetadata | None = None, prebuilt: dict[bool, bytes] | None = None,
                 providers: list[str] | None = None, lowered: bool = False):
        """``metadata``: the model's, when the caller has it (else read from the file); ``prebuilt``: the graphs
        already built ({filtered: bytes}, read_graphs): then this process never imports onnx; ``providers``:
        onnxruntime's (default the CPU; bench.kstep --device cuda times the graph alone on a GPU, with host
        inputs and outputs)."""
        self.providers = providers or [CPU_PROVIDER]
        self.source = model_path_or_bytes
        self.steps, self.controlled, self.logprobs, self.regex, self.loop = steps, controlled, logprobs, regex, loop
        self.lowered = lowered
        self.threads = threads
        self._prebuilt = dict(prebuilt or {})
        self._sessions: dict[bool, ort.InferenceSession] = {}
        if metadata is None:
            import onnx

            model = (onnx.load_from_string(bytes(model_path_or_bytes))
                     if isinstance(model_path_or_bytes, (bytes, bytearray)) else onnx.load(str(model_path_or_bytes)))
            metadata = mf.ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
        self.metadata = metadata
        pairs = self.metadata.state_names()
        self.state_inputs = tuple(i for i, _ in pairs)
        self.state_outputs = tuple(o for _, o in pairs)

    def graph(self, filtered: bool) -> bytes:
        if filtered not in self._prebuilt:
            self._prebuilt[filtered] = build_decode_graph(self.source, self.steps, filtered=filtered,
                                                          controlled=self.controlled, logprobs=self.logprobs,
                                                          regex=self.regex, loop=self.loop, lowered=self.lowered)
        return self._prebuilt[filtered]

    def session(self, filtered: bool) -> ort.InferenceSession:
        if filtered not in self._sessions:
            self._sessions[filtered] = ort.InferenceSession(self.graph(filtered), session_options(self.threads),
                                                            providers=self.providers)
            self._prebuilt.pop(filtered)  # the session has what it needs of the bytes
        return self._sessions[filtered]

    def run(self, ids: np.ndarray, state: State, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
            u: np.ndarray, controls: SamplerInputs | None = None, automaton: AutomatonInputs | None = None,
            filtered: bool | None = None) -> tuple[np.ndarray, State]:
        """ids int64 [B] (or [B, 1]): each row's last character -> (ids int64 [B, K], state after K steps)."""
        decoded, state = self.decode(ids, state, temperature, top_k, top_p, u, controls, automaton, filtered)
        return decoded.ids, state

    def decode(self, ids: np.ndarray, state: State, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
               u: np.ndarray, controls: SamplerInputs | None = None, automaton: AutomatonInputs | None = None,
               filtered: bool | None = None) -> tuple[Decoded, State]:
        """Like ``run``, with everything the graph returns. ``filtered`` None: the sampler's rule (sampler.filtered)."""
        if (controls is None) == self.controlled:
            raise ValueError("controls are needed exactly when the graph was built with controlled=True")
        if (automaton is None) == self.regex:
            raise ValueError("automaton inputs are needed exactly when the graph was built with regex=True")
        feeds = {
            mf.INPUT_TOKENS: np.ascontiguousarray(np.reshape(ids, (-1, 1)), np.int64),
            **dict(zip(self.state_inputs, state)),  # host arrays, or OrtValues on the device path
            **sampler_graphs.feeds(temperature, top_k, top_p, u, controls, n_top=self.logprobs),
        }
        if filtered is None:
            filtered = sampler_graphs.filtered(feeds["temperature"], feeds["top_k"], feeds["top_p"],
                                               self.metadata.vocab_size)
        names = ["ids", *self.state_outputs]
        if controls is not None:
            names.append("counts_out")
            if self.logprobs:
                names += ["logprob", "top_logprobs", "top_ids"]
        if automaton is not None:
            feeds.update(transitions=np.ascontiguousarray(automaton.transitions, np.int32),
                         allowed=np.ascontiguousarray(automaton.allowed, np.float32),
                         automaton_state=np.ascontiguousarray(automaton.state, np.int32))
            names.append("automaton_state_out")
        if isinstance(state[0], ort.OrtValue):  # the device path: the state stays where it is
            from charrnn.service.cudaops import run_bound

            got = run_bound(self.session(filtered), feeds, names, set(self.state_outputs),
                            state[0].device_name().lower())
        else:
            got = dict(zip(names, self.session(filtered).run(names, feeds)))
        new_state = tuple(got[o] for o in self.state_outputs)
        return Decoded(ids=got["ids"], counts=got.get("counts_out"), logprob=got.get("logprob"),
                       top_logprobs=got.get("top_logprobs"), top_ids=got.get("top_ids"),
                       automaton_state=got.get("automaton_state_out")), new_state


class BoundDecode:
    """A plain K-step graph at one batch size, run with onnxruntime's I/O binding: the shape of a K-step call on
    CUDA (the engine's on the device path, BucketDecode; bench/kstep.py times it alone; on the CPU provider it
    must give DecodeGraph.run's ids, which tests/test_decode_graph.py checks).

    - Every input and output is an OrtValue of its own on ``device``, made once. The host writes the small
      inputs in place (tokens [B, 1], temperature, top_k, top_p [B], u [B, K]) and reads back only the ids
      [B, K].
    - The state never leaves the device: two buffers of each state tensor, one read and the other written,
      swapped at every call (a call's state input and output must not share memory, onnxruntime #32243).
    - ``cuda_graph``: the session has ``enable_cuda_graph``, and each of the two layouts is a captured graph
      of its own (run option ``gpu_graph_id``, ``graph_ids``: a state that alternates between two buffers
      needs one graph per layout, onnxruntime-genai #2446). The first call of each layout captures it, the
      later ones replay it. Whether the model's LSTM operator captures at all on the CUDA provider is what a
      device run of bench.kstep says.
    - ``session``: one to share (BucketDecode runs one session per sampler path for every batch size, each
      size its own graph ids); else one of its own.
    """

    def __init__(self, graph: DecodeGraph, batch: int, *, device: str = "cpu", cuda_graph: bool = False,
                 filtered: bool = False, session: ort.InferenceSession | None = None, graph_ids: tuple = (1, 2),
                 ops=None):
        if graph.controlled:
            raise ValueError("BoundDecode runs the plain K-step graph (controlled=False)")
        if cuda_graph and device != "cuda":
            raise ValueError("cuda_graph needs device='cuda'")
        self.session = session or bound_session(graph, filtered, device, cuda_graph)
        self.batch, self.steps, self.device = batch, graph.steps, device
        self._ops = ops  # cudaops.DeviceStateOps: copies a state from elsewhere into the buffers (run_from)
        m = graph.metadata
        rows = np.zeros(batch)
        self._inputs = {name: self._value(array) for name, array in self._feeds(
            rows, rows, rows, rows, np.zeros((batch, graph.steps))).items()}
        state = np.zeros((m.layers, batch, m.hidden), np.float32)
        self._state = [tuple(self._value(state) for _ in graph.state_inputs) for _ in range(2)]
        self._ids = self._value(np.zeros((batch, graph.steps), np.int64))
        self._bindings, self._options = [], []
        for layout in range(2):
            binding = self.session.io_binding()
            for name, value in self._inputs.items():
                binding.bind_ortvalue_input(name, value)
            for name, value in zip(graph.state_inputs, self._state[layout]):
                binding.bind_ortvalue_input(name, value)
            for name, value in zip(graph.state_outputs, self._state[1 - layout]):
                binding.bind_ortvalue_output(name, value)
            binding.bind_ortvalue_output("ids", self._ids)
            options = ort.RunOptions()
            if cuda_graph:
                options.add_run_config_entry("gpu_graph_id", str(graph_ids[layout]))  # 0 is onnxruntime's own
            self._bindings.append(binding)
            self._options.append(options)
        self._layout = 0  # the buffers that hold the state now
        self.copies = 0  # states written into the buffers from elsewhere (run_from)

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        """A buffer of its own on the device, holding a copy of ``array`` (on the CPU an OrtValue would share the
        array's memory, and two buffers made from one array would be one)."""
        return ort.OrtValue.ortvalue_from_numpy(array.copy(), self.device, 0)

    @staticmethod
    def _feeds(tokens, temperature, top_k, top_p, u) -> dict[str, np.ndarray]:
        """The small inputs as host arrays of the graph's types."""
        return {mf.INPUT_TOKENS: np.ascontiguousarray(np.reshape(tokens, (-1, 1)), np.int64),
                **sampler_graphs.feeds(temperature, top_k, top_p, u)}

    def set_state(self, state: State) -> None:
        """Writes ``state`` (host arrays [L, B, H]) into the buffers the next call reads."""
        for value, array in zip(self._state[self._layout], state):
            value.update_inplace(np.ascontiguousarray(array, np.float32))

    def state(self) -> State:
        """The state after the last call, copied to the host."""
        return tuple(np.array(v.numpy()) for v in self._state[self._layout])

    def run(self, tokens: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
            u: np.ndarray) -> np.ndarray:
        """One call from the state held: tokens [B] (or [B, 1]) -> ids int64 [B, K], copied to the host."""
        for name, array in self._feeds(tokens, temperature, top_k, top_p, u).items():
            self._inputs[name].update_inplace(array)
        self.session.run_with_iobinding(self._bindings[self._layout], self._options[self._layout])
        self._layout = 1 - self._layout
        return np.array(self._ids.numpy())

    def run_from(self, state: State, tokens: np.ndarray, temperature: np.ndarray, top_k: np.ndarray,
                 top_p: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, State]:
        """One call from ``state`` (OrtValues [L, B, H] on the device) -> (ids [B, K], the state after it: the
        buffers now holding it, which the caller passes back to the next call). A state that is not those
        buffers (rows joined, left or moved since: slots.py) is copied into them on the device first."""
        held = self._state[self._layout]
        if any(a is not b for a, b in zip(state, held)):
            for source, into in zip(state, held):
                self._ops.copy(source, into)
            self.copies += 1
        ids = self.run(tokens, temperature, top_k, top_p, u)
        return ids, self._state[self._layout]


def bound_session(graph: DecodeGraph, filtered: bool, device: str, cuda_graph: bool) -> ort.InferenceSession:
    """A session of ``graph``'s plain K-step graph for bound calls on ``device`` (CUDA: with
    ``enable_cuda_graph`` when ``cuda_graph``; onnxruntime refuses it when a compute node of the graph would
    run on the CPU)."""
    cuda = (CUDA_PROVIDER, {"enable_cuda_graph": "1"} if cuda_graph else {})
    return ort.InferenceSession(graph.graph(filtered), session_options(graph.threads),
                                providers=[cuda, CPU_PROVIDER] if device == "cuda" else [CPU_PROVIDER])


class BucketDecode:
    """The engine's plain K-step call on the device path (rows without controls): a BoundDecode per batch size
    and sampler path, made at its first call, on one session per sampler path. The engine's extents there are
    multiples of slots.BUCKET (with CUDA graphs, slots.captured_extents), so there are few sizes; the state stays in each size's buffers from call to call,
    and is copied into them when the batch's rows changed (a join, an end, a compaction) or the size did.

    ``cuda_graph`` (--cuda-graphs on, CUDA only): each size's two layouts of the unfiltered path are captured
    CUDA graphs (graph ids 2i + 1 and 2i + 2 for the i-th size). A batch where some row asks for top-k or top-p
    runs the filtered path bound, uncaptured: its sorted path gathers the rows that filter (NonZero), a shape
    that changes with the data, which a captured graph cannot follow. onnxruntime keeps a captured graph in the context of the
    thread that ran the capture, and a capture fails if another thread makes a CUDA call meanwhile, so
    ``prepare`` runs a trial and captures every batch size, on the thread that will make the calls, before
    any stream's call (Batch.prepare). Where onnxruntime refuses it (a session it cannot capture, a capture
    that fails, or a trial whose captured ids differ from the uncaptured graph's), the model runs without it
    and the log says why (``why_not``).
    """

    def __init__(self, graph: DecodeGraph, device: str, ops, cuda_graph: bool = False, label: str = ""):
        self.graph, self.device, self._ops, self.label = graph, device, ops, label
        self.cuda_graph = cuda_graph
        self.why_not = ""  # why CUDA graphs were asked for and are off
        self._sessions: dict[bool, ort.InferenceSession] = {}
        self._bound: dict[tuple[int, bool], BoundDecode] = {}
        self._taken = 0  # graph ids taken in the unfiltered path's session, two a batch size
        self._sessions[True] = bound_session(graph, True, device, False)
        try:
            self._sessions[False] = bound_session(graph, False, device, cuda_graph)
        except Exception as e:  # noqa: BLE001 - onnxruntime's refusal, whatever its type
            self._without_cuda_graph(f"{type(e).__name__}: {e}")

    def prepare(self, sizes: list[int]) -> None:
        """With CUDA graphs: the trial, then every batch size of ``sizes`` captured (``warm``), on this thread:
        the one that makes the calls. Without: nothing (a size's runner is made at its first call)."""
        if not self.cuda_graph:
            return
        try:
            self._trial()
            self.warm(sizes)
        except Exception as e:  # noqa: BLE001 - onnxruntime's refusal, whatever its type
            self._without_cuda_graph(f"{type(e).__name__}: {e}")

    def _without_cuda_graph(self, why: str) -> None:
        if not self.cuda_graph:
            raise RuntimeError(why)
        log.warning("CUDA graphs off for %s: %s", self.label or "a model", why)
        self.cuda_graph, self.why_not = False, why
        self._bound = {key: runner for key, runner in self._bound.items() if key[1]}  # the filtered: uncaptured
        self._sessions[False] = bound_session(self.graph, False, self.device, False)

    def _trial(self) -> None:
        """Eight calls of a small batch captured (onnxruntime captures a graph id at its third run, and each of
        the two layouts is then replayed with new inputs) against the same calls without capture: a capture
        that is wrong without failing (an operator that copies host arrays at each call, say) shows here as
        different ids or state, before any stream depends on it."""
        from charrnn.service.slots import BUCKET

        rng = np.random.default_rng(0)
        m = self.graph.metadata
        state = tuple(rng.standard_normal((m.layers, BUCKET, m.hidden)).astype(np.float32)
                      for _ in self.graph.state_inputs)
        tokens = rng.integers(0, m.vocab_size, BUCKET)
        ones, zeros = np.ones(BUCKET, np.float32), np.zeros(BUCKET, np.int64)
        u = [rng.random((BUCKET, self.graph.steps)) for _ in range(8)]
        answers = []
        for session, cuda_graph in ((self._sessions[False], True), (bound_session(self.graph, False, self.device,
                                                                                  False), False)):
            runner = BoundDecode(self.graph, BUCKET, device=self.device, cuda_graph=cuda_graph, session=session,
                                 graph_ids=(1, 2))
            runner.set_state(state)
            got = []
            for call in u:  # each call's ids are the next call's last characters
                got.append(runner.run(tokens if not got else got[-1][:, -1], ones, zeros, ones, call))
            answers.append((got, runner.state()))
        if not agree(*answers):
            raise RuntimeError("a captured K-step call's ids or state differed from the uncaptured call's")
        release = getattr(self._sessions[False], "release_captured_graph", None)  # onnxruntime >= 1.2x
        for graph_id in (1, 2) if release is not None else ():
            release(graph_id)  # the trial's buffers go; its ids are not used again
        self._taken = 1  # the trial took graph ids 1 and 2

    def warm(self, sizes: list[int]) -> None:
        """Makes the unfiltered path's runners of these batch sizes and runs each layout three times (with CUDA
        graphs: onnxruntime captures a graph id at its third run), so that no stream's call pays for a
        capture. What the calls write is overwritten: a stream's state is copied in before its call."""
        for batch in sizes:
            runner = self._runner(batch, False)
            rows, top_k = np.ones(batch, np.float32), np.zeros(batch, np.int64)
            for _ in range(6):  # from the zeros its buffers hold: no state needs copying in
                runner.run(np.zeros(batch, np.int64), rows, top_k, rows,
                           np.full((batch, self.graph.steps), 0.5, np.float32))

    def decode(self, tokens: np.ndarray, state: State, temperature: np.ndarray, top_k: np.ndarray,
               top_p: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, State]:
        """tokens [B, 1], state OrtValues [L, B, H], u [B, K] -> (ids [B, K], state after the call)."""
        batch = len(tokens)
        filtered = sampler_graphs.filtered(np.asarray(temperature), np.asarray(top_k), np.asarray(top_p),
                                           self.graph.metadata.vocab_size)
        try:
            return self._runner(batch, filtered).run_from(state, tokens, temperature, top_k, top_p, u)
        except Exception as e:  # noqa: BLE001 - a capture onnxruntime could not make
            if not self.cuda_graph or filtered:
                raise
            self._without_cuda_graph(f"the call of {batch} rows failed under capture: {type(e).__name__}: {e}")
            return self._runner(batch, filtered).run_from(state, tokens, temperature, top_k, top_p, u)

    def _runner(self, batch: int, filtered: bool) -> BoundDecode:
        runner = self._bound.get((batch, filtered))
        if runner is None:
            captured = self.cuda_graph and not filtered
            i = self._taken
            self._taken += captured
            runner = self._bound[(batch, filtered)] = BoundDecode(
                self.graph, batch, device=self.device, cuda_graph=captured, filtered=filtered,
                session=self._sessions[filtered], graph_ids=(2 * i + 1, 2 * i + 2), ops=self._ops)
        return runner


def agree(a: tuple[list, tuple], b: tuple[list, tuple]) -> bool:
    """Whether two runs of the same calls ((ids of each call, final state)) gave the same ids and, within
    float tolerance, the same state."""
    (ids_a, state_a), (ids_b, state_b) = a, b
    return (all(np.array_equal(x, y) for x, y in zip(ids_a, ids_b))
            and all(np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(state_a, state_b)))


# The variants the engine runs (Decoder): rows without controls, and rows with bias, penalties,
# log-probabilities or a regex (its automaton stepped in the graph); each with and without the top-k /
# top-p path.
ENGINE_VARIANTS = tuple((controlled, filtered) for controlled in (False, True) for filtered in (False, True))


def _graph_file(prefix: str | Path, controlled: bool, filtered: bool) -> Path:
    return Path(f"{prefix}-{'controlled' if controlled else 'plain'}{'-filtered' if filtered else ''}.onnx")


def write_graphs(model_path: str | Path, steps: int, prefix: str | Path) -> None:
    """Builds the engine's K-step graphs of ``model_path`` into files named ``prefix``-...; the server does this
    before it starts a core process (which then reads them, without the onnx package: read_graphs)."""
    for controlled, filtered in ENGINE_VARIANTS:
        _graph_file(prefix, controlled, filtered).write_bytes(
            build_decode_graph(model_path, steps, filtered=filtered, controlled=controlled, logprobs=controlled,
                               regex=controlled))


def read_graphs(prefix: str | Path) -> dict[tuple[bool, bool], bytes]:
    """What write_graphs wrote: {(controlled, filtered): bytes}."""
    return {(c, f): _graph_file(prefix, c, f).read_bytes() for c, f in ENGINE_VARIANTS}


def remove_graphs(prefix: str | Path) -> None:
    """Deletes what write_graphs wrote (those that exist)."""
    for c, f in ENGINE_VARIANTS:
        _graph_file(prefix, c, f).unlink(missing_ok=True)


class Decoder:
    """The K-step decode of the engine (batch.py): the plain graph, or the controlled one (bias, penalties,
    log-probabilities and each row's regex automaton) when some row has a control; sessions made at once (no
    first-call pause), on the model's device. On the device path (cudaops.py) the state stays on the device and
    only ids (and log-probabilities, counts) come back: the plain graph runs bound to fixed buffers per batch
    size (BucketDecode; with ``cuda_graphs``, --cuda-graphs on, as captured CUDA graphs), the controlled one
    bound at each call."""

    def __init__(self, model, steps: int, threads: int = 0, prebuilt: dict[tuple[bool, bool], bytes] | None = None,
                 cuda_graphs: bool = False):
        prebuilt = prebuilt or {}
        self.steps = steps
        self.graphs = {
            controlled: DecodeGraph(model.path, steps, controlled=controlled, logprobs=controlled, regex=controlled,
                                    threads=threads, metadata=model.metadata,
                                    prebuilt={f: prebuilt[(controlled, f)] for f in (False, True)
                                              if (controlled, f) in prebuilt},
                                    providers=[CUDA_PROVIDER, CPU_PROVIDER] if model.device == "cuda" else None)
            for controlled in (False, True)}
        self.bucketed = None  # the device path's plain calls
        if model.device_path:
            self.bucketed = BucketDecode(self.graphs[False], model.device, model.state_ops,
                                         cuda_graphs and model.device == "cuda", model.label)
        for controlled, g in self.graphs.items():
            if controlled or self.bucketed is None:
                for filtered in (False, True):
                    g.session(filtered)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the plain calls run as captured CUDA graphs."""
        return self.bucketed is not None and self.bucketed.cuda_graph

    def decode(self, tokens: np.ndarray, state: State, temperature: np.ndarray, top_k: np.ndarray,
               top_p: np.ndarray, u: np.ndarray, controls: SamplerInputs | None,
               automaton: AutomatonInputs | None = None) -> tuple[Decoded, State]:
        """tokens int64 [B, 1], u [B, K] -> (Decoded: ids [B, K] and, with controls, log-probabilities; state).
        With controls, ``automaton``: the regex table and each row's state in it (the bias then leaves the
        regex's mask out: the graph adds it at each step)."""
        if controls is None and self.bucketed is not None:
            ids, state = self.bucketed.decode(tokens, state, temperature, top_k, top_p, u)
            return Decoded(ids=ids), state
        return self.graphs[controls is not None].decode(tokens, state, temperature, top_k, top_p, u, controls,
                                                        automaton)
