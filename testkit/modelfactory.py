"""Tiny random-weight model files for tests, written by the real exporter.

    from testkit.modelfactory import make_model_repo
    repo = make_model_repo(tmp_path / "models", name="tiny", versions=(1, 2))
    # repo/tiny/1/model.onnx, repo/tiny/2/model.onnx

Each file is a genuine export (the same code path as ``charrnn-export``) of an
untrained CharRNN; weights depend on ``seed`` and the version, so two versions
of one name give different text. A 1x16 model takes well under a second.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from charrnn.exporter.export import ExportReport, export_model
from charrnn.modelfile import MODEL_FILE
from charrnn.training.model import CharRNN, ModelConfig

# Newline, space, punctuation and both cases: what tiny-shakespeare's vocabulary looks like.
DEFAULT_VOCAB = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def make_model(
    *,
    cell: str = "lstm",
    layers: int = 1,
    hidden: int = 16,
    vocab: Sequence[str] = DEFAULT_VOCAB,
    seed: int = 0,
    embed_dim: int = 0,
) -> CharRNN:
    """An untrained CharRNN in eval mode with weights drawn from ``seed`` (global RNG untouched)."""
    config = ModelConfig(vocab_size=len(vocab), cell=cell, layers=layers, hidden=hidden, embed_dim=embed_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CharRNN(config).eval()


def make_model_file(
    path: str | Path,
    *,
    cell: str = "lstm",
    layers: int = 1,
    hidden: int = 16,
    vocab: Sequence[str] = DEFAULT_VOCAB,
    seed: int = 0,
    embed_dim: int = 0,
    val_loss: float = math.nan,
    train_steps: int = 0,
    corpus_sha256: str = "0" * 64,
    corpus_chars: int = 0,
    train_config: dict | None = None,
    check: bool = False,
) -> ExportReport:
    """Writes one model file at ``path``; ``check`` adds the exporter's checker and parity run."""
    model = make_model(cell=cell, layers=layers, hidden=hidden, vocab=vocab, seed=seed, embed_dim=embed_dim)
    return export_model(
        model,
        list(vocab),
        path,
        val_loss=val_loss,
        train_steps=train_steps,
        corpus_sha256=corpus_sha256,
        corpus_chars=corpus_chars,
        train_config=train_config,
        check=check,
    )


def make_model_repo(
    root: str | Path,
    name: str = "tiny",
    versions: Sequence[int] = (1,),
    cell: str = "lstm",
    layers: int = 1,
    hidden: int = 16,
    vocab: Sequence[str] = DEFAULT_VOCAB,
    seed: int = 0,
    embed_dim: int = 0,
    **export_args,
) -> Path:
    """Writes ``root/<name>/<version>/model.onnx`` for each version and returns ``root``.

    Call it again with the same root to add more names. Version v draws its
    weights from ``seed + v``. ``export_args`` go to ``make_model_file``
    (val_loss, train_steps, corpus_sha256, corpus_chars, train_config, check).
    """
    root = Path(root)
    for version in versions:
        make_model_file(
            root / name / str(version) / MODEL_FILE,
            cell=cell,
            layers=layers,
            hidden=hidden,
            vocab=vocab,
            seed=seed + version,
            embed_dim=embed_dim,
            **export_args,
        )
    return root
