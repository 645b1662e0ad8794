"""Which recurrent kernel a training step runs, with and without weight-drop and locked dropout, and what they cost.

    python -m bench.rnn_kernels [--hidden 512] [--layers 2] [--batch 64] [--seq-len 128] [--seconds 20] [--device auto]

Weight-drop hands nn.LSTM a dropped copy of each ``weight_hh_l{k}`` through
``torch.func.functional_call``, and locked dropout between layers runs the layers
one at a time (training/model.py). Both must still reach the fused kernel that
the plain module runs: oneDNN's ``aten::mkldnn_rnn_layer`` on the CPU, cuDNN's
``aten::_cudnn_rnn`` on CUDA, never a per-step fallback (``aten::lstm_cell``,
``aten::_thnn_fused_lstm_cell``). For each variant this prints the recurrent
aten ops of one training step (forward, backward, AdamW) as the profiler saw
them, then times training steps of every variant in turn, round after round
until ``--seconds`` are spent, so that load from other work slows them alike,
and prints characters per second against the plain model's.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

# The same OpenMP wait policy as charrnn-train (see training/cli.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from charrnn.training.model import CharRNN, ModelConfig  # noqa: E402
from charrnn.training.runtime import start_runtime  # noqa: E402

VOCAB = 65  # tiny-shakespeare's characters
VARIANTS = {  # name -> the ModelConfig regularisers
    "plain": {},
    "weight-drop 0.5": {"weight_drop": 0.5},
    "weight-drop 0.5 + locked between": {"weight_drop": 0.5, "locked_dropout_between": 0.3},
}
PER_STEP_FALLBACKS = ("lstm_cell", "gru_cell", "rnn_tanh_cell", "_thnn_fused")  # what a non-fused path would show


class Step:
    """One variant's model, optimizer and batch; ``()`` runs one training step."""

    def __init__(self, args, rt, **regularisers):
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=VOCAB, layers=args.layers, hidden=args.hidden, **regularisers)
        self.model = CharRNN(config).to(rt.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.x = torch.randint(0, VOCAB, (args.batch, args.seq_len), device=rt.device)  # [B, T]
        self.y = torch.randint(0, VOCAB, (args.batch, args.seq_len), device=rt.device)
        self.rt = rt

    def __call__(self) -> None:
        with self.rt.autocast():
            logits, _ = self.model(self.x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def recurrent_ops(step: Step, cuda: bool) -> tuple[list[str], list[str]]:
    """The recurrent aten ops of one step, and the warnings it raised (cuDNN's weight compaction, say)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
        warnings.simplefilter("always")
        step()
        if cuda:
            torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if any(k in e.name for k in ("rnn", "lstm", "gru"))})
    return names, sorted({str(w.message).split(".")[0] for w in caught})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rnn_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seconds", type=float, default=20.0, help="timing budget, shared by the variants")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    args = p.parse_args(argv)
    rt = start_runtime(args.device, args.threads, args.precision)
    steps = {name: Step(args, rt, **regs) for name, regs in VARIANTS.items()}
    print(f"{args.layers}x{args.hidden} LSTM, batch {args.batch} x {args.seq_len}, {rt.device}"
          f" {'bf16' if rt.bf16 else 'fp32'}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    fused = True
    for name, step in steps.items():
        step()  # warm-up: oneDNN and cuDNN pick their algorithms on the first call
        ops, warned = recurrent_ops(step, rt.cuda)
        fallback = [op for op in ops if any(f in op for f in PER_STEP_FALLBACKS)]
        fused &= not fallback
        print(f"  {name}: {', '.join(ops)}{'  PER-STEP FALLBACK' if fallback else ''}")
        for w in warned:
            print(f"    warning: {w}")

    seconds = {name: 0.0 for name in steps}
    counts = {name: 0 for name in steps}
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:  # round-robin, a few steps of each variant per round
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(3):
                step()
            if rt.cuda:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
            counts[name] += 3
    chars = args.batch * args.seq_len
    plain = counts["plain"] * chars / seconds["plain"]
    print("\n| variant | steps | chars/sec | vs plain |\n| --- | ---: | ---: | ---: |")
    for name in steps:
        rate = counts[name] * chars / seconds[name]
        print(f"| {name} | {counts[name]} | {rate:,.0f} | {rate / plain:.2f}x |")
    print(f"\nfused kernel in every variant: {'yes' if fused else 'NO'}")
    return 0 if fused else 1


if __name__ == "__main__":
    raise SystemExit(main())
