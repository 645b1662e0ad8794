"""Checkpoints: one torch file per snapshot, written atomically.

A checkpoint is a dict (``torch.save``) with at least these keys; the exporter
reads only these, the trainer adds its resume state beside them:

    format          "charrnn-checkpoint"
    format_version  1
    model_config    dataclasses.asdict(ModelConfig)
    train_config    dict of the run's settings (informational for the exporter)
    model           the model's state_dict
    vocab           list[str], index -> one character
    step            optimizer steps taken when it was written
    val_loss        validation loss (nats/char) of the evaluation at ``step``; nan if none
    best_val_loss   best validation loss seen in the run so far
    corpus          {"sha256": hex, "chars": int, "sources": [str, ...]}

and, from the runs that keep a moving average of their weights (``--ema-decay``):

    weights         "raw" (the training weights) or "ema" (their average): which ``model`` holds

A run folder holds ``best.pt`` (lowest validation loss, of the raw or the averaged
weights, whichever scored it) and ``last.pt`` (the raw weights, with the average
beside them for resuming).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "model_config", "model", "vocab", "step", "val_loss", "corpus")
BEST = "best.pt"
LAST = "last.pt"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a charrnn checkpoint."""


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Writes ``payload`` to ``path`` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is not None:  # disk full, quota, read-only: torch re-raises these as zip-writer RuntimeErrors
            raise CheckpointError(
                f"{path}: cannot write the checkpoint ({cause.strerror or cause}); the previous {path.name}, if any,"
                " is unchanged"
            ) from e
        raise


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind ``e`` (itself, or one it was raised from or while handling), if any."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Reads and checks a checkpoint file, or a run folder (its best.pt, else its last.pt)."""
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a charrnn checkpoint (no format={FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {payload['format_version']}, this charrnn reads {FORMAT_VERSION}"
        )
    return payload


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run folder has neither {BEST} nor {LAST}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run folder")
    return path


def is_better(val_loss: float, best: float) -> bool:
    return not math.isnan(val_loss) and (math.isnan(best) or val_loss < best)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
