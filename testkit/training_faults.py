"""Faults injected into `charrnn-train`: SIGKILL at random moments, and a disk that fills up.

``kill_and_resume`` runs the same tiny training twice: once without a stop,
once killed with SIGKILL at random steps (several times; some kills land while
a checkpoint is being written) and resumed with --resume after each kill. The
resumed run must reproduce the uninterrupted one exactly: every per-step loss
and learning rate, every evaluation, and the final weights.

``disk_full_during_checkpoint`` resumes a run in a folder on a tmpfs that has
room for everything but the next last.pt (or, where tmpfs cannot be mounted,
under an RLIMIT_FSIZE below the checkpoint's size): training must stop with a
message naming the file, and the last good checkpoint must still load.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TRAIN = str(Path(sys.executable).parent / "charrnn-train")
TIMING_FIELDS = ("elapsed", "chars_per_sec")  # metrics.jsonl fields that measure time, not training


def corpus(path: Path, chars: int = 20_000) -> Path:
    """A small training text: the head of tiny-shakespeare when the machine has it, else generated verse."""
    shared = Path("/work/shared/data/tinyshakespeare.txt")
    if shared.is_file():
        text = shared.read_text(encoding="utf-8")[:chars]
    else:
        rng = random.Random(0)
        words = ["thou", "art", "the", "king", "and", "my", "lord", "of", "love", "death", "night", "speak"]
        text = "\n".join(" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(chars // 40))
    path.write_text(text, encoding="utf-8")
    return path


def train_argv(data: Path, out: Path, max_steps: int, eval_interval: int, *extra: str) -> list[str]:
    return [TRAIN, "--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu", "--threads", "1",
            "--max-steps", str(max_steps), "--eval-interval", str(eval_interval), "--seed", "7", *extra]


def records(path: Path, drop: tuple = ()) -> list[dict]:
    """The JSON lines of ``path`` without the ``drop`` fields; a line a killed run left half-written reads as
    {"unreadable": line}."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append({k: v for k, v in json.loads(line).items() if k not in drop})
        except json.JSONDecodeError:
            rows.append({"unreadable": line})
    return rows


def steps_logged(out: Path) -> int:
    """Lines in OUT/steps.jsonl: the steps a run has logged so far."""
    try:
        with open(out / "steps.jsonl", "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_for_checkpoint_write(out: Path, proc: subprocess.Popen, timeout: float = 5.0) -> bool:
    """Spins until a checkpoint's temporary file (save_checkpoint's ".last.pt.*.tmp") exists; False if none showed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(name.endswith(".tmp") and name.startswith((".last.pt.", ".best.pt.")) for name in os.listdir(out)):
            return True
    return False


def _weights(path: Path) -> dict:
    from charrnn.training.checkpoint import load_checkpoint  # torch: only where training runs

    return load_checkpoint(path)["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def kill_and_resume(workdir: Path, kills: int, seed: int = 0, max_steps: int = 300, eval_interval: int = 25,
                    env: dict | None = None) -> dict:
    """See the module docstring. Returns the kill points, the resumes and what matched."""
    rng = random.Random(seed)
    data = corpus(workdir / "corpus.txt")
    whole, cut = workdir / "whole", workdir / "cut"
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(train_argv(data, whole, max_steps, eval_interval), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (rc {done.returncode}):\n{done.stderr[-3000:]}")

    kill_log, resumes = [], []
    previous = 0
    for i, point in enumerate(sorted(rng.sample(range(1, max_steps - eval_interval), kills))):
        # Every other kill waits for an evaluation step and strikes while a checkpoint file is being written.
        in_write = i % 2 == 1
        target = max(point, previous + 1)
        if in_write:
            target = -(-target // eval_interval) * eval_interval
        if target >= max_steps:
            break
        proc = subprocess.Popen(train_argv(data, cut, max_steps, eval_interval, "--resume"), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while steps_logged(cut) < target and proc.poll() is None:
            time.sleep(0.002)
        caught = in_write and _wait_for_checkpoint_write(cut, proc)
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate()[0]
        resumed = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines() if line.startswith("resumed from ")]
        resumes.extend(resumed)
        previous = steps_logged(cut)  # the next kill aims past what this run logged (startup shows it still)
        kill_log.append({"target_step": target, "steps_logged_at_kill": previous,
                         "during_checkpoint_write": caught, "killed": proc.returncode == -signal.SIGKILL,
                         "resumed_from": resumed[0] if resumed else 0})
    final = subprocess.run(train_argv(data, cut, max_steps, eval_interval, "--resume"), env=env,
                           capture_output=True, text=True)
    resumes.extend(int(line.rsplit(" ", 1)[1]) for line in (final.stdout + final.stderr).splitlines()
                   if line.startswith("resumed from "))

    steps_a, steps_b = records(whole / "steps.jsonl"), records(cut / "steps.jsonl")
    metrics_a, metrics_b = (records(d / "metrics.jsonl", TIMING_FIELDS) for d in (whole, cut))
    first_diff = next((i for i, (a, b) in enumerate(zip(steps_a, steps_b)) if a != b), None)
    return {
        "kills": kill_log,
        "killed_runs": sum(k["killed"] for k in kill_log),
        "killed_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in kill_log),
        "resumes": resumes,  # the step each run with a checkpoint resumed from
        "final_returncode": final.returncode,
        "final_stderr": final.stderr[-2000:] if final.returncode else "",
        "steps_compared": len(steps_a),
        "steps_equal": steps_a == steps_b,
        "first_different_step": None if first_diff is None else steps_a[first_diff].get("step"),
        "evaluations_compared": len(metrics_a),
        "evaluations_equal": metrics_a == metrics_b,
        "final_weights_equal": _same_weights(whole / "last.pt", cut / "last.pt"),
    }


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def disk_full_during_checkpoint(workdir: Path, env: dict | None = None) -> dict:
    """See the module docstring. Returns how the run stopped and what the last checkpoint holds."""
    from charrnn.training.checkpoint import load_checkpoint

    data = corpus(workdir / "corpus.txt")
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    first = workdir / "first"
    done = subprocess.run(train_argv(data, first, 40, 20), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the first run failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    sizes = {p.name: p.stat().st_size for p in first.iterdir()}
    # Room for the next curves.png and best.pt (each written beside the old one, then swapped)
    # but not for the next last.pt: halfway between what the first two and the third need.
    small = max(sizes["curves.png"], sizes["best.pt"]) + 16 * 1024
    room = (small + sizes["last.pt"]) // 2
    mnt = workdir / "disk"
    used = sum(-(-n // 4096) * 4096 for n in sizes.values()) + 4096  # tmpfs counts whole pages
    limit = None
    if _mount_tmpfs(mnt, used + room):
        how = "tmpfs"
    else:
        how, limit = "RLIMIT_FSIZE", sizes["last.pt"] - 1024  # any file the size of a checkpoint is refused
    try:
        run = mnt / "run"
        shutil.copytree(first, run)
        before = load_checkpoint(run / "last.pt")["step"]

        def cap() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        proc = subprocess.run(train_argv(data, run, 100, 20, "--resume"), env=env, capture_output=True, text=True,
                              preexec_fn=cap)
        after = load_checkpoint(run / "last.pt")
        leftovers = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
        stderr_lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]  # tqdm: \r
        return {
            "how": how,
            "returncode": proc.returncode,
            "error": next((line[line.index("charrnn-train: error"):] for line in stderr_lines
                           if "charrnn-train: error" in line), ""),  # may follow a progress bar on its line
            "last_stderr_line": stderr_lines[-1] if stderr_lines else "",
            "traceback": "Traceback" in proc.stderr,
            "checkpoint_step_before": before,
            "checkpoint_step_after": after["step"],
            "checkpoint_loads": True,
            "temporary_files_left": leftovers,
        }
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(mnt)], capture_output=True)
