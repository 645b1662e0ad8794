"""Opening a model file and recording its recurrent state at every character of a text.

The inspector reads the exported ONNX file (docs/model-format.md), not a
training checkpoint, so it runs on the bundled model of a fresh clone without
torch. The graph gives back its state only after the last step of a call, so
the text goes through it one character per call (steps = 1) and each call's
``h_out`` / ``c_out`` is the state after that character: exact, and for a few
thousand characters a second or two on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from charrnn import modelfile as mf


class InspectError(ValueError):
    """Input the inspector cannot use; the message names it, the value seen and what is allowed."""




@dataclass(frozen=True)
class InspectedModel:
    path: Path  # the model.onnx file
    label: str  # "name@version" inside a repository, else the file name
    meta: mf.ModelMetadata
    session: ort.InferenceSession  # on the CPU

    def describe(self) -> str:
        m = self.meta
        loss = "" if m.val_loss != m.val_loss else f", val loss {m.val_loss:.3f} nats/char"
        return f"{self.label}: {m.cell} {m.layers}x{m.hidden}, {m.vocab_size} characters{loss}"


def _versions(folder: Path) -> list[int]:
    return sorted(
        int(p.name) for p in folder.iterdir() if mf.is_version(p.name) and (p / mf.MODEL_FILE).is_file()
    )


def resolve_model(spec: str | os.PathLike) -> tuple[Path, str]:
    """(model file, label) for a .onnx path, a version folder, a model folder or a one-model repository."""
    p = Path(spec)
    if p.is_file():
        if p.name == mf.MODEL_FILE and mf.is_version(p.parent.name):
            return p, f"{p.parent.parent.name}@{p.parent.name}"
        return p, p.name
    if not p.is_dir():
        raise InspectError(f"MODEL {str(spec)!r} is neither a file nor a folder")
    if (p / mf.MODEL_FILE).is_file():
        return resolve_model(p / mf.MODEL_FILE)
    found = _versions(p)
    if found:  # MODELS/<name>: the newest version, as the service serves it
        return p / str(found[-1]) / mf.MODEL_FILE, f"{p.name}@{found[-1]}"
    names = sorted(q.name for q in p.iterdir() if q.is_dir() and _versions(q))
    if len(names) == 1:
        return resolve_model(p / names[0])
    if names:
        raise InspectError(
            f"MODEL {str(spec)!r} is a model repository holding {', '.join(names)}; name one, e.g. {p / names[0]}"
        )
    raise InspectError(
        f"MODEL {str(spec)!r} holds no {mf.MODEL_FILE} (looked for {mf.MODEL_FILE}, <version>/{mf.MODEL_FILE} "
        f"and <name>/<version>/{mf.MODEL_FILE})"
    )


def open_model(spec: str | os.PathLike) -> InspectedModel:
    """Opens the model on the CPU and checks it against the model file contract."""
    path, label = resolve_model(spec)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only; onnxruntime-gpu otherwise reports its CUDA search
    opts.intra_op_num_threads = 1  # one character at a time: threads cost more than they give
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise InspectError(f"{path}: onnxruntime cannot load it: {e}") from None
    try:
        meta = mf.ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    except mf.ModelFormatError as e:
        raise InspectError(f"{path}: {e}") from None
    try:
        meta.check_io(session.get_inputs(), session.get_outputs())
    except mf.ModelFormatError as e:
        raise InspectError(f"{path}: {e} (docs/model-format.md)") from None
    return InspectedModel(path=path, label=label, meta=meta, session=session)


def encode(
    text: str, meta: mf.ModelMetadata, *, unknown: str = "error", what: str = "TEXTFILE"
) -> tuple[str, np.ndarray]:
    """(text as used, int64 ids [T]).

    ``unknown`` = "error" refuses characters outside the vocabulary; "drop" leaves them out.
    ``what`` names the input in messages (TEXTFILE, --prime).
    """
    index = {ch: i for i, ch in enumerate(meta.vocab)}
    missing = sorted({ch for ch in text if ch not in index})
    if missing and unknown == "error":
        shown = ", ".join(mf.describe_char(ch) for ch in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise InspectError(
            f"{what} holds characters the model does not know: {shown}{more}; "
            f"pass --unknown drop to leave them out"
        )
    if missing:
        text = "".join(ch for ch in text if ch in index)
    if not text:
        raise InspectError(f"{what} must hold at least one character the model knows, got none")
    return text, np.array([index[ch] for ch in text], dtype=np.int64)


@dataclass(frozen=True)
class Trace:
    text: str  # the characters run, one per step
    states: dict[str, np.ndarray]  # "c" -> tanh(c) and "h" -> h, each float32 [T, layers, hidden], in [-1, 1]
    logits: np.ndarray  # float32 [T, vocab]: scores for the character that follows each one


STATE_LABELS = {
    "c": "tanh(c), the LSTM cell state squashed into [-1, 1]",
    "h": "h, the hidden state (the layer's output)",
}


def zero_state(meta: mf.ModelMetadata, batch: int) -> dict[str, np.ndarray]:
    """Graph input name -> float32 zeros [layers, batch, hidden]."""
    return {i: np.zeros((meta.layers, batch, meta.hidden), np.float32) for i, _ in meta.state_names()}


def trace_text(model: InspectedModel, text: str, ids: np.ndarray) -> Trace:
    """Runs ``ids`` (int64 [T]) one step at a time from the zero state and keeps every step's state."""
    meta = model.meta
    T = len(ids)
    feeds = zero_state(meta, 1)
    out_names = [mf.OUTPUT_LOGITS, *(o for _, o in meta.state_names())]
    kept = {o: np.empty((T, meta.layers, meta.hidden), np.float32) for _, o in meta.state_names()}
    logits = np.empty((T, meta.vocab_size), np.float32)
    for t in range(T):
        feeds[mf.INPUT_TOKENS] = ids[t : t + 1].reshape(1, 1)  # [B=1, T=1]
        results = model.session.run(out_names, feeds)
        logits[t] = results[0][0, 0]
        for (name_in, name_out), value in zip(meta.state_names(), results[1:]):
            feeds[name_in] = value  # [L, 1, H]
            kept[name_out][t] = value[:, 0]
    states = {}
    if mf.OUTPUT_C in kept:
        states["c"] = np.tanh(kept[mf.OUTPUT_C])
    states["h"] = kept[mf.OUTPUT_H]
    return Trace(text=text, states=states, logits=logits)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities over the last axis, in float64 (temperature > 0)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [T, k], probabilities float64 [T, k]), most likely first."""
    p = softmax(logits)
    k = min(k, p.shape[-1])
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    return ids, np.take_along_axis(p, ids, axis=-1)
