"""Quality on a CPU: which of the AWD-LSTM techniques help, at an equal budget, one training run at a time.

    python -m bench.quality_cpu ablation [--max-steps N | --budget-minutes M] [--data PATH] [--out DIR] [--flags "..."]
    python -m bench.quality_cpu retrain-default [--max-steps N | --budget-minutes M] [--data PATH] [--out DIR]
    python -m bench.quality_cpu retrain-default --run RUN    # export and compare a run trained already

``ablation`` trains, one after another on tiny-shakespeare:

    baseline          the shakespeare-cpu preset (2x512, dropout 0.3, embedding dropout 0.1)
    locked dropout    baseline with locked dropout in place of dropout    } each at the value the
    weight-drop       baseline with weight-drop                           } shakespeare-cpu-awd
    averaging         baseline with a moving average of the weights       } preset gives it
    varied windows    baseline with an epoch offset and varied lengths    }
    all together      the shakespeare-cpu-awd preset (all four, and a 128-wide embedding)
    winner, seed 2    the best of the six again with another seed: how much of a difference is noise

and writes ``OUT/ablation.md``: the best validation loss of each run, of its raw
weights and of their moving average. ``retrain-default`` trains the bundled
model's shape (2x256) with the new recipe (the default-awd preset), exports it
beside the results, checks the file stays within 5 MB and compares it with
``models/default/2``; it publishes nothing (the command to do so is printed).

Every run gets ``--resume``, so the same command continues an interrupted
ablation where it stopped, and a finished run is not trained again. Each run's
checkpoints stay in ``OUT/runs/NAME`` (ignored by git); its metrics and curves
are copied to ``OUT/ablation/NAME``. ``--flags`` go to every run after the
others, e.g. a tiny model for a dry run:

    python -m bench.quality_cpu ablation --out /tmp/q --max-steps 20 \\
        --flags "--hidden 32 --embed-dim 16 --batch-size 8 --seq-len 32 --eval-interval 10 --sample-chars 0"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from charrnn.training.config import LOCKED_DROPOUT
from charrnn.training.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent
BASELINE, RECIPE, DEFAULT_RECIPE = "shakespeare-cpu", "shakespeare-cpu-awd", "default-awd"
# Each technique: the fields it sets, taken from the new recipe's preset so that the two agree.
TECHNIQUES = {
    "locked dropout": ("dropout", "embed_dropout", *LOCKED_DROPOUT),
    "weight-drop": ("weight_drop",),
    "averaging": ("ema_decay",),
    "varied windows": ("epoch_offset", "seq_len_sd", "seq_len_half_prob"),
}
MAX_ONNX_BYTES = 5_000_000  # the bundled model's budget
BUNDLED = ROOT / "models" / "default" / "2" / "model.onnx"


def flags_of(fields: tuple[str, ...], preset: str) -> list[str]:
    """The command-line flags that set ``fields`` to their values in ``preset``."""
    out = []
    for name in fields:
        value, flag = PRESETS[preset][name], "--" + name.replace("_", "-")
        out += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return out


# --shape: which pair of presets the ablation compares (a baseline and the same shape with the recipe).
SHAPES = {"shakespeare-cpu": (BASELINE, RECIPE), "default": ("default", DEFAULT_RECIPE)}


def configurations(shape: str = "shakespeare-cpu") -> dict[str, list[str]]:
    """Name -> flags of the six ablation runs (the winner's second seed is added once they are done)."""
    baseline, recipe = SHAPES[shape]
    runs = {"baseline": ["--preset", baseline]}
    for technique, fields in TECHNIQUES.items():
        runs[f"+ {technique}"] = ["--preset", baseline, *flags_of(fields, recipe)]
    runs["all together"] = ["--preset", recipe]
    return runs


def folder(name: str) -> str:
    return name.replace("+ ", "").replace(", ", "-").replace(" ", "-")


def train(name: str, flags: list[str], args) -> dict:
    """One charrnn-train run (resumed if it was started before); its figures from metrics.jsonl."""
    run = Path(args.out) / "runs" / folder(name)
    run.mkdir(parents=True, exist_ok=True)
    budget = (["--max-steps", "0", "--max-time", str(args.budget_minutes * 60)] if args.budget_minutes
              else ["--max-steps", str(args.max_steps)] if args.max_steps else [])
    cmd = [sys.executable, "-m", "charrnn.training.cli", "--data", args.data, "--out", str(run), "--seed", str(args.seed),
           *flags, *budget, *shlex.split(args.flags), "--resume"]  # a later flag wins: the winner's second seed
    print(f"--- {name}: {shlex.join(cmd[3:])}", flush=True)
    with open(run.parent / f"{folder(name)}.log", "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
    keep = Path(args.out) / "ablation" / folder(name)
    keep.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "curves.png"):
        if (run / f).is_file():
            shutil.copy(run / f, keep / f)
    result = {"name": name, "flags": flags, "exit": code, "run": str(run), "steps": evals[-1]["step"] if evals else 0,
              "minutes": evals[-1]["elapsed"] / 60 if evals else 0.0}
    for key in ("val_loss", "ema_val_loss"):
        scored = [(r[key], r["step"]) for r in evals if key in r]
        result[key] = min(scored) if scored else None  # (best loss, its step)
    result["best"] = min(v[0] for v in (result["val_loss"], result["ema_val_loss"]) if v) if evals else float("inf")
    print(f"    exit {code}, best {result['best']:.4f}", flush=True)
    return result


def render(results: list[dict], args) -> str:
    budget = (f"{args.budget_minutes:g} minutes each" if args.budget_minutes else
              f"{args.max_steps} steps each" if args.max_steps else "each preset's own steps")
    lines = [
        f"# Ablation on a CPU: {' vs '.join(SHAPES[args.shape])}, {budget}",
        "",
        f"tiny-shakespeare, validation = the last 10% (contiguous), whole split at every evaluation."
        f" {os.cpu_count()} cores ({platform.processor() or platform.machine()}), load average"
        f" {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; one run at a time."
        + (f" Extra flags on every run: `{args.flags}`." if args.flags else ""),
        "",
        "| configuration | flags | steps | minutes | best val loss, raw (step) | best val loss, average (step) | best |"
        " gain over the baseline |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = results[0]["best"] if results else float("nan")  # the first run is the baseline
    for r in results:
        raw, avg = (f"{v[0]:.4f} ({v[1]})" if v else "-" for v in (r["val_loss"], r["ema_val_loss"]))
        note = "" if r["exit"] == 0 else f" (exit {r['exit']})"
        lines.append(f"| {r['name']}{note} | `{shlex.join(r['flags'])}` | {r['steps']} | {r['minutes']:.1f} | {raw} | {avg} |"
                     f" **{r['best']:.4f}** | {base - r['best']:+.4f} |")
    lines += ["", "A gain is the baseline's best minus the run's best (positive: better). Evaluations of one run move"
              " about ±0.004, so a gain under 0.005 is noise; the winner's second seed shows the spread."]
    return "\n".join(lines) + "\n"


def ablation(args) -> int:
    results = [train(name, flags, args) for name, flags in configurations(args.shape).items()]
    winner = min((r for r in results if r["exit"] == 0), key=lambda r: r["best"], default=None)
    if winner is not None:
        results.append(train(f"{winner['name']}, seed 2", [*winner["flags"], "--seed", str(args.seed + 1)], args))
    table = render(results, args)
    (Path(args.out) / "ablation.md").write_text(table)
    print(table)
    return 0 if all(r["exit"] == 0 for r in results) else 1


def validation_text(data: str) -> str:
    """The validation split of the text file ``data``, cut where the trainer cuts it."""
    from charrnn.training.corpus import validation_start

    text = Path(data).read_text(encoding="utf-8")
    return text[validation_start(len(text)):]


def replay_val_loss(path: Path, val: str) -> float:
    """Mean nats per character of a model file on the validation text ``val``, read as one sequence from a zero
    state by onnxruntime on the file alone (testkit/replay.py). Independent of the trainer's own figure, which
    depends on its evaluation lanes and, in a bf16 run, on autocast."""
    from testkit.replay import Replay

    return float(-Replay(path).text_logprobs(val[0], val[1:]).mean())


def retrain_default(args) -> int:
    import onnxruntime as ort

    from charrnn.exporter.cli import main as export
    from charrnn.modelfile import MODEL_FILE, ModelMetadata

    if args.run:  # a run trained already (by charrnn-train with the recipe, or an earlier retrain-default)
        result = {"exit": 0, "run": args.run}
    else:
        result = train("default-awd", ["--preset", DEFAULT_RECIPE], args)
    repo = Path(args.out) / "default-awd-models"
    shutil.rmtree(repo, ignore_errors=True)
    if result["exit"] != 0 or export([result["run"], "--name", "default", "--repo", str(repo)]) != 0:
        print("no candidate: the run or its export failed (see the log above)")
        return 1
    candidate = repo / "default" / "1" / MODEL_FILE

    def val_loss(path: Path) -> float:
        return ModelMetadata.from_props(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                                        .get_modelmeta().custom_metadata_map).val_loss

    val = validation_text(args.data)
    size, fits = candidate.stat().st_size, candidate.stat().st_size <= MAX_ONNX_BYTES
    lines = [
        "# The bundled model's shape retrained with the new recipe",
        "",
        "Validation loss in nats per character: the trainer's own figure (from the file's metadata), and a replay",
        "of the file on the whole split as one sequence (onnxruntime, float32; `replay_val_loss`).",
        "",
        "| model | file | bytes | val loss (trainer) | val loss (replay) |",
        "| --- | --- | ---: | ---: | ---: |",
        f"| bundled | `{BUNDLED.relative_to(ROOT)}` | {BUNDLED.stat().st_size:,} | {val_loss(BUNDLED):.4f} |"
        f" {replay_val_loss(BUNDLED, val):.4f} |",
        f"| candidate (`{result['run']}`) | `{candidate}` | {size:,}{'' if fits else ' (over 5 MB)'} |"
        f" {val_loss(candidate):.4f} | {replay_val_loss(candidate, val):.4f} |",
        "",
        f"To publish it as the next version of the bundled model: `charrnn-export {result['run']} --name default --repo models`",
        "(then update docs/model-card.md).",
    ]
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "default-retrain.md").write_text(text)
    print(text)
    return 0 if fits else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality_cpu", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["ablation", "retrain-default"])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"), help="tiny-shakespeare text file")
    p.add_argument("--out", default=str(ROOT / "bench/results/quality-cpu"), help="results folder")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=0, help="steps of every run (default: each preset's own)")
    budget.add_argument("--budget-minutes", type=float, default=0.0, help="wall-clock minutes of every run instead")
    p.add_argument("--seed", type=int, default=1337, help="seed of the runs; the winner's second run takes seed + 1")
    p.add_argument("--flags", default="", help="charrnn-train flags added to every run, last")
    p.add_argument("--shape", choices=sorted(SHAPES), default="shakespeare-cpu",
                   help="ablation: the 2x512 recipe (shakespeare-cpu vs -awd) or the bundled model's 2x256 (default vs default-awd)")
    p.add_argument("--run", default="", help="retrain-default: export and compare this run folder instead of training")
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (pass the path of tinyshakespeare.txt)")
    args.data, args.out = str(Path(args.data).resolve()), str(Path(args.out).resolve())  # the runs start in ROOT
    return ablation(args) if args.mode == "ablation" else retrain_default(args)


if __name__ == "__main__":
    raise SystemExit(main())
