"""Everything a run needs to continue exactly where its last checkpoint left it.

``last.pt`` holds, beside the documented checkpoint keys, the optimizer state,
``ema`` (the moving average of the weights, or None) and ``resume``: the run's
counters, the state of the generator that draws epoch offsets and window lengths
(``windows``) and, for every rank, its random states, its place in the data
(epoch, cursor) and the recurrent state it carries into the next window.
Restoring all of them makes the resumed steps repeat the uninterrupted run's
steps (bit for bit on the CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel

from .batches import Windows
from .config import MODEL_FIELDS, ConfigError, ModelConfig, TrainConfig, split_model_fields
from .corpus import Corpus
from .model import CharRNN
from .runtime import Runtime, gather_to_main, rng_state, set_rng_state


@dataclass
class RunState:
    step: int = 0  # optimizer steps taken in the whole run
    epoch: int = 0  # passes over the training lanes completed
    cursor: int = 0  # characters into every lane where the next window starts
    carried: tuple | None = None  # recurrent state after the last window, each [layers, B, hidden]; None at an epoch start
    first_loss: float | None = None  # training loss of step 1: the yardstick for divergence
    best_val_loss: float = math.nan  # best validation loss so far
    evals_since_best: int = 0  # evaluations since the best one (for --patience)
    elapsed: float = 0.0  # seconds since the run first started, not counting time stopped
    checkpoint_step: int = 0  # step of the newest last.pt


# TrainConfig fields a run keeps from its start, beside the whole ModelConfig: the batch shape and
# what the resume state is made of. The others (--lr, --patience, ...) may change on resume.
FIXED_ON_RESUME = ("batch_size", "seq_len", "ema_decay", "epoch_offset", "seq_len_sd", "seq_len_half_prob")


def fresh() -> RunState:
    return RunState()


def upgrade(ckpt: dict) -> dict:
    """A last.pt written by an earlier charrnn, in today's shape; the one place that knows the old shapes.

    - train_config held the ModelConfig fields (cell, layers, hidden, ...) at its top level;
      today they sit in train_config["model"].
    - Each rank's place in the data was "position", a window index; today it is "cursor", in
      characters (windows may vary in length).
    - Settings added since are missing; they take their defaults, which are the behaviour before
      them (a new setting must default to off for that). So are the moving average of the
      weights and the state of the window draws: runs without them had none.
    """
    train = ckpt.get("train_config", {})
    if "model" not in train:
        model, train = split_model_fields(train)
        train = {**train, "model": model}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    model_defaults = dataclasses.asdict(ModelConfig())
    train = {**defaults, **train, "model": {**model_defaults, **train["model"]}}
    resume = ckpt["resume"]
    ranks = [{**r, "cursor": r["position"] * train["seq_len"]} if "cursor" not in r else r for r in resume["ranks"]]
    return {**ckpt, "train_config": train, "ema": ckpt.get("ema"),
            "resume": {**resume, "ranks": ranks, "windows": resume.get("windows")}}


def check_compatible(cfg: TrainConfig, ckpt: dict, world: int) -> None:
    """A run resumes only with the model, the batch shape and the resume-state settings it started with."""
    saved = ModelConfig(**ckpt["model_config"])
    wanted = dataclasses.replace(cfg.model, vocab_size=saved.vocab_size)
    for name in MODEL_FIELDS:
        if getattr(saved, name) != getattr(wanted, name):
            raise ConfigError(name, f"{getattr(saved, name)!r} as in the checkpoint being resumed ({cfg.out}/last.pt)", getattr(wanted, name))
    train = ckpt["train_config"]
    for name in FIXED_ON_RESUME:
        if train[name] != getattr(cfg, name):
            raise ConfigError(name, f"{train[name]!r} as in the checkpoint being resumed", getattr(cfg, name))
    if ckpt["resume"]["world"] != world:  # each rank resumes its own lanes: another count would cut the text anew
        raise ConfigError(
            "nproc_per_node", f"such that --nnodes x --nproc-per-node = {ckpt['resume']['world']} ranks, as in the run being"
            f" resumed ({cfg.out}/last.pt holds each rank's place in its own lanes of the text; another count cuts"
            " other lanes, so it cannot continue that run)", world)


def check_corpus(corpus: Corpus, ckpt: dict) -> None:
    if corpus.info.sha256 != ckpt["corpus"]["sha256"]:
        raise ConfigError("data", f"the corpus the run started on (sha256 {ckpt['corpus']['sha256'][:12]}...)",
                          f"{corpus.info.sources[0]} with sha256 {corpus.info.sha256[:12]}...")


def restore(ckpt: dict, model: CharRNN, optimizer: torch.optim.Optimizer, ema: AveragedModel | None,
            windows: Windows, rt: Runtime) -> RunState:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    saved = ckpt["resume"]
    if saved["windows"] is not None:
        windows.set_state(saved["windows"])
    mine = saved["ranks"][rt.rank]
    set_rng_state(mine["rng"])
    carried = None if mine["carried"] is None else tuple(s.to(rt.device) for s in mine["carried"])
    return RunState(
        step=ckpt["step"], epoch=mine["epoch"], cursor=mine["cursor"], carried=carried,
        first_loss=saved["first_loss"], best_val_loss=ckpt.get("best_val_loss", math.nan),
        evals_since_best=saved["evals_since_best"], elapsed=saved["elapsed"], checkpoint_step=ckpt["step"],
    )


def gather(run: RunState, model: CharRNN, rt: Runtime) -> list[dict] | None:
    """Each rank's own part of the resume state, collected on rank 0 (a collective: every rank calls it).

    Each rank adds a digest of its weights; under DistributedDataParallel they must all agree.
    """
    carried = None if run.carried is None else tuple(s.cpu() for s in run.carried)
    mine = {"rng": rng_state(), "epoch": run.epoch, "cursor": run.cursor, "carried": carried,
            "weights_sha256": weights_digest(model)}
    ranks = gather_to_main(rt, mine)
    if ranks is not None and len({r["weights_sha256"] for r in ranks}) > 1:
        raise RuntimeError(f"ranks hold different weights at step {run.step}: the data-parallel replicas went out of step")
    return ranks


def weights_digest(model: CharRNN) -> str:
    return state_digest(model.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict (a checkpoint's ``model``): every tensor's name and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def payload(cfg: TrainConfig, model_cfg: ModelConfig, model: CharRNN, corpus: Corpus, run: RunState, val_loss: float,
            weights: str = "raw") -> dict:
    """The documented checkpoint keys (what the exporter reads); best.pt holds only these.

    ``model`` is the training weights ("raw") or their moving average ("ema"); val_loss is theirs.
    """
    return {
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": cfg.as_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "weights": weights,
        "vocab": list(corpus.vocab),
        "step": run.step,
        "val_loss": val_loss,
        "best_val_loss": run.best_val_loss,
        "corpus": corpus.info.as_dict(),
    }


def extra(optimizer: torch.optim.Optimizer, ema: AveragedModel | None, windows: Windows, run: RunState,
          ranks: list[dict]) -> dict:
    """What last.pt adds for resuming."""
    return {
        "optimizer": optimizer.state_dict(),
        "ema": None if ema is None else {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "resume": {
            "world": len(ranks), "ranks": ranks, "windows": windows.state(), "first_loss": run.first_loss,
            "evals_since_best": run.evals_since_best, "elapsed": run.elapsed,
        },
    }
