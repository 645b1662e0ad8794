"""Elastic training across two nodes on one machine: faults against the uninterrupted run, as a table.

    python -m bench.multinode [--device cpu] [--nproc 1] [--steps 60] [--kill-after 30] [--data PATH] [--out bench/results]

Two torchrun launchers on 127.0.0.1 (c10d rendezvous; testkit/multinode.py)
train the tiny preset three times into three run folders: without a fault;
with a worker of node 1 killed by SIGKILL once ``--kill-after`` steps are
logged (torchrun --max-restarts restarts every rank); with node 1's launcher
and workers killed together and node 1 started again. Each faulty run must
resume from the last checkpoint and end where the uninterrupted one ends: the
table compares every step's loss and the final weights' sha256. On the CPU they
are equal to the bit (tests/test_training_multinode.py holds it to that); with
``--device cuda`` each node gets ``--nproc`` GPUs of its own (NCCL) and the table
shows how far cuDNN's kernels let the resumed losses drift, if at all.
Writes ``OUT/multinode.md`` and ``.json`` (``multinode_cuda`` on a GPU) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from testkit.multinode import two_node_run

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
EVAL_INTERVAL = 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="ranks per node (GPUs per node with --device cuda)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill-after", type=int, default=30, help="steps logged before the fault (past a checkpoint)")
    p.add_argument("--chars", type=int, default=200_000, help="characters of --data to train on")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)

    node_env = ({}, {}) if args.device == "cpu" else tuple(
        {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(i * args.nproc, (i + 1) * args.nproc))} for i in (0, 1))
    extra = ("--device", args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="charrnn-multinode-") as tmp:
        work = Path(tmp)
        data = work / "corpus.txt"
        data.write_text(Path(args.data).read_text(encoding="utf-8")[: args.chars], encoding="utf-8")
        runs = {}
        for fault in ("", "worker", "node"):
            runs[fault] = two_node_run(work, data, fault or "whole", args.steps, EVAL_INTERVAL, fault=fault,
                                       kill_after=args.kill_after, max_restarts=2 if fault else 0, timeout=900,
                                       extra=extra, nproc=args.nproc, node_env=node_env)
            if runs[fault]["returncodes"] != [0, 0]:
                raise SystemExit(f"the {fault or 'uninterrupted'} run failed:\n{runs[fault]['output'][-3000:]}")
        whole = runs[""]
        for fault, run in runs.items():
            drift = max((abs(a["loss"] - b["loss"]) for a, b in zip(whole["steps"], run["steps"])), default=0.0)
            rows.append({
                "run": {"": "uninterrupted", "worker": "a worker of node 1 killed (SIGKILL)",
                        "node": "node 1 killed whole, then started again"}[fault],
                "fault_after_steps": run["killed"]["steps_logged"] if run["killed"] else None,
                "resumed_from": run["resumed_from"], "seconds": run["seconds"], "steps": len(run["steps"]),
                "steps_equal": run["steps"] == whole["steps"], "max_loss_difference": drift,
                "evaluations_equal": run["metrics"] == whole["metrics"], "digest": run["digest"],
                "digest_equal": run["digest"] == whole["digest"],
            })
    table = render(rows, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "multinode" if args.device == "cpu" else "multinode_cuda"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"settings": vars(args), "cpu_count": os.cpu_count(), "rows": rows},
                                                 indent=2) + "\n")
    return 0


def render(rows: list[dict], args) -> str:
    lines = [
        f"Two torchrun launchers on 127.0.0.1 as two nodes ({args.nproc} rank(s) each, {args.device}), c10d rendezvous,"
        f" the tiny preset, {args.steps} steps, a checkpoint every {EVAL_INTERVAL}, --resume; each fault once"
        f" {args.kill_after} steps were logged, under --max-restarts 2.",
        f"Command: `{' '.join(['python -m bench.multinode', *sys.argv[1:]])}`",
        "",
        "| run | fault after step | resumed from | seconds | per-step losses | largest loss difference |"
        " evaluations | final weights sha256 | same weights |",
        "| --- | ---: | --- | ---: | --- | ---: | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['fault_after_steps'] or '-'} | {', '.join(map(str, r['resumed_from'])) or '-'} |"
            f" {r['seconds']:.0f} | {'equal' if r['steps_equal'] else 'differ'} ({r['steps']}) |"
            f" {r['max_loss_difference']:.2g} | {'equal' if r['evaluations_equal'] else 'differ'} |"
            f" `{(r['digest'] or '-')[:16]}` | {'yes' if r['digest_equal'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
