"""charrnn-train: trains a character-level model on a text corpus into a run folder.

    charrnn-train --data input.txt --out runs/shakespeare [--preset NAME] [flags...]

A preset fills every setting the command line leaves out. Exit status: 0 when
the run ends by its limits or patience, 1 when the loss diverged, 2 for a bad
argument or corpus, or when torch (the `train` extra) is not installed, 130
when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# torch's OpenMP threads spin while they wait for work by default. On a machine whose cores are
# shared with other jobs, the spinning threads starve each other and an LSTM step runs up to
# 10x slower; passive waiting costs little when the machine is idle. Read once, at torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from charrnn import commandline  # noqa: E402
from charrnn.extras import missing_extra  # noqa: E402 (after OMP_WAIT_POLICY)
from charrnn.modelfile import CELLS  # noqa: E402

from .config import TIME_BUDGET_PATIENCE, ConfigError, TrainConfig  # noqa: E402
from .presets import PRESETS, preset  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = commandline.ArgumentParser(
        prog="charrnn-train",
        description="Train a character-level recurrent language model (LSTM/GRU/RNN) on UTF-8 text.",
        epilog="Presets: " + ", ".join(PRESETS) + ". Flags given on the command line override the preset.",
    )
    p.add_argument("--data", required=True, help="a text file, a directory of text files (recursive) or a glob pattern")
    p.add_argument("--out", required=True, help="run folder for checkpoints, logs, curves and samples")
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="settings to start from (default: default)")
    m = p.add_argument_group("model")
    m.add_argument("--cell", choices=list(CELLS))
    m.add_argument("--layers", type=int, help="stacked recurrent layers")
    m.add_argument("--hidden", type=int, help="units per recurrent layer")
    m.add_argument("--embed-dim", type=int, help="embedding width (0: same as --hidden)")
    m.add_argument("--dropout", type=float, help="dropout between layers and before the output layer")
    m.add_argument("--embed-dropout", type=float, help="dropout on the embeddings")
    m.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="share the embedding and output matrices (needs embed dim == hidden)")
    m.add_argument("--weight-drop", type=float,
                   help="DropConnect on the hidden-to-hidden weights in training, one mask per step (0: off)")
    m.add_argument("--locked-dropout-input", type=float, help="dropout on the embeddings, one mask per sequence")
    m.add_argument("--locked-dropout-between", type=float, help="dropout between layers, one mask per sequence")
    m.add_argument("--locked-dropout-output", type=float, help="dropout before the output layer, one mask per sequence")
    d = p.add_argument_group("data")
    d.add_argument("--batch-size", type=int, help="parallel lanes of the text per step (per rank under torchrun)")
    d.add_argument("--seq-len", type=int, help="characters per lane per step (backpropagation length)")
    d.add_argument("--epoch-offset", action=argparse.BooleanOptionalAction, default=None,
                   help="start each epoch a random number of characters (below --seq-len) into the lanes")
    d.add_argument("--seq-len-sd", type=float, help="vary each step's length: drawn from N(seq-len, this) (0: fixed)")
    d.add_argument("--seq-len-half-prob", type=float, help="the chance that a step's length is drawn around seq-len / 2")
    d.add_argument("--errors", choices=["strict", "replace"], help="undecodable UTF-8: stop with the file and offset, or read U+FFFD")
    o = p.add_argument_group("optimization")
    o.add_argument("--lr", type=float, help="peak learning rate")
    o.add_argument("--min-lr-ratio", type=float, help="cosine schedule ends at lr times this")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    o.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up")
    o.add_argument("--lr-schedule", choices=["cosine", "constant"])
    o.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    o.add_argument("--ema-decay", type=float,
                   help="also keep an exponential moving average of the weights (e.g. 0.999), evaluated beside them (0: off)")
    s = p.add_argument_group("evaluation and stopping")
    s.add_argument("--eval-interval", type=int, help="steps between evaluations and checkpoints")
    s.add_argument("--eval-iters", type=int, help="validation batches per evaluation (0: the whole split)")
    s.add_argument("--max-steps", type=int, help="steps of the whole run, across resumes (0: no limit)")
    s.add_argument("--max-time", type=float,
                   help="seconds of the whole run, across resumes (0: no limit); a ceiling: it turns --patience on")
    s.add_argument("--patience", type=int,
                   help="stop after N evaluations without a better validation loss (0: never; "
                        f"default {TIME_BUDGET_PATIENCE} with --max-time, else 0)")
    s.add_argument("--divergence-factor", type=float, help="stop when the loss exceeds this times the first loss")
    r = p.add_argument_group("reporting and runtime")
    r.add_argument("--sample-chars", type=int, help="characters sampled per temperature at each evaluation (0: none)")
    r.add_argument("--log-interval", type=int, help="steps between progress-bar updates")
    r.add_argument("--seed", type=int, help="random seed; a CPU run with the same seed repeats exactly")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto picks CUDA when available")
    r.add_argument("--threads", type=int, help="torch CPU threads (0: one per core)")
    r.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA and on CPUs with bf16 units (AMX, AVX-512 BF16), else fp32")
    r.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last.pt if it exists")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset values, then every flag that was given on the command line."""
    values = preset(args.preset)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("data", "out", "preset")}
    values.update(given)
    return TrainConfig.from_flat(data=args.data, out=args.out, preset=args.preset, **values)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"charrnn-train: error: {e}", file=sys.stderr)
        return 2
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        print(f"charrnn-train: error: --out must be a run folder (new or existing), got {cfg.out!r}: a file",
              file=sys.stderr)
        return 2
    try:  # torch and the rest of the train extra, which the service's install (make run) leaves out
        from .checkpoint import CheckpointError
        from .loop import DivergedError, run_training
    except ModuleNotFoundError as e:
        print(missing_extra("charrnn-train", "train", e), file=sys.stderr)
        return 2
    try:
        result = run_training(cfg)
    except DivergedError as e:
        print(f"charrnn-train: {e}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"charrnn-train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only run folder, met by a log, a picture or a sample file
        print(f"\ncharrnn-train: error: {e.strerror or e}: {e.filename or cfg.out}; the last checkpoint in "
              f"{cfg.out} is intact, rerun with --resume once the cause is fixed", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("charrnn-train: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone evaluates and knows the losses
        print(f"best val loss {result.best_val_loss:.4f} (final {result.val_loss:.4f}) after {result.step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
