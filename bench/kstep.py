"""K characters per onnxruntime call: the fused K-step decode graph against K single steps, in chars/s.

    python -m bench.kstep [--model models/default/2/model.onnx] [--batch 1,128,256] [--steps 1,2,4,8,16]
                          [--seconds 0.5] [--threads 1] [--filtered] [--no-loop] [--out PATH]

For each batch B and each K, in one process, round after round so that load
from other work slows them alike:

- single steps (today): K times ``LoadedModel.decode`` (``model.run`` on
  tokens [B, 1], then the sampler graph on the logits with that step's
  uniforms);
- the K-step graph (service/decode_graph.py), K copies of the step unrolled:
  one call;
- the same as an ONNX Loop over one step (``--no-loop`` leaves it out);
- the unrolled graph with I/O binding (decode_graph.BoundDecode: every buffer made once, the state kept on
  the device between calls, only the ids copied back), and on ``--device cuda`` the same with CUDA graphs
  (``enable_cuda_graph``, one captured graph per state layout). A variant that fails (a CUDA graph that does
  not capture) is reported as such, with onnxruntime's reason, and the others go on;
- ``--lowered``: the unrolled graph with the model's LSTM / GRU / RNN operators lowered to MatMul and
  element-wise nodes (service/cells.py), called plainly and (on ``--device cuda``) under CUDA graphs: the
  fallback if the operator's cuDNN path does not capture. Its ids agree with the operator's to float32
  rounding, so they are compared, not asserted: the share that differs is printed.

Every row samples at temperature 0.8 with its own seed (the sampler's plain
path; ``--filtered`` adds top-p 0.9, its sorted path). The first round checks
that both give the same ids. Each figure is B * K over the median time of a
round. Prints a markdown table and writes it to ``--out`` (default
bench/results/kstep-<layers>x<hidden>.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from charrnn.service.decode_graph import BoundDecode, DecodeGraph
from charrnn.service.runtime import load_model
from charrnn.service.sampling import uniforms

RESULTS = Path(__file__).resolve().parent / "results"


def inputs(batch: int, steps: int, vocab: int, filtered: bool) -> dict:
    rng = np.random.default_rng(batch * 100 + steps)
    seeds = rng.integers(0, 2**63, batch).astype(np.uint64)
    return {
        "ids": rng.integers(0, vocab, batch).astype(np.int64),
        "temperature": np.full(batch, 0.8, np.float32),
        "top_k": np.zeros(batch, np.int64),
        "top_p": np.full(batch, 0.9 if filtered else 1.0, np.float32),
        "u": np.stack([uniforms(seeds, np.full(batch, k)) for k in range(steps)], axis=1).astype(np.float32),
    }


def single_steps(model, x: dict, state) -> np.ndarray:
    tokens, out = x["ids"][:, None], []
    for k in range(x["u"].shape[1]):
        picked, state = model.decode(tokens, state, x["temperature"], x["top_k"], x["top_p"], x["u"][:, k])
        tokens = picked.ids
        out.append(tokens)
    return np.concatenate(out, axis=1)


def fused(graph: DecodeGraph, x: dict, state) -> np.ndarray:
    return graph.run(x["ids"], state, x["temperature"], x["top_k"], x["top_p"], x["u"])[0]


def bound_variants(graphs: dict, batch: int, device: str) -> tuple[dict, dict]:
    """{name: BoundDecode} of the I/O-bound variants that could be made here, and {name: why not} of the rest."""
    made, failed = {}, {}
    wanted = [("bound", graphs["unrolled"], False), ("cuda graph", graphs["unrolled"], True)]
    if "lowered" in graphs:
        wanted.append(("lowered cuda graph", graphs["lowered"], True))
    for name, graph, cuda_graph in wanted:
        if cuda_graph and device != "cuda":
            continue
        try:
            made[name] = BoundDecode(graph, batch, device=device, cuda_graph=cuda_graph)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: reported, not fatal
            failed[name] = f"{type(e).__name__}: {e}"
    return made, failed


def bound_run(bound: BoundDecode, x: dict) -> np.ndarray:
    return bound.run(x["ids"], x["temperature"], x["top_k"], x["top_p"], x["u"])


def measure(calls: dict, seconds: float) -> dict:
    """Median seconds of a round of each callable, rounds interleaved until each has run ``seconds``."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    while min(sum(t) for t in times.values()) < seconds or min(len(t) for t in times.values()) < 3:
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kstep", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/default/2/model.onnx")
    p.add_argument("--batch", default="1,128,256", help="comma-separated batch sizes")
    p.add_argument("--steps", default="1,2,4,8,16", help="comma-separated K")
    p.add_argument("--seconds", type=float, default=0.5, help="time of each method at each point")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the model sessions")
    p.add_argument("--filtered", action="store_true", help="rows sample with top-p 0.9 (the sorted path)")
    p.add_argument("--no-loop", action="store_true", help="leave out the ONNX Loop graph")
    p.add_argument("--lowered", action="store_true", help="add the graph with the recurrent operators lowered to "
                   "MatMul and element-wise nodes (service/cells.py)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: single steps on the engine's device path (state on the GPU, the device sampler), "
                        "the K-step graph on the CUDA provider with host inputs and outputs")
    p.add_argument("--out", help="markdown file (default bench/results/kstep-<layers>x<hidden>.md)")
    a = p.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    steps = [int(k) for k in a.steps.split(",")]
    load0 = os.getloadavg()[0]

    model = load_model(a.model, "bench", 1, a.device, threads=a.threads)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if a.device == "cuda" else None
    m = model.metadata
    rows = []
    for k in steps:
        graphs = {"unrolled": DecodeGraph(a.model, k, threads=a.threads, providers=providers)}
        if not a.no_loop:
            graphs["loop"] = DecodeGraph(a.model, k, loop=True, threads=a.threads, providers=providers)
        if a.lowered:
            graphs["lowered"] = DecodeGraph(a.model, k, lowered=True, threads=a.threads, providers=providers)
        for b in batches:
            x = inputs(b, k, m.vocab_size, a.filtered)
            state = model.zero_state(b)
            host = model.state_numpy(state)  # the graph's inputs: on the host (the same arrays on the CPU)
            want = single_steps(model, x, state)
            for name, graph in graphs.items():
                got = fused(graph, x, host)
                if name == "lowered":  # float32 rounding apart from the operator: compared, not asserted
                    print(f"# lowered graph, batch {b}, K {k}: {np.mean(got != want):.2%} of ids differ",
                          file=sys.stderr, flush=True)
                elif a.device == "cpu":
                    assert np.array_equal(got, want), f"{name} graph, batch {b}, K {k}: ids differ from single steps"
                elif not np.array_equal(got, want):  # kernels may differ on a GPU: said, not fatal
                    print(f"# {name} graph, batch {b}, K {k}: {np.mean(got != want):.2%} of ids differ",
                          file=sys.stderr, flush=True)
            calls = {"single": lambda x=x, s=state: single_steps(model, x, s)}
            calls.update({name: (lambda g=g, x=x, s=host: fused(g, x, s)) for name, g in graphs.items()})
            bound, failed = bound_variants(graphs, b, a.device)
            for name, bd in list(bound.items()):
                try:
                    bd.set_state(host)
                    got = bound_run(bd, x)  # the first call of a CUDA graph variant captures it
                    if name == "bound" and a.device == "cpu" and not np.array_equal(got, want):
                        raise AssertionError(f"{name}, batch {b}, K {k}: ids differ from single steps")
                    bound_run(bd, x)
                except AssertionError:
                    raise
                except Exception as e:  # noqa: BLE001 - e.g. a capture onnxruntime refuses
                    failed[name] = f"{type(e).__name__}: {e}"
                    del bound[name]
            calls.update({name: (lambda bd=bd, x=x: bound_run(bd, x)) for name, bd in bound.items()})
            t = measure(calls, a.seconds)
            rows.append((b, k, {name: b * k / sec for name, sec in t.items()}, failed))
            for name, why in failed.items():
                print(f"# {name}, batch {b}, K {k}: {why}", file=sys.stderr, flush=True)
            print(f"# batch {b}, K {k}: " + ", ".join(f"{n} {b * k / s:,.0f}" for n, s in t.items()) + " chars/s",
                  file=sys.stderr, flush=True)
    load1 = os.getloadavg()[0]

    command = "python -m bench.kstep " + " ".join(sys.argv[1:])
    lines = [
        (f"`{command}` on the {os.cpu_count()}-core {platform.machine()} development machine (shared; load average "
         f"{load0:.1f} at the start, {load1:.1f} at the end), onnxruntime {ort.__version__}, {a.device}, "
         f"{a.threads} intra-op thread(s)."),
        "",
        (f"{m.layers}x{m.hidden} {m.cell.upper()}, {m.vocab_size} characters, temperature 0.8"
         f"{', top-p 0.9' if a.filtered else ''}; characters per second (B x K over the median time of one "
         f"round); single steps = K x (model.run + sampler), as the engine decodes today."),
        "",
    ]
    head = "| batch | K | single steps chars/s | K-step graph chars/s | K-step / single |"
    rule = "| ---: | ---: | ---: | ---: | ---: |"
    if not a.no_loop:
        head += " Loop graph chars/s | Loop / single |"
        rule += " ---: | ---: |"
    variants = (["lowered"] if a.lowered else []) + ["bound"] + (["cuda graph"] if a.device == "cuda" else [])
    variants += ["lowered cuda graph"] if a.lowered and a.device == "cuda" else []
    for name in variants:
        head += f" {name} chars/s | {name} / single |"
        rule += " ---: | ---: |"
    lines += [head, rule]
    failures = []
    for b, k, r, failed in rows:
        line = f"| {b} | {k} | {r['single']:,.0f} | {r['unrolled']:,.0f} | {r['unrolled'] / r['single']:.2f}x |"
        if not a.no_loop:
            line += f" {r['loop']:,.0f} | {r['loop'] / r['single']:.2f}x |"
        for name in variants:
            line += f" {r[name]:,.0f} | {r[name] / r['single']:.2f}x |" if name in r else " failed | |"
        lines.append(line)
        failures += [f"- {name}, batch {b}, K {k}: {why}" for name, why in failed.items()]
    if failures:
        lines += ["", "Variants that failed:", ""] + failures
    table = "\n".join(lines)
    print(table)
    out = Path(a.out) if a.out else RESULTS / f"kstep-{m.layers}x{m.hidden}.md"
    out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
