"""The settings of a training run: two dataclasses, checked when they are built, saved in every checkpoint.

``ModelConfig`` is the network, what the exporter rebuilds from a checkpoint;
``TrainConfig`` is the whole run and holds one ``ModelConfig`` in ``model``.
Presets and the command line name every setting by its flag (``hidden=512``);
``TrainConfig.from_flat`` is the one place that sorts those names into the two.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from charrnn.modelfile import CELLS


class ConfigError(ValueError):
    """A training setting is out of range; the message names the flag, the value and the rule."""

    def __init__(self, field: str, rule: str, value):
        self.field, self.value = field, value
        super().__init__(f"--{field.replace('_', '-')} must be {rule}, got {value!r}")


LOCKED_DROPOUT = ("locked_dropout_input", "locked_dropout_between", "locked_dropout_output")  # ModelConfig fields


@dataclass
class ModelConfig:
    vocab_size: int = 0  # characters in the vocabulary (output classes); 0 until the corpus is read
    cell: str = "lstm"  # one of charrnn.modelfile.CELLS: "lstm" | "gru" | "rnn" (tanh)
    layers: int = 2  # stacked recurrent layers
    hidden: int = 256  # units per recurrent layer
    embed_dim: int = 0  # embedding width; 0 means "same as hidden" (resolved when built)
    dropout: float = 0.0  # between recurrent layers and before the output layer
    embed_dropout: float = 0.0  # on the embedding output
    tie_weights: bool = False  # share the embedding and output matrices (needs embed_dim == hidden)
    # training-only regularisers of AWD-LSTM; identity in evaluation and in the exported graph
    weight_drop: float = 0.0  # DropConnect on each hidden-to-hidden matrix, one mask per forward pass
    locked_dropout_input: float = 0.0  # on the embeddings, one mask per sequence (the same at every step)
    locked_dropout_between: float = 0.0  # between recurrent layers, one mask per sequence
    locked_dropout_output: float = 0.0  # before the output layer, one mask per sequence

    def __post_init__(self) -> None:
        _one_of("cell", self.cell, CELLS)
        _integers(self, ("layers", "hidden"), minimum=1)
        _integers(self, ("vocab_size", "embed_dim"), minimum=0)
        _rates(self, ("dropout", "embed_dropout", "weight_drop", *LOCKED_DROPOUT))
        if any(getattr(self, name) for name in LOCKED_DROPOUT):
            for name in ("dropout", "embed_dropout"):  # same places, one mask per step: locked dropout replaces them
                if getattr(self, name):
                    raise ConfigError(name, "0 when a --locked-dropout-* rate is set (locked dropout replaces it)", getattr(self, name))
        if self.locked_dropout_between and self.layers == 1:
            raise ConfigError("locked_dropout_between", "0 with --layers 1 (one layer has nothing between)", self.locked_dropout_between)
        if self.tie_weights and self.embed_dim not in (0, self.hidden):
            raise ConfigError("embed_dim", f"0 or equal to --hidden ({self.hidden}) with --tie-weights", self.embed_dim)
        if self.embed_dim == 0:
            self.embed_dim = self.hidden


# The ModelConfig fields a run sets (vocab_size comes from the corpus): the flags of the model group.
MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name != "vocab_size")

# --patience when it is left unset and --max-time is set. Every run measured here that ran long past its best
# (bench/results: GPU runs of 300 s, 35-minute CPU runs, a 40 KB names list) would have stopped after its
# best with 3; 5 leaves room for evaluations that wobble by a few thousandths.
TIME_BUDGET_PATIENCE = 5


@dataclass
class TrainConfig:
    data: str  # a text file, a directory of text files or a glob pattern
    out: str  # the run folder: checkpoints, metrics.jsonl, curves.png, samples.txt, tokens.bin
    preset: str = "default"  # the preset the unset fields came from (see presets.py)
    model: ModelConfig = field(default_factory=ModelConfig)  # the network; its vocab_size is set from the corpus
    # data
    batch_size: int = 64  # parallel lanes of the training stream per process (per rank under torchrun)
    seq_len: int = 128  # characters per lane per step (truncated BPTT length); the mean when varied
    epoch_offset: bool = False  # start each epoch a random number of characters, in [0, seq_len), into the lanes
    seq_len_sd: float = 0.0  # vary each step's window length: drawn from N(seq_len, sd) characters; 0: fixed
    seq_len_half_prob: float = 0.0  # the chance that a window's length is drawn around seq_len / 2 instead
    errors: str = "strict"  # undecodable bytes: "strict" stops with the file and offset, "replace" reads U+FFFD
    # optimization
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on matrices only (not biases, norms)
    warmup: int = 100  # steps of linear warm-up from 0 to lr
    lr_schedule: str = "cosine"  # "cosine" (to min_lr at the end of the run) | "constant"
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.0  # keep an exponential moving average of the weights, this much of it kept per step; 0: none
    # evaluation and stopping
    eval_interval: int = 250  # optimizer steps between evaluations (each one also checkpoints)
    eval_iters: int = 0  # validation batches per evaluation; 0 means the whole validation split
    max_steps: int = 0  # optimizer steps of the whole run, counted across resumes; 0 means no step limit
    max_time: float = 0.0  # seconds of training of the whole run, counted across resumes; 0 means no limit
    # stop after this many evaluations without a new best; 0 means never. Unset (None): TIME_BUDGET_PATIENCE
    # when max_time is set (a time budget is a ceiling, not a plan: see docs/training.md, "Small corpora"), else 0
    patience: int | None = None
    divergence_factor: float = 3.0  # stop when a training loss exceeds this times the first one
    # reporting
    sample_chars: int = 200  # characters sampled per temperature at each evaluation; 0 disables
    log_interval: int = 10  # steps between progress updates (the only host syncs on CUDA)
    # runtime
    seed: int = 1337  # seeds python, numpy and torch; a CPU run with the same seed repeats exactly
    device: str = "auto"  # "auto" (CUDA when available) | "cpu" | "cuda"
    precision: str = "auto"  # matrix math: "auto" (bf16 on CUDA and on CPUs with bf16 units, else fp32) | "bf16" | "fp32"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (one per core)
    resume: bool = False  # continue from OUT/last.pt (a fresh start when there is none)

    def __post_init__(self) -> None:
        if self.patience is None:
            self.patience = TIME_BUDGET_PATIENCE if self.max_time else 0
        _one_of("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _one_of("device", self.device, ("auto", "cpu", "cuda"))
        _one_of("errors", self.errors, ("strict", "replace"))
        _one_of("precision", self.precision, ("auto", "bf16", "fp32"))
        _integers(self, ("batch_size", "seq_len", "eval_interval", "log_interval"), minimum=1)
        _integers(self, ("warmup", "eval_iters", "max_steps", "patience", "sample_chars", "threads"), minimum=0)
        if not (isinstance(self.seq_len_sd, (int, float)) and math.isfinite(self.seq_len_sd) and self.seq_len_sd >= 0):
            raise ConfigError("seq_len_sd", "a finite number >= 0", self.seq_len_sd)
        if not (isinstance(self.seq_len_half_prob, (int, float)) and 0.0 <= self.seq_len_half_prob <= 1.0):
            raise ConfigError("seq_len_half_prob", "in [0, 1]", self.seq_len_half_prob)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError("seed", f"an integer in [0, {2**32 - 1}] (numpy's seed range)", self.seed)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", "a finite number > 0", self.lr)
        for name in ("weight_decay", "grad_clip", "max_time"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(name, "a finite number >= 0", getattr(self, name))
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ConfigError("ema_decay", "in [0, 1) (0: no average)", self.ema_decay)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        if not self.divergence_factor > 1.0:
            raise ConfigError("divergence_factor", "> 1", self.divergence_factor)
        if self.lr_schedule == "cosine" and not (self.max_steps or self.max_time):
            raise ConfigError("max_steps", "set (or --max-time) for --lr-schedule cosine, which decays over the run", 0)

    @classmethod
    def from_flat(cls, **values) -> TrainConfig:
        """A TrainConfig from settings named as their flags are (``hidden=512, lr=3e-3``)."""
        model, rest = split_model_fields(values)
        return cls(model=ModelConfig(**model), **rest)

    def as_dict(self) -> dict:
        """What a checkpoint keeps as ``train_config``: every field, ``model`` as a dict of its own."""
        return asdict(self)


def split_model_fields(values: dict) -> tuple[dict, dict]:
    """Flat settings -> (the ModelConfig ones, the rest)."""
    model = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    return model, {k: v for k, v in values.items() if k not in MODEL_FIELDS}


def _one_of(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(field, "one of " + ", ".join(allowed), value)


def _integers(config, names: tuple[str, ...], minimum: int) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(name, f"an integer >= {minimum}", value)


def _rates(config, names: tuple[str, ...]) -> None:
    """Dropout probabilities: 1 would drop everything."""
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ConfigError(name, "in [0, 1)", value)
