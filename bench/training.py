"""Trainer benchmark: charrnn's trainer against a plain PyTorch loop, same model, same wall time, same CPU.

    python -m bench.training [--data PATH] [--budget SECONDS] [--hidden 256 512] [--threads N] [--weight-drop P] [--out bench/results]

For each model size (2-layer LSTM of ``--hidden`` units) both trainers run for
``--budget`` seconds of training on tiny-shakespeare's first 90%, at the same
time, as two processes of ``--threads`` torch threads each, so that whatever
else loads the machine slows both alike. Then one evaluator, in float32, scores
both models on the last 10%:

- plain: the loop most tutorials write: Embedding -> nn.LSTM -> Linear, AdamW
  (lr 2e-3, weight decay 0.01), 32 random windows of 128 characters from a zero
  state per step, ``loss.item()`` every step.
- charrnn: ``charrnn.training.run_training``, the code behind ``charrnn-train``,
  with the same model, batch shape and optimizer settings (lr 2e-3 constant,
  weight decay 0.01, no dropout), so that only the trainer differs: lanes with
  the recurrent state carried between batches, bf16 autocast where the CPU has
  bf16 units, AdamW foreach, no per-step host sync. (The ``default`` preset's
  warm-up and cosine are tuned for 3000 steps, not for a budget of a minute or two.)
- charrnn-wd (with ``--weight-drop P``): the same with weight-drop P on the
  hidden-to-hidden weights, a third process beside the other two, to show what
  the DropConnect masks and the swapped weights cost.

Validation is reported two ways: with the state carried along 64 contiguous
lanes (how the model is used to generate) and on independent windows from a
zero state (how the plain loop is usually scored). Writes
``OUT/training.md`` and ``OUT/training.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The same OpenMP wait policy as charrnn-train (see training/cli.py), for both trainers; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from charrnn.training.batches import val_lanes  # noqa: E402
from charrnn.training.config import TrainConfig  # noqa: E402
from charrnn.training.corpus import prepare_corpus  # noqa: E402
from charrnn.training.loop import evaluate, run_training  # noqa: E402
from charrnn.training.model import CharRNN, ModelConfig  # noqa: E402
from charrnn.training.presets import preset  # noqa: E402
from charrnn.training.runtime import Runtime  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 128  # both trainers backpropagate through 128 characters
PLAIN_BATCH = 32  # windows (lanes) per step, both trainers
PLAIN_LR = 2e-3  # both trainers, constant
TRAINERS = ("plain", "charrnn", "charrnn-wd")  # charrnn-wd runs only with --weight-drop


class PlainLSTM(nn.Module):
    """Embedding -> nn.LSTM -> Linear, with the (tokens, state) -> (logits, state) call of CharRNN."""

    def __init__(self, vocab: int, hidden: int, layers: int = 2):
        super().__init__()
        self.layers, self.hidden = layers, hidden
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def init_state(self, batch: int, device="cpu"):
        z = torch.zeros(self.layers, batch, self.hidden, device=device)
        return (z, z.clone())

    def forward(self, tokens, state=None):
        y, state = self.lstm(self.embed(tokens), state)  # (B, T, H)
        return self.head(y), state


def plain_loop(train: np.ndarray, vocab: int, hidden: int, budget: float, seed: int) -> tuple[PlainLSTM, dict]:
    torch.manual_seed(seed)
    model = PlainLSTM(vocab, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=PLAIN_LR)  # weight decay 0.01 by default
    data = torch.from_numpy(train.astype(np.int64))
    steps, losses, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < budget:
        ix = torch.randint(len(data) - SEQ_LEN - 1, (PLAIN_BATCH,))
        x = torch.stack([data[i:i + SEQ_LEN] for i in ix])
        y = torch.stack([data[i + 1:i + SEQ_LEN + 1] for i in ix])
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        steps += 1
    seconds = time.perf_counter() - start
    return model, {"steps": steps, "seconds": seconds, "chars_per_sec": steps * PLAIN_BATCH * SEQ_LEN / seconds,
                   "batch": PLAIN_BATCH, "final_train_loss": float(np.mean(losses[-20:]))}


def charrnn_run(data: str, hidden: int, budget: float, seed: int, threads: int, work: Path, weight_drop: float = 0.0) -> dict:
    name = f"charrnn-wd-{hidden}" if weight_drop else f"charrnn-{hidden}"
    cfg = TrainConfig.from_flat(data=data, out=str(work / name), weight_drop=weight_drop, **{
        **preset("default"), "hidden": hidden, "batch_size": PLAIN_BATCH, "seq_len": SEQ_LEN,
        "lr": PLAIN_LR, "lr_schedule": "constant", "warmup": 0, "dropout": 0.0, "weight_decay": 0.01,
        "max_steps": 0, "max_time": budget, "eval_interval": 10**9, "eval_iters": 1, "sample_chars": 0,
        "seed": seed, "device": "cpu", "threads": threads, "log_interval": 50,
    })
    run_training(cfg)
    last = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[-1])
    return {"steps": last["step"], "seconds": last["elapsed"], "chars_per_sec": last["chars_per_sec"],
            "batch": cfg.batch_size, "final_train_loss": last["train_loss"], "weights": str(Path(cfg.out) / "last.pt")}


def worker(args) -> int:
    """One trainer in its own process; writes its stats and where its weights are as JSON."""
    torch.set_num_threads(args.threads)
    work, hidden = Path(args.work), args.hidden[0]
    if args.worker == "plain":
        corpus = prepare_corpus(args.data, work / "corpus-plain")
        model, stats = plain_loop(np.asarray(corpus.train), len(corpus.vocab), hidden, args.budget, args.seed)
        stats["weights"] = str(work / f"plain-{hidden}.pt")
        torch.save(model.state_dict(), stats["weights"])
    else:
        weight_drop = args.weight_drop if args.worker == "charrnn-wd" else 0.0
        stats = charrnn_run(args.data, hidden, args.budget, args.seed, args.threads, work, weight_drop)
    (work / f"{args.worker}-{hidden}.json").write_text(json.dumps(stats))
    return 0


def load_model(name: str, weights: str, vocab: int, hidden: int) -> nn.Module:
    if name == "plain":
        model = PlainLSTM(vocab, hidden)
        model.load_state_dict(torch.load(weights))
        return model
    ckpt = torch.load(weights, weights_only=False)
    model = CharRNN(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


@torch.inference_mode()
def fresh_window_loss(model: nn.Module, val: np.ndarray) -> float:
    """Mean loss over non-overlapping SEQ_LEN windows of the validation split, each from a zero state."""
    n = (len(val) - 1) // SEQ_LEN
    ids = torch.from_numpy(val[: n * SEQ_LEN + 1].astype(np.int64))
    x, y = ids[:-1].view(n, SEQ_LEN), ids[1:].view(n, SEQ_LEN)
    model.eval()
    total = sum(F.cross_entropy(model(x[i:i + 256])[0].flatten(0, 1), y[i:i + 256].flatten(), reduction="sum").item()
                for i in range(0, n, 256))
    return total / (n * SEQ_LEN)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"), help="tiny-shakespeare text file")
    p.add_argument("--budget", type=float, default=90.0, help="seconds of training per trainer and size")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 512], help="LSTM sizes (2 layers each)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads of each trainer")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--weight-drop", type=float, default=0.0,
                   help="also run charrnn with this weight-drop, beside the other two (0: not)")
    p.add_argument("--out", default=str(ROOT / "bench/results"), help="folder for training.md and training.json")
    p.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (pass the path of tinyshakespeare.txt)")
    if args.worker:
        return worker(args)

    trainers = TRAINERS if args.weight_drop else TRAINERS[:2]
    rows = []
    fp32 = Runtime(torch.device("cpu"), rank=0, world=1, bf16=False)  # one evaluator, in float32, for both
    with tempfile.TemporaryDirectory(prefix="charrnn-bench-") as tmp:
        work = Path(tmp)
        corpus = prepare_corpus(args.data, work / "corpus")
        val = val_lanes(corpus.val, SEQ_LEN)
        for hidden in args.hidden:
            print(f"--- 2x{hidden}: {len(trainers)} trainers side by side, {args.budget:.0f} s of training each", flush=True)
            common = ["--data", args.data, "--budget", str(args.budget), "--hidden", str(hidden), "--seed", str(args.seed),
                      "--threads", str(args.threads), "--weight-drop", str(args.weight_drop), "--work", str(work)]
            procs = {name: subprocess.Popen([sys.executable, "-m", "bench.training", "--worker", name, *common],
                                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for name in trainers}
            for name, proc in procs.items():
                if proc.wait() != 0:
                    raise SystemExit(f"the {name} trainer failed (exit {proc.returncode})")
            for name in trainers:
                stats = json.loads((work / f"{name}-{hidden}.json").read_text())
                model = load_model(name, stats.pop("weights"), len(corpus.vocab), hidden)
                stats["val_carried"] = evaluate(model, val, 0, fp32)
                stats["val_fresh"] = fresh_window_loss(model, np.asarray(corpus.val))
                rows.append({"trainer": name, "hidden": hidden, **stats})
                print(json.dumps(rows[-1]), flush=True)

    table = render(rows, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.md").write_text(table)
    (out / "training.json").write_text(json.dumps({"settings": vars(args), "machine": machine(), "rows": rows}, indent=2) + "\n")
    return 0


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "load_average": os.getloadavg()}


def render(rows: list[dict], args) -> str:
    lines = [
        f"Trainer benchmark: 2-layer LSTM on tiny-shakespeare, {args.budget:.0f} s of training each, CPU"
        f" ({os.cpu_count()} cores, torch {torch.__version__}); {'all three' if args.weight_drop else 'both'} trainers at once,"
        f" {args.threads} thread(s) each{f'; charrnn-wd = charrnn with weight-drop {args.weight_drop}' if args.weight_drop else ''}.",
        "Validation: last 10% of the text; 'carried' = 64 lanes with the state carried, 'fresh' = 128-char windows"
        " from a zero state; both in float32.",
        "",
        "| model | trainer | batch x seq | steps | chars/sec | speed vs plain | val loss carried | val loss fresh |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        plain = next(p for p in rows if p["hidden"] == r["hidden"] and p["trainer"] == "plain")
        ratio = r["chars_per_sec"] / plain["chars_per_sec"]
        lines.append(
            f"| 2x{r['hidden']} | {r['trainer']} | {r['batch']} x {SEQ_LEN} | {r['steps']} | {r['chars_per_sec']:,.0f} |"
            f" {ratio:.2f}x | {r['val_carried']:.4f} | {r['val_fresh']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
