"""What the caller API's controls cost: 128 streams on the real charrnn-serve, with and without them.

    python -m bench.caller_api                 # about 4 minutes on 2 cores
    python -m bench.caller_api --streams 64 --duration 6

Serves one 2x512 LSTM (bench/serving.py finds or makes it) with this tree's
charrnn-serve and with the revision before the caller API (--baseline-rev, via
bench/oldtree.py), then drives each with the load generator at the same
concurrency, once per row and round, rows interleaved so that a noisy neighbour
hits them alike; the best round of each row is kept. Rows:

- before: the earlier revision, no controls (what "no cost when unused" is measured against);
- none: this tree, no controls;
- logprobs 5: each character with its log-probability and 5 alternatives;
- all controls: logprobs 5, logit bias, allowed characters and all three penalties;
- regex: a line-of-words expression that never completes (streams end by length, as the others do);
- all + regex: both.

Each row's chars/s is divided by the "none" row of the same run; "none" by "before".
Writes bench/results/caller_api.md and caller_api.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import serving

RESULTS = Path(__file__).parent / "results"
ALLOWED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.!?;:'\n-"
ALL = {"logprobs": 5, "logit_bias": {"e": 1.5, "z": -5.0, "\n": 0.5}, "allowed_chars": ALLOWED,
       "presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2}
REGEX = r"([A-Z][a-z]*[,.!?]?( [a-z]+[,.!?;]?)*\n)+"
ROWS = [("before", None, True), ("none", None, False), ("logprobs 5", {"logprobs": 5}, False),
        ("all controls", ALL, False), ("regex", {"regex": REGEX}, False), ("all + regex", {**ALL, "regex": REGEX}, False)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Cost of the caller API's controls (see bench/caller_api.py).")
    p.add_argument("--streams", type=int, default=128, help="concurrent streams")
    p.add_argument("--duration", type=float, default=8, help="seconds of load per point")
    p.add_argument("--warmup", type=float, default=2, help="seconds of each point not counted")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all rows; the best of each row is kept")
    p.add_argument("--max-chars", type=int, default=400, help="longest request, characters")
    p.add_argument("--baseline-rev", default="f7ef94c", help="the revision before the caller API")
    p.add_argument("--model", default="", help="serve this 2x512 model file (default: found or made)")
    p.add_argument("--out", default=str(RESULTS), help="folder for caller_api.md and caller_api.json")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="charrnn-caller-bench-"))
    repo = serving.one_model_repo(work, a.model)
    servers = {
        "now": serving.ServerProcess(repo, True, "cpu", 2 * a.streams, 0, name="now"),
        "before": serving.ServerProcess(repo, True, "cpu", 2 * a.streams, 0, rev=a.baseline_rev,
                                        name="before"),
    }
    best: dict[str, dict] = {}
    try:
        for rnd in range(a.rounds):
            for name, controls, old in ROWS:
                server = servers["before" if old else "now"]
                r = serving.load(server, a.streams, a.duration, a.warmup, a.max_chars, serving.VOCAB_65, controls)
                bad = {k: v for k, v in r["codes"].items() if k != "OK"}
                if bad:
                    raise RuntimeError(f"row {name}: requests failed: {bad}")
                print(f"round {rnd + 1} {name:>13}: {r['chars_per_s']:>9,.0f} chars/s  "
                      f"server {r['server_cpu_us_per_char']:.0f} µs CPU/char", flush=True)
                if name not in best or r["chars_per_s"] > best[name]["chars_per_s"]:
                    best[name] = r
    finally:
        for s in servers.values():
            s.stop()
    none = best["none"]["chars_per_s"]
    report = {
        "command": "python -m bench.caller_api " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "date": time.strftime("%Y-%m-%d"), "streams": a.streams, "duration": a.duration, "warmup": a.warmup,
        "rounds": a.rounds, "baseline_rev": a.baseline_rev, "regex": REGEX, "all_controls": ALL,
        "rows": [{"row": name, **best[name],
                  "vs_none": best[name]["chars_per_s"] / none,
                  "vs_before": best[name]["chars_per_s"] / best["before"]["chars_per_s"]} for name, _, _ in ROWS],
    }
    serving.write_report(Path(a.out), "caller_api", report, markdown(report))
    return 0


def markdown(r: dict) -> str:
    lines = [f"# Caller API cost at {r['streams']} streams", "",
             f"`{r['command']}` on {r['machine']}, {r['date']}: a 2x512 LSTM on the CPU, {r['duration']:g} s of "
             f"load per point (first {r['warmup']:g} s not counted), best of {r['rounds']} interleaved rounds. "
             f"\"before\" is charrnn-serve at {r['baseline_rev']}, before the caller API.", "",
             f"All controls: `{json.dumps(r['all_controls'])}`. Regex: `{r['regex']}`.", "",
             "| row | chars/s | / none | / before | server CPU µs per char | TTFC p99 ms |",
             "| :--- | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {row['row']} | {row['chars_per_s']:,.0f} | {row['vs_none']:.2f}x | {row['vs_before']:.2f}x "
                     f"| {row['server_cpu_us_per_char']:.0f} | {1e3 * row['ttfc_p99']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
