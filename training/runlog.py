"""What a run leaves for people to read, in its run folder.

    metrics.jsonl  one JSON object per evaluation: step, train_loss, val_loss (ema_val_loss), lr, chars_per_sec, elapsed
    steps.jsonl    one JSON object per optimizer step: step, loss, lr, seq_len
    samples.txt    text sampled at each evaluation, at each temperature
    curves.png     train and validation loss against step, redrawn at each evaluation

All files are appended to; a resumed run first cuts them back to the step of
its checkpoint, so they read as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
SAMPLES = "samples.txt"
CURVES = "curves.png"


class RunLog:
    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.metrics, self.steps = run_dir / METRICS, run_dir / STEPS
        self.samples, self.curves = run_dir / SAMPLES, run_dir / CURVES

    def restart_at(self, step: int) -> None:
        """Drops every record after ``step`` (a fresh run: step 0 drops everything)."""
        for path in (self.metrics, self.steps):
            if path.is_file():
                keep = [line for line in path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= step]
                path.write_text("".join(line + "\n" for line in keep))
        if self.samples.is_file():
            keep, current = [], None
            for line in self.samples.read_text().splitlines(keepends=True):
                if line.startswith("=== step "):
                    current = _sample_step(line)
                if current is not None and current <= step:
                    keep.append(line)
            self.samples.write_text("".join(keep))
        if step == 0:
            self.curves.unlink(missing_ok=True)

    def add_steps(self, records: list[dict]) -> None:
        with open(self.steps, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def add_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def add_samples(self, step: int, val_loss: float, samples: list[tuple[float, str]]) -> str:
        """Appends the samples and returns them as the text shown in the log."""
        text = f"=== step {step} (val loss {val_loss:.4f})\n" + "".join(
            f"--- temperature {t}\n{s}\n" for t, s in samples
        )
        with open(self.samples, "a") as f:
            f.write(text + "\n")
        return text

    def read(self, which: str) -> list[dict]:
        path = self.metrics if which == "metrics" else self.steps
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def draw_curves(self) -> None:
        """Rewrites curves.png from the records on disk (matplotlib's Agg backend: no display needed)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, evals = self.read("steps"), self.read("metrics")
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        if steps:
            window = max(1, len(steps) // 200)  # a moving mean over ~0.5% of the run keeps the line readable
            xs = [r["step"] for r in steps]
            ys = [r["loss"] for r in steps]
            smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, color="tab:blue", alpha=0.6, linewidth=1, label="train (per step, smoothed)")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red", label="validation")
            if "ema_val_loss" in evals[-1]:
                ax.plot([r["step"] for r in evals], [r["ema_val_loss"] for r in evals], "^-", color="tab:purple",
                        markersize=4, label="validation, moving average of the weights")
            ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "s--", color="tab:blue", markersize=3, label="train (mean since last eval)")
            loss, step = min((min(r["val_loss"], r.get("ema_val_loss", math.inf)), r["step"]) for r in evals)
            ax.set_title(f"best val loss {loss:.4f} at step {step}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / character)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.curves.with_suffix(".png.tmp")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(self.curves)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


def _sample_step(head: str) -> int | None:
    try:
        return int(head.split()[2])  # "=== step 250 (val loss ...)"
    except (IndexError, ValueError):
        return None
