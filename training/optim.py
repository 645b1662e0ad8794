"""The optimizer (AdamW) and the learning-rate schedule (linear warm-up, then cosine or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig, cuda: bool) -> torch.optim.AdamW:
    """AdamW with decay on matrices only: biases and the embedding table keep their scale."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed.") else keep).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    # fused runs the whole update as one kernel per dtype on CUDA; foreach batches it on the CPU.
    kind = {"fused": True} if cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), **kind)


def lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) after ``elapsed`` seconds of the run."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    # Progress through the run: by steps when the run has a step budget (so a resumed run
    # follows the same curve exactly), else by its time budget.
    if cfg.max_steps:
        progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    else:
        progress = elapsed / cfg.max_time
    progress = min(max(progress, 0.0), 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
