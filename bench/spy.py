"""Where a loaded server's time goes, by py-spy: the engine core's and the front-end's threads under load.

    python -m bench.spy [--model models/default/2/model.onnx] [--concurrency 128] [--seconds 12]
                        [--server-args "--decode-steps 8"] [--out bench/results/spy-128.md]

Starts one real charrnn-serve (bench/serving.py's ServerProcess), puts the load generator on it
(bench/loadgen.py, its own processes), and while the load runs samples the engine core process and the
front-end process with py-spy (``record --format raw --threads``, 200 samples a second, idle samples left
out). Writes, per process: the samples of each thread, the functions with the most samples of their own
(where the CPU is spent: a C extension's time is its Python caller's line), and charrnn's functions by the
samples under them. py-spy is not a dependency of the project: ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.serving import ServerProcess, load
from charrnn import modelfile as mf
from testkit import probes

RESULTS = Path(__file__).parent / "results"


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--threads", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def summary(raw: Path, top: int = 15) -> dict:
    """Samples per thread, per leaf function, and under each charrnn function, from py-spy's raw output."""
    threads, own, under = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        frames, n = stack.split(";"), int(n)
        total += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for f in set(frames[1:]):
            if "service/" in f or "charrnn" in f:
                under[f] += n
    return {"samples": total, "threads": threads.most_common(8), "own": own.most_common(top),
            "under": under.most_common(top)}


def markdown(report: dict) -> str:
    lines = [f"# Where the time goes: {report['model']}", "",
             f"`{report['command']}`: {report['concurrency']} streams through gRPC, {report['result']}; py-spy "
             f"sampled each process {report['seconds']:g} s at 200 Hz while the load ran (idle samples left out: "
             "a thread waiting on a lock, a poll or a socket is not counted).", ""]
    for name, s in report["processes"].items():
        lines += [f"## {name} ({s['samples']} samples)", "", "| thread | samples | share |", "| --- | ---: | ---: |"]
        lines += [f"| {t} | {n} | {n / s['samples']:.0%} |" for t, n in s["threads"]]
        lines += ["", "Functions by their own samples:", "", "| function | samples | share |", "| --- | ---: | ---: |"]
        lines += [f"| {f} | {n} | {n / s['samples']:.0%} |" for f, n in s["own"]]
        lines += ["", "charrnn's functions by the samples under them:", "", "| function | samples | share |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {f} | {n} | {n / s['samples']:.0%} |" for f, n in s["under"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spy", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/default/2/model.onnx")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--seconds", type=float, default=12.0, help="seconds each process is sampled")
    p.add_argument("--max-chars", type=int, default=400)
    p.add_argument("--server-args", default="", help="more charrnn-serve flags, e.g. '--decode-steps 8'")
    p.add_argument("--out", help="markdown file (default bench/results/spy-<concurrency>.md)")
    a = p.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("bench.spy needs py-spy on the PATH: pip install py-spy", file=sys.stderr)
        return 2
    from charrnn.service.runtime import load_model

    meta = load_model(a.model, "spy", 1, "cpu").metadata
    work = Path(tempfile.mkdtemp(prefix="charrnn-spy-"))
    (work / "repo" / "m" / "1").mkdir(parents=True)
    shutil.copy(a.model, work / "repo" / "m" / "1" / mf.MODEL_FILE)
    server = ServerProcess(work / "repo", True, "cpu", a.concurrency, 0, extra=tuple(a.server_args.split()))
    try:
        core = next(pid for pid, cmd in probes.children(server.proc.pid).items() if "charrnn.service.corerun" in cmd)
        result: dict = {}
        loading = threading.Thread(target=lambda: result.update(load(
            server, a.concurrency, a.seconds + 8, 2.0, a.max_chars, "".join(meta.vocab))))
        loading.start()
        time.sleep(4.0)  # past the load generator's start and the warm-up
        spies = {"engine core process": (work / "core.txt", record(core, a.seconds, work / "core.txt")),
                 "front-end process": (work / "frontend.txt", record(server.proc.pid, a.seconds, work / "frontend.txt"))}
        for name, (_, spy) in spies.items():
            if spy.wait() != 0:
                raise RuntimeError(f"py-spy failed on the {name}: {spy.stderr.read()[-2000:]}")
        loading.join()
    finally:
        server.stop()
    report = {
        "model": f"{meta.cell.upper()} {meta.layers}x{meta.hidden} ({a.model})",
        "command": "python -m bench.spy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "concurrency": a.concurrency, "seconds": a.seconds,
        "result": (f"{result['chars_per_s']:,.0f} chars/s, server CPU {result['server_cpu_us_per_char']:.1f} µs per "
                   "character"),
        "processes": {name: summary(path) for name, (path, _) in spies.items()},
    }
    out = Path(a.out) if a.out else RESULTS / f"spy-{a.concurrency}.md"
    out.write_text(markdown(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
