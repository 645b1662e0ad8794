"""How long `charrnn-serve` takes to exit after SIGTERM, and how much of it comes after it logged "stopped".

    python -m bench.shutdown [--runs 5] [--models models]

Kubernetes counts every second from SIGTERM to the process's exit against the
pod's termination grace period. The server drains (streams in flight finish),
closes its ports, logs "stopped" and then ends at once (logs.exit_now). The
baseline in the same run is the same server ended the ordinary way, through
the interpreter's finalization (``sys.exit(main())``), which garbage-collects
the heap of every imported module. Each run serves one Generate request and
one HTTP completion before the signal, so the heaps are those of a server
that has worked.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from charrnn.service.client import GeneratorClient

SERVE = str(Path(sys.executable).parent / "charrnn-serve")
VARIANTS = {
    "charrnn-serve (exit at once)": [SERVE],
    "baseline: sys.exit(main())": [sys.executable, "-c",
                                   "import sys; from charrnn.service.server import main; sys.exit(main())"],
}


def one_run(argv: list[str], models: str) -> tuple[float, float]:
    """(seconds from SIGTERM to "stopped", seconds from "stopped" to the exit)."""
    proc = subprocess.Popen([*argv, "--models", models, "--port", "0", "--metrics-port", "0", "--http-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    lines: list[str] = []

    def pump(pipe):
        for line in pipe:
            lines.append(line)
            if " stopped" in line:
                marks["stopped"] = time.monotonic()
            if line.lstrip().startswith("try"):
                marks["ready"] = time.monotonic()

    pumps = [threading.Thread(target=pump, args=(pipe,), daemon=True) for pipe in (proc.stdout, proc.stderr)]
    for t in pumps:
        t.start()
    while "ready" not in marks:
        if proc.poll() is not None:
            raise RuntimeError("the server ended before it served:\n" + "".join(lines))
        time.sleep(0.05)
    grpc_target = next(ln.split()[1] for ln in lines if ln.strip().startswith("gRPC"))
    http_url = next(ln.split()[1] for ln in lines if ln.strip().startswith("HTTP"))
    with GeneratorClient(grpc_target) as client:
        client.generate("ROMEO:", 100, seed=1).text()
    body = json.dumps({"prompt": "A", "max_tokens": 20}).encode()
    urllib.request.urlopen(urllib.request.Request(http_url + "v1/completions", body,
                                                  {"content-type": "application/json"}), timeout=30).read()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    ended = time.monotonic()
    for t in pumps:  # the last lines are read (the mark of "stopped" was taken when its line arrived)
        t.join(10)
    return marks["stopped"] - sent, ended - marks["stopped"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--models", default="models")
    a = p.parse_args()
    results = {name: [] for name in VARIANTS}
    for _ in range(a.runs):  # interleaved, so that both see the same machine
        for name, argv in VARIANTS.items():
            results[name].append(one_run(argv, a.models))
    print(f"SIGTERM to exit, {a.runs} runs each, medians (seconds)\n")
    print("| server | SIGTERM to \"stopped\" | \"stopped\" to exit | SIGTERM to exit |")
    print("| --- | ---: | ---: | ---: |")
    for name, runs in results.items():
        drain = statistics.median(r[0] for r in runs)
        after = statistics.median(r[1] for r in runs)
        total = statistics.median(r[0] + r[1] for r in runs)
        print(f"| {name} | {drain:.2f} | {after:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
