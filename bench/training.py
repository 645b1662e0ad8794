"""Trainer benchmark: charrnn's trainer against a plain PyTorch loop, same model, same wall time, same CPU.

    python -m bench.training [--data PATH] [--budget SECONDS] [--hidden 256 512] [--out bench/results]

For each model size (2-layer LSTM of ``--hidden`` units) both trainers run for
``--budget`` seconds of training on tiny-shakespeare's first 90%, one after the
other, then both models are scored by one evaluator on the last 10%:

- charrnn: ``charrnn.training`` as ``charrnn-train --preset default`` runs it
  (lanes with the recurrent state carried between batches, AdamW foreach,
  no per-step host sync, warm-up + cosine over the time budget).
- plain: the loop most tutorials write: Embedding -> nn.LSTM -> Linear, AdamW
  with its defaults, random windows from a zero state, ``loss.item()`` every step.

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
import tempfile
import time
from pathlib import Path

# The same OpenMP wait policy as charrnn-train, for both trainers (see training/cli.py); before torch loads.
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
PLAIN_BATCH = 32  # windows per step in the plain loop


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
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
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


def charrnn_run(data: str, hidden: int, budget: float, seed: int, work: Path):
    cfg = TrainConfig(data=data, out=str(work / f"charrnn-{hidden}"), **{
        **preset("default"), "hidden": hidden, "max_steps": 0, "max_time": budget, "eval_interval": 10**9,
        "sample_chars": 0, "seed": seed, "device": "cpu", "log_interval": 50,
    })
    run_training(cfg)
    last = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[-1])
    ckpt = torch.load(Path(cfg.out) / "last.pt", weights_only=False)
    model = CharRNN(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    seconds = last["elapsed"]
    return model, {"steps": last["step"], "seconds": seconds, "chars_per_sec": last["chars_per_sec"],
                   "batch": cfg.batch_size, "final_train_loss": last["train_loss"]}


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
    p.add_argument("--budget", type=float, default=60.0, help="seconds of training per trainer and size")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 512], help="LSTM sizes (2 layers each)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=str(ROOT / "bench/results"), help="folder for training.md and training.json")
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (pass the path of tinyshakespeare.txt)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="charrnn-bench-") as tmp:
        work = Path(tmp)
        corpus = prepare_corpus(args.data, work / "corpus")
        val = val_lanes(corpus.val, SEQ_LEN)
        for hidden in args.hidden:
            for name in ("plain", "charrnn"):
                print(f"--- {name} 2x{hidden}: {args.budget:.0f} s of training", flush=True)
                if name == "plain":
                    model, stats = plain_loop(np.asarray(corpus.train), len(corpus.vocab), hidden, args.budget, args.seed)
                else:
                    model, stats = charrnn_run(args.data, hidden, args.budget, args.seed, work)
                fp32 = Runtime(torch.device("cpu"), rank=0, world=1, bf16=False)  # one evaluator, in float32, for both
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
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "processor": platform.processor() or platform.machine()}


def render(rows: list[dict], args) -> str:
    lines = [
        f"Trainer benchmark: 2-layer LSTM on tiny-shakespeare, {args.budget:.0f} s of training each, CPU"
        f" ({os.cpu_count()} cores, torch {torch.__version__}).",
        "Validation: last 10% of the text; 'carried' = 64 lanes with the state carried, 'fresh' = 128-char windows from a zero state.",
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
