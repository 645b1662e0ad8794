"""Named sets of training settings. A preset fills every field the command line leaves unset.

- ``default``: the bundled model, a 2x256 LSTM (about 4.4 MB of float32 weights
  on tiny-shakespeare's 65 characters) sized to train on a 2-core CPU in about
  ten minutes.
- ``shakespeare``: the quality setting for one GPU: a 3x512 LSTM with dropout on
  the embedding, between layers and before the output, weight decay and a
  cosine schedule.
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
        cell="lstm", layers=3, hidden=512, embed_dim=0, dropout=0.25, embed_dropout=0.1,
        batch_size=128, seq_len=256, lr=2e-3, weight_decay=0.1, warmup=200,
        lr_schedule="cosine", grad_clip=1.0, eval_interval=250, max_steps=6000,
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
