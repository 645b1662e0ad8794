"""How closely Score and Generate's log-probabilities agree with an independent replay of the model file.

    python -m bench.score_agreement                # the bundled model on tiny-shakespeare excerpts
    python -m bench.score_agreement --model path/to/model.onnx --data text.txt

Serves the model with the real charrnn-serve, scores excerpts of the text of
several lengths (with and without a prime, read in several prefill calls when
long), and compares each character's log-probability with testkit/replay.py:
onnxruntime on the model file alone, the whole sequence in one call from a zero
state. Then generates greedy streams with log-probabilities and compares them
the same way. Prints a table; writes bench/results/score_agreement.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from charrnn.service.client import GeneratorClient
from testkit.replay import Replay
from testkit.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Score and logprobs against an independent replay.")
    p.add_argument("--model", default=str(ROOT / "models" / "default" / "2" / "model.onnx"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    model = Path(a.model).resolve()
    corpus = Path(a.data).read_text(encoding="utf-8")
    replay = Replay(model)
    repo = Path(tempfile.mkdtemp(prefix="charrnn-agreement-")) / "m" / "1"
    repo.mkdir(parents=True)
    (repo / "model.onnx").symlink_to(model)
    rows = []
    with ServeProcess(repo.parent.parent, env=dict(os.environ)) as server, GeneratorClient(server.target) as client:
        for length, prime_len in ((10, 0), (100, 0), (100, 20), (1000, 50), (5000, 0), (10000, 100)):
            start = (length * 7919) % (len(corpus) - length - prime_len)
            prime, text = corpus[start:start + prime_len], corpus[start + prime_len:start + prime_len + length]
            reply = client.score(text, prime=prime, model="m", timeout=600)
            got = np.array([e.logprob for e in reply.logprobs], np.float64)
            want = replay.text_logprobs(prime, text)
            rows.append((f"Score, text {length}, prime {prime_len}", len(text), float(np.abs(got - want).max()),
                         abs(reply.total_logprob - want.sum()), reply.bits_per_char))
        for prime in ("ROMEO:", "First Citizen:\n", ""):
            stream = client.generate(prime, 300, model="m", temperature=0, logprobs=5, timeout=120)
            text = stream.text()
            got = np.array([e.logprob for e in stream.logprobs[0]], np.float64)
            lp = replay.logprobs(prime, text)
            want = lp[np.arange(len(text)), [replay.index[c] for c in text]]
            tops = np.array([[t.logprob for t in e.top] for e in stream.logprobs[0]])
            want_tops = -np.sort(-lp, axis=1)[:, :5]
            rows.append((f"Generate logprobs 5, prime {prime!r}", len(text),
                         float(max(np.abs(got - want).max(), np.abs(tops - want_tops).max())),
                         abs(got.sum() - want.sum()), float(-want.mean() / np.log(2))))
    lines = [f"# Score and logprobs against an independent replay: {model.relative_to(ROOT) if model.is_relative_to(ROOT) else model}",
             "", f"`python -m bench.score_agreement` on {time.strftime('%Y-%m-%d')}; the replay is onnxruntime on the "
             "model file alone (testkit/replay.py), the whole sequence in one call.", "",
             "| what | characters | largest \\|Δ logprob\\| | \\|Δ total\\| | bits per char |", "| :--- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {w} | {n} | {d:.2e} | {t:.2e} | {b:.3f} |" for w, n, d, t, b in rows]
    lines += ["", f"Largest per-character difference: {max(r[2] for r in rows):.2e} (the contract: 1e-4)."]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "score_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
