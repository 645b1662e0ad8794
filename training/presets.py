"""Named sets of training settings. A preset fills every field the command line leaves unset.

- ``default``: the bundled model, a 2x256 LSTM (4.3 MB of float32 weights on
  tiny-shakespeare's 65 characters). 3000 steps of 64 x 128 characters: about
  ten minutes on a 2-core CPU with bf16 units, val loss 1.4468 on
  tiny-shakespeare (1.55 is passed near step 600).
- ``shakespeare``: the quality setting for one GPU: a 2x1024 LSTM with strong
  dropout (embedding, between layers, before the output), weight decay and a
  short cosine schedule. Measured on an H200, 2x1024 with dropout 0.35 peaked
  at 1.4356 after 500 steps and 3x512 with 0.25 at 1.451 after 750, both then
  overfitting (60-plus epochs); hence dropout 0.5 and 1200 steps.
- ``shakespeare-cpu``: the quality setting for a CPU with no GPU: a 2x512 LSTM
  with dropout 0.3 (0.1 on the embedding) for 4000 steps of 64 x 128 characters
  (33M characters, 32 epochs of tiny-shakespeare): val loss 1.4244 (best, step
  2750), 46 minutes on two CPU cores with bf16 units.
- ``*-awd``: the same three models regularised the way AWD-LSTM regularises
  (weight-drop, locked dropout in place of dropout, a moving average of the
  weights, varied windows; see docs/training.md). The rates follow AWD-LSTM's
  proportions, heavier for the larger models; none has been tuned or measured
  yet (``bench/quality_cpu.py`` and ``bench/gpu_session.sh quality`` measure
  them). The 2x512 and 2x1024 ones read a narrower embedding (128, 256): 65
  characters need no 1024-wide vectors, and the first layer's input matrix
  shrinks by 3/4.
- ``tiny``: a few seconds on a CPU; for smoke tests and examples.
"""

from __future__ import annotations

from .config import ConfigError

PRESETS: dict[str, dict] = {
    "default": dict(
        cell="lstm", layers=2, hidden=256, embed_dim=0, dropout=0.1, embed_dropout=0.0,
        batch_size=64, seq_len=128, lr=3e-3, weight_decay=0.01, warmup=100,
        lr_schedule="cosine", grad_clip=1.0, eval_interval=250, max_steps=3000,
    ),
    "shakespeare": dict(
        cell="lstm", layers=2, hidden=1024, embed_dim=0, dropout=0.5, embed_dropout=0.2,
        batch_size=128, seq_len=256, lr=2e-3, weight_decay=0.1, warmup=100,
        lr_schedule="cosine", grad_clip=1.0, eval_interval=100, max_steps=1200,
    ),
    "shakespeare-cpu": dict(
        cell="lstm", layers=2, hidden=512, embed_dim=0, dropout=0.3, embed_dropout=0.1,
        batch_size=64, seq_len=128, lr=3e-3, weight_decay=0.1, warmup=100,
        lr_schedule="cosine", grad_clip=1.0, eval_interval=250, max_steps=4000,
    ),
    "default-awd": dict(
        cell="lstm", layers=2, hidden=256, embed_dim=0, dropout=0.0, embed_dropout=0.0,
        weight_drop=0.2, locked_dropout_input=0.05, locked_dropout_between=0.1, locked_dropout_output=0.1,
        batch_size=64, seq_len=128, epoch_offset=True, seq_len_sd=12.0, seq_len_half_prob=0.05,
        lr=3e-3, weight_decay=0.01, warmup=100, lr_schedule="cosine", grad_clip=1.0, ema_decay=0.999,
        eval_interval=250, max_steps=3000,
    ),
    "shakespeare-awd": dict(
        cell="lstm", layers=2, hidden=1024, embed_dim=256, dropout=0.0, embed_dropout=0.0,
        weight_drop=0.5, locked_dropout_input=0.2, locked_dropout_between=0.3, locked_dropout_output=0.4,
        batch_size=128, seq_len=256, epoch_offset=True, seq_len_sd=20.0, seq_len_half_prob=0.05,
        lr=2e-3, weight_decay=0.1, warmup=100, lr_schedule="cosine", grad_clip=1.0, ema_decay=0.999,
        eval_interval=100, max_steps=2500,
    ),
    "shakespeare-cpu-awd": dict(
        cell="lstm", layers=2, hidden=512, embed_dim=128, dropout=0.0, embed_dropout=0.0,
        weight_drop=0.3, locked_dropout_input=0.1, locked_dropout_between=0.2, locked_dropout_output=0.3,
        batch_size=64, seq_len=128, epoch_offset=True, seq_len_sd=12.0, seq_len_half_prob=0.05,
        lr=3e-3, weight_decay=0.1, warmup=100, lr_schedule="cosine", grad_clip=1.0, ema_decay=0.999,
        eval_interval=250, max_steps=4000,
    ),
    "tiny": dict(
        cell="lstm", layers=1, hidden=32, embed_dim=16, dropout=0.0, embed_dropout=0.0,
        batch_size=4, seq_len=16, lr=1e-2, weight_decay=0.0, warmup=0,
        lr_schedule="constant", grad_clip=1.0, eval_interval=20, max_steps=40, sample_chars=40,
    ),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError("preset", "one of " + ", ".join(PRESETS), name)
    return dict(PRESETS[name])
