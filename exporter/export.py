"""CharRNN -> one self-describing ONNX file (the contract in charrnn/modelfile.py).

The graph takes the recurrent state in and gives it back out, so one graph
serves both prefill (steps = len(prime)) and decode (steps = 1 for a whole
batch). The TorchScript exporter turns ``nn.LSTM``/``nn.GRU``/``nn.RNN`` into
the ONNX ``LSTM``/``GRU``/``RNN`` operators with explicit initial state; batch
and steps are left symbolic.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch
from torch import nn

import charrnn
from charrnn import modelfile as mf
from charrnn.exporter import DEFAULT_TOLERANCE
from charrnn.exporter.parity import DEFAULT_SHAPES, ParityResult, check_parity, cpu_session
from charrnn.training.model import CharRNN

PRODUCER_NAME = "charrnn-export"
OPSET = 17  # the oldest opset whose LSTM/GRU/RNN semantics onnxruntime runs on CPU and CUDA alike


class ExportError(RuntimeError):
    """The exported file failed a check; nothing was left at the destination."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path  # where the file would have gone
        self.reason = reason  # which check failed, with its figures


@dataclass(frozen=True)
class ExportReport:
    path: Path  # where model.onnx now lies
    size_bytes: int
    metadata: mf.ModelMetadata
    parity: tuple[ParityResult, ...]  # one per (batch, steps) checked; empty when check=False
    tolerance: float  # largest error accepted: |onnx - torch| / max(1, |torch|), logits and state

    @property
    def max_delta_logits(self) -> float:
        return max((p.max_delta_logits for p in self.parity), default=math.nan)

    @property
    def max_delta_state(self) -> float:
        return max((p.max_delta_state for p in self.parity), default=math.nan)

    @property
    def max_error(self) -> float:
        return max((p.max_error for p in self.parity), default=math.nan)


class _StateInOut(nn.Module):
    """Flattens CharRNN's (tokens, state tuple) signature into the graph's named tensors."""

    def __init__(self, model: CharRNN):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        logits, new_state = self.model(tokens, tuple(state))  # [B, T, V], ([L, B, H], ...)
        return (logits, *new_state)


def metadata_for(
    model: CharRNN,
    vocab: list[str],
    *,
    val_loss: float = math.nan,
    train_steps: int = 0,
    corpus_sha256: str = "",
    corpus_chars: int = 0,
    train_config: dict | None = None,
) -> mf.ModelMetadata:
    """The metadata a model file will carry, validated as a reader would validate it."""
    c = model.config
    if len(vocab) != c.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} characters, the model's vocab_size is {c.vocab_size}")
    for i, ch in enumerate(vocab):
        if not isinstance(ch, str) or len(ch) != 1:
            points = " ".join(f"U+{ord(p):04X}" for p in ch) if isinstance(ch, str) else type(ch).__name__
            raise ValueError(f"vocab[{i}] must be one character (one code point), got {ch!r} ({points})")
    meta = mf.ModelMetadata(
        vocab=tuple(vocab),
        cell=c.cell,
        layers=c.layers,
        hidden=c.hidden,
        val_loss=float(val_loss),
        train_steps=int(train_steps),
        corpus_sha256=corpus_sha256,
        embed_dim=c.embed_dim,
        corpus_chars=int(corpus_chars),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Through JSON once so that paths and other non-JSON values become strings here, not errors later.
        train_config=json.loads(json.dumps(dict(train_config or {}), default=str)),
    )
    # Round-trip through the reader's validator, so a file this writes is a file the service loads.
    try:
        return mf.ModelMetadata.from_props(meta.to_props())
    except mf.ModelFormatError as e:
        raise ValueError(f"cannot export: {e}") from None


def to_onnx(model: CharRNN, meta: mf.ModelMetadata) -> onnx.ModelProto:
    """Traces the model once (batch 2, steps 3; both left symbolic) and attaches the metadata."""
    model = model.eval()
    wrapped = _StateInOut(model).eval()
    names = meta.state_names()  # (("h", "h_out"),) or (("h", "h_out"), ("c", "c_out"))
    in_names = [mf.INPUT_TOKENS, *(i for i, _ in names)]
    out_names = [mf.OUTPUT_LOGITS, *(o for _, o in names)]
    dynamic = {mf.INPUT_TOKENS: {0: "batch", 1: "steps"}, mf.OUTPUT_LOGITS: {0: "batch", 1: "steps"}}
    for i, o in names:
        dynamic[i] = {1: "batch"}
        dynamic[o] = {1: "batch"}
    tokens = torch.zeros(2, 3, dtype=torch.long)  # [B, T]
    state = model.init_state(2)  # ([L, B, H], ...)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated and about batch_first RNNs with
        # dynamic batch; both are expected here, and parity below is what proves the graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (tokens, *state),
            buf,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = PRODUCER_NAME
    proto.producer_version = charrnn.__version__
    proto.doc_string = "charrnn character-level language model; see docs/model-format.md"
    del proto.metadata_props[:]
    for key, value in sorted(meta.to_props().items()):
        proto.metadata_props.add(key=key, value=value)
    return proto


def published_mode(directory: bool) -> int:
    """The mode a published file or folder gets: what the umask allows, as for any new file.

    Temporary files and folders are created private (0600/0700); a model is read by
    a server that may run as another user (a training Job writes, serving pods read).
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def export_model(
    model: CharRNN,
    vocab: list[str],
    out_path: str | os.PathLike,
    *,
    val_loss: float = math.nan,
    train_steps: int = 0,
    corpus_sha256: str = "",
    corpus_chars: int = 0,
    train_config: dict | None = None,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES,
) -> ExportReport:
    """Writes ``out_path`` (an .onnx file) for ``model``; with ``check``, proves it first.

    The file is written under a temporary name beside ``out_path``, checked with
    ``onnx.checker`` (full check) and against PyTorch on random tokens and random
    nonzero state at each (batch, steps) in ``shapes``, and only then renamed into
    place, so a reader sees the old file or the new one and a file that fails a
    check never appears. Raises ExportError when a check fails.
    """
    out_path = Path(out_path)
    meta = metadata_for(
        model,
        vocab,
        val_loss=val_loss,
        train_steps=train_steps,
        corpus_sha256=corpus_sha256,
        corpus_chars=corpus_chars,
        train_config=train_config,
    )
    was_training = model.training
    try:
        proto = to_onnx(model, meta)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            parity: tuple[ParityResult, ...] = ()
            if check:
                try:
                    onnx.checker.check_model(str(tmp), full_check=True)
                except onnx.checker.ValidationError as e:
                    raise ExportError(out_path, f"onnx.checker rejected the graph: {e}") from None
                session = cpu_session(tmp)
                _check_as_reader(session, out_path)
                parity = check_parity(model, session, meta, shapes=shapes)
                worst = [p for p in parity if not p.within(tolerance)]
                if worst:
                    raise ExportError(
                        out_path,
                        f"ONNX and PyTorch disagree beyond tolerance {tolerance:g}: "
                        + "; ".join(p.describe() for p in worst),
                    )
            os.chmod(tmp, published_mode(directory=False))
            os.replace(tmp, out_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        model.train(was_training)
    return ExportReport(
        path=out_path,
        size_bytes=out_path.stat().st_size,
        metadata=meta,
        parity=parity,
        tolerance=tolerance,
    )


def _check_as_reader(session, out_path: Path) -> None:
    """Reads the file back the way the service will: metadata through onnxruntime, then the graph's I/O."""
    try:
        meta = mf.ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
        meta.check_io(session.get_inputs(), session.get_outputs())
    except mf.ModelFormatError as e:
        raise ExportError(out_path, f"the file breaks the model file contract: {e}") from None
