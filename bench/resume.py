"""What resuming a cut stream costs: time to the first new character of a stream resumed at 1,000 characters.

    python -m bench.resume [--model models/default/2/model.onnx] [--runs 15] [--cut 1000]

A resumed stream (GenerateRequest.resume_text) reads prime + the text so far in
one prefill and goes on. Against, in the same run on the same server:

- a fresh stream's time to its first character (prime "ROMEO:");
- a fresh stream whose prime is as long as prime + the resumed text (another
  first line, so that the prime cache does not answer it): the same prefill,
  the floor of what a resume can cost.

Each row is the median of ``runs`` streams, one at a time, through gRPC, each
with its own seed (so that the prime cache never answers).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from charrnn.modelfile import MODEL_FILE
from charrnn.service.client import GeneratorClient
from testkit.serve_process import ServeProcess, blocked_env

RESULTS = Path(__file__).resolve().parent / "results"


def first_char_seconds(client: GeneratorClient, prime: str, max_chars: int, seed: int, **fields) -> tuple[float, str]:
    """Seconds from the call to its first text, and the whole text."""
    started = time.perf_counter()
    first = None
    text = ""
    for chunk in client.generate(prime, max_chars, seed=seed, temperature=0.8, timeout=120, **fields):
        if first is None:
            first = time.perf_counter() - started
        text += chunk
    return first, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/default/2/model.onnx")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--cut", type=int, default=1000, help="characters received before the cut")
    p.add_argument("--out", default=str(RESULTS / "resume.md"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp())
    repo = work / "models" / "m" / "1"
    repo.mkdir(parents=True)
    shutil.copy(a.model, repo / MODEL_FILE)
    rows = {"fresh stream (prime 'ROMEO:')": [], f"resumed at {a.cut} characters": [],
            f"fresh stream, prime of {a.cut + 6} characters (the same prefill)": []}
    names = list(rows)
    with ServeProcess(work / "models", env=blocked_env(work)) as server, GeneratorClient(server.target) as client:
        for run in range(a.runs + 1):  # the first is a warm-up, not counted
            seed = 1000 + run
            fresh, text = first_char_seconds(client, "ROMEO:", a.cut + 100, seed)
            resumed, rest = first_char_seconds(client, "ROMEO:", a.cut + 100, seed, resume_text=text[: a.cut])
            assert rest == text[a.cut:], "a resumed stream must go on as the uncut one"
            # another first line: the prime cache holds "ROMEO:" + the text since the resume read it
            long_prime, _ = first_char_seconds(client, "JULIE:" + text[: a.cut], 100, seed + 10**6)
            if run:
                for name, value in zip(names, (fresh, resumed, long_prime)):
                    rows[name].append(value)
    base = statistics.median(rows[names[0]])
    lines = [f"Time to the first new character, median of {a.runs} streams one at a time, `{a.model}`, "
             f"`python -m bench.resume --runs {a.runs} --cut {a.cut}`", "",
             "| stream | time to first character | against a fresh stream |", "| --- | ---: | ---: |"]
    for name, values in rows.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median * 1000:.1f} ms | {median / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    Path(a.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
