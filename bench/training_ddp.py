"""Trainer throughput across data-parallel ranks: characters per second for 1, 2, 4, ... ranks under torchrun.

    python -m bench.training_ddp [--ranks 1,2,4] [--nodes 1] [--device cpu] [--preset default] [--steps 60]
                                 [--repeats 3] [--data PATH] [--out bench/results]

Each point is one `charrnn-train` run of ``--steps`` steps under
``torchrun --standalone --nproc-per-node N`` (with ``--nodes 2``: two launchers
on 127.0.0.1, c10d rendezvous, N/2 ranks each; testkit/multinode.py). The run
evaluates at half time and at the end; its rate is the second half's
``chars_per_sec`` from metrics.jsonl: the characters of all ranks over the
training time, evaluations excluded (the first half holds the start-up and the
first steps). The batch per rank is the preset's, so N ranks train on N times
the characters per step (weak scaling, the way DistributedDataParallel scales).

On the CPU every rank gets cores / N torch threads (at least one), so all points
use the same cores. The points run round-robin (1, 2, 4, 1, 2, 4, ...) so that
other load on the machine falls on all of them alike; the table gives each
point's median and range, and the load average around the runs. Writes
``OUT/training_ddp.md`` and ``.json`` (``training_ddp_cuda`` on a GPU) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testkit.multinode import TwoNodes

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (default 1,2,4)")
    p.add_argument("--nodes", type=int, choices=[1, 2], default=1,
                   help="1: torchrun --standalone; 2: two launchers on 127.0.0.1 (rank counts must be even)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one rank per GPU")
    p.add_argument("--preset", default="default", help="charrnn-train preset: the model and the batch per rank")
    p.add_argument("--steps", type=int, default=60, help="steps per run; the second half is measured")
    p.add_argument("--repeats", type=int, default=3, help="runs per point, round-robin over the points")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to one run")
    return p.parse_args(argv)


def train_args(args, out: Path, ranks: int) -> list[str]:
    flags = ["--data", args.data, "--out", str(out), "--preset", args.preset, "--device", args.device,
             "--max-steps", str(args.steps), "--eval-interval", str(args.steps // 2), "--eval-iters", "2",
             "--sample-chars", "0", "--lr-schedule", "constant", "--warmup", "0"]
    if args.device == "cpu":
        flags += ["--threads", str(threads_per_rank(ranks))]
    return flags


def threads_per_rank(ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // ranks)


def one_run(args, ranks: int, work: Path, name: str) -> dict:
    out = work / name
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    if args.nodes == 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "charrnn.training.cli", *train_args(args, out, ranks)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode:
            raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    else:
        per_node = ranks // 2
        gpus = [{}, {}] if args.device == "cpu" else [
            {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(i * per_node, (i + 1) * per_node))} for i in (0, 1)]
        flags = train_args(args, out, ranks)
        with TwoNodes(work / f"{name}-logs", (flags, flags), nproc=per_node, node_env=tuple(gpus)) as nodes:
            codes = nodes.wait(args.timeout)
            if codes != [0, 0]:
                raise SystemExit(f"{name} failed (exits {codes}):\n{nodes.output()[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": ranks, "chars_per_sec": metrics[-1]["chars_per_sec"], "seconds": round(time.monotonic() - started, 1),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = [int(r) for r in args.ranks.split(",")]
    if args.nodes == 2 and any(r % 2 for r in counts):
        raise SystemExit("--nodes 2 needs even rank counts (each node runs half)")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="charrnn-ddp-") as tmp:
        for repeat in range(args.repeats):
            for ranks in counts:
                run = one_run(args, ranks, Path(tmp), f"r{ranks}-{repeat}")
                runs.append(run)
                print(json.dumps(run), flush=True)
    rows = summarize(runs, counts)
    table = render(rows, runs, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "training_ddp" if args.device == "cpu" else "training_ddp_cuda"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"settings": vars(args), "machine": machine(), "rows": rows,
                                                  "runs": runs}, indent=2) + "\n")
    return 0


def summarize(runs: list[dict], counts: list[int]) -> list[dict]:
    rows = []
    for ranks in counts:
        rates = [r["chars_per_sec"] for r in runs if r["ranks"] == ranks]
        rows.append({"ranks": ranks, "median": statistics.median(rates), "min": min(rates), "max": max(rates)})
    base = rows[0]["median"] / rows[0]["ranks"]  # per rank, at the smallest count
    for row in rows:
        row["speedup"] = row["median"] / rows[0]["median"]
        row["efficiency"] = row["median"] / (base * row["ranks"])
    return rows


def machine() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def render(rows: list[dict], runs: list[dict], args) -> str:
    from charrnn.training.presets import preset

    p = preset(args.preset)
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    m = machine()
    where = (f"CPU ({m['cpu_count']} cores), cores / ranks torch threads per rank" if args.device == "cpu"
             else f"CUDA ({', '.join(m.get('gpus', []))}), one GPU per rank")
    launch = "torchrun --standalone" if args.nodes == 1 else "two torchrun launchers on 127.0.0.1 (c10d rendezvous)"
    lines = [
        f"Trainer throughput across data-parallel ranks: preset `{args.preset}` (LSTM {p['layers']}x{p['hidden']},"
        f" batch {p['batch_size']} x {p['seq_len']} per rank), {where}, torch {m['torch']}; {launch}.",
        f"{args.steps} steps per run, the second half measured; {args.repeats} runs per point, round-robin;"
        f" 1-minute load average {min(loads):.1f} to {max(loads):.1f} around the runs.",
        f"Command: `{' '.join(['python -m bench.training_ddp', *sys.argv[1:]])}`",
        "",
        "| ranks | threads per rank | characters per step | chars/s (median) | min - max | vs the first row | per-rank efficiency |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        threads = threads_per_rank(r["ranks"]) if args.device == "cpu" else "-"
        lines.append(
            f"| {r['ranks']} | {threads} | {p['batch_size'] * p['seq_len'] * r['ranks']:,} | {r['median']:,.0f} |"
            f" {r['min']:,.0f} - {r['max']:,.0f} | {r['speedup']:.2f}x | {r['efficiency']:.0%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
