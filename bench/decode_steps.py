"""Many characters per call: charrnn-serve at --decode-steps K against K = 1 and the raw step, in one run.

    python -m bench.decode_steps --model models/default/2/model.onnx --steps 1,8,8:on --concurrency 1,128,256

Each entry of --steps is K, or K:on for K with --overlap on (K alone: the server's default, off).

For each K one real server (gRPC, its engine core process, batching on) on the same model, driven in turn by
the load generator (bench/loadgen.py, processes of its own, its CPU reported apart) at every concurrency; in
the same run the raw onnxruntime step at the same batch (bench/baselines.py, one call per character, no
server), and the engine alone: a core on a thread of this process (cores.ThreadCore) fed by an in-process
consumer that reads ids, no gRPC, no front-end. K = 1 is the baseline row of each table. Writes
bench/results/decode-steps.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import baselines
from bench.serving import ServerProcess, load
from testkit import probes
from charrnn import modelfile as mf

RESULTS = Path(__file__).parent / "results"


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of every thread of ``pids``, keyed "<process>/<thread name>:<tid>" (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        except OSError:
            continue
        proc = "core" if "charrnn.service.corerun" in argv else "server"
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                f = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[f"{proc}/{name}:{tid}"] = (int(f[11]) + int(f[12])) / tick
    return out


def where_cpu_goes(before: dict[str, float], after: dict[str, float], chars: int, top: int = 6) -> list[tuple]:
    """(thread, µs of CPU per character) of the busiest threads over a load point."""
    used = {k: 1e6 * (v - before.get(k, 0.0)) / max(chars, 1) for k, v in after.items()}
    return sorted(((k, v) for k, v in used.items() if v >= 0.05), key=lambda kv: -kv[1])[:top]


def engine_alone(model_path: Path, streams: int, steps: int, seconds: float, max_chars: int,
                 profile: bool = False, overlap: bool = False) -> dict:
    """chars/s of a ThreadCore with ``streams`` concurrent streams (each replaced when it ends), read by an
    in-process consumer: the core and the output processing, without gRPC. ``profile``: also the core
    thread's cProfile, by own time."""
    from charrnn.service.cores import ThreadCore
    from charrnn.service.metrics import Metrics
    from charrnn.service.runtime import load_model
    from testkit.requests import generation_request

    model = load_model(model_path, "bench", 1, "cpu")
    engine = ThreadCore(model, metrics=Metrics(), max_active=streams, max_queue=4 * streams,
                        decode_steps=steps, flush_interval=0.05, overlap=overlap)
    prof = None
    if profile:
        import cProfile

        prof, run = cProfile.Profile(), engine._run  # the core thread's own body, under the profiler
        engine._run = lambda on_failure: prof.runcall(run, on_failure)
    engine.start()
    vocab = "".join(model.metadata.vocab)
    chars = [0]
    stop_at = time.monotonic() + 1.0 + seconds
    counting_from = time.monotonic() + 1.0

    async def worker(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            req = generation_request(model.metadata, vocab[(i + n) % len(vocab)], max_chars // 2 + (i * 7 + n) %
                                     (max_chars // 2), seed=i * 1000 + n, temperature=0.8)
            n += 1
            async for text in engine.submit(req):
                if time.monotonic() >= counting_from:
                    chars[0] += len(text)

    async def main() -> None:
        await asyncio.gather(*(worker(i) for i in range(streams)))

    try:
        t0 = time.monotonic()
        asyncio.run(main())
        elapsed = time.monotonic() - max(t0, counting_from)
    finally:
        engine.stop(5.0)
    out = {"chars_per_s": chars[0] / max(elapsed, 1e-9)}
    if prof is not None:
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(prof, stream=text).strip_dirs().sort_stats("tottime").print_stats(15)
        out["profile"] = text.getvalue()
    return out


def markdown(r: dict) -> str:
    intro = (
        f"`{r['command']}` on {r['machine']}, {r['date']}. Each load point: {r['duration']:g} s of load through "
        f"gRPC (first {r['warmup']:g} s not counted); requests of {r['max_chars'] // 2}-{r['max_chars']} characters, "
        "each with its own prime, temperature and seed" + (f", and {r['controls']}" if r.get("controls") else "")
        + ". Raw step: one onnxruntime call of the model per character "
        "at the same batch, no sampler, no server (the best of before and after the load). Engine alone: the core "
        "on a thread with an in-process consumer, no gRPC. CPU per character: all the server's processes; the "
        "load generator's apart.")
    lines = [
        f"# Characters per call: {r['model']}", "", intro, "",
        "| streams | K | server chars/s | server / raw | server / K=1 | TTFC p50 / p99 ms | server CPU µs/char "
        "(load generator) | raw CPU µs/char | engine alone chars/s | engine / raw | raw step chars/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        base = row["by_k"][str(r["steps"][0])]
        for k in r["steps"]:
            s = row["by_k"][str(k)]
            lines.append(
                f"| {row['concurrency']} | {k} | {s['chars_per_s']:,.0f} | {s['chars_per_s'] / row['raw']:.0%} "
                f"| {s['chars_per_s'] / base['chars_per_s']:.2f}x | {1e3 * s['ttfc_p50']:.1f} / {1e3 * s['ttfc_p99']:.1f} "
                f"| {s['server_cpu_us_per_char']:.1f} ({s['client_cpu_us_per_char']:.1f}) | {row['raw_cpu']:.1f} "
                f"| {s['engine_chars_per_s']:,.0f} | {s['engine_chars_per_s'] / row['raw']:.0%} | {row['raw']:,.0f} |")
    lines += ["", "256 streams against 128, each K: " + ", ".join(
        f"K={k} {v:.0%}" for k, v in r.get("ratio_256_128", {}).items())]
    lines += ["", "## Where the server's CPU goes", "", "µs of CPU per character of the busiest threads over each "
              "load point (`core/python3` is the core thread, which also runs one of onnxruntime's intra-op "
              "threads; `server/charrnn-serve` the front-end's asyncio loop; `engine-*` a front-end's core client).",
              "", "| streams | K | threads |", "| ---: | ---: | --- |"]
    for row in r["rows"]:
        for k in r["steps"]:
            threads = row["by_k"][str(k)].get("threads", [])
            lines.append(f"| {row['concurrency']} | {k} | " + ", ".join(f"{t} {v:.1f}" for t, v in threads) + " |")
    for row in r["rows"]:
        if "profile" in row:
            lines += ["", f"## The core thread at {row['concurrency']} streams, K = {row['profile']['steps']} "
                      "(engine alone, cProfile, by own time)", "", "```", row["profile"]["text"].strip(), "```"]
    return "\n".join(lines) + "\n"


def variant(entry: str) -> tuple[int, bool]:
    """"8" -> (8, overlap off), "8:on" -> (8, on)."""
    k, _, overlap = entry.partition(":")
    if overlap not in ("", "on", "off"):
        raise SystemExit(f"--steps: {entry!r} is not K or K:on or K:off")
    return int(k), overlap == "on"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/default/2/model.onnx")
    p.add_argument("--steps", default="1,4,8,8:on,16", help="comma-separated K values, K:on for --overlap on; "
                   "the first is the baseline")
    p.add_argument("--concurrency", default="1,128,256")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-chars", type=int, default=400)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-engine", action="store_true", help="skip the engine-alone runs")
    p.add_argument("--profile", default="", help="STREAMS,K: also profile the core thread there (engine alone)")
    p.add_argument("--controls", default="", help="JSON of more GenerateRequest fields for every request, e.g. "
                   "'{\"regex\": \"[a-z ]{150,300}\\\\.\"}'")
    p.add_argument("--name", default="decode-steps", help="stem of the result files")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    steps = a.steps.split(",")
    variants = {k: variant(k) for k in steps}
    levels = [int(x) for x in a.concurrency.split(",")]
    warmup = min(3.0, a.duration / 3)
    src = Path(a.model)
    work = Path(tempfile.mkdtemp(prefix="charrnn-ksteps-"))
    repo = work / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    shutil.copy(src, repo / "m" / "1" / mf.MODEL_FILE)
    from charrnn.service.runtime import load_model

    meta = load_model(src, "bench", 1, "cpu").metadata
    vocab = "".join(meta.vocab)
    servers = {}
    rows = []
    try:
        for k in steps:
            n, overlap = variants[k]
            servers[k] = ServerProcess(repo, True, "cpu", max(levels), a.threads, name="batching",
                                       extra=("--decode-steps", str(n), "--overlap", "on" if overlap else "off"))
        for c in levels:
            raw = [baselines.raw_ort_rate(src, c, 1.5, "cpu", a.threads)]
            row = {"concurrency": c, "by_k": {}}
            for k in steps:
                pids = [servers[k].proc.pid, *probes.children(servers[k].proc.pid)]
                cpu0 = thread_cpu(pids)
                result = load(servers[k], c, a.duration, warmup, a.max_chars, vocab,
                              controls=json.loads(a.controls) if a.controls else None)
                result["threads"] = where_cpu_goes(cpu0, thread_cpu(pids), result["chars_total"])
                result["engine_chars_per_s"] = (float("nan") if a.no_engine else
                                                engine_alone(src, c, *variants[k][:1], a.duration / 2, a.max_chars,
                                                             overlap=variants[k][1])["chars_per_s"])
                row["by_k"][str(k)] = result
                print(f"{c:4d} streams K={k:>5}: server {result['chars_per_s']:9,.0f} chars/s, TTFC p99 "
                      f"{1e3 * result['ttfc_p99']:.1f} ms, {result['server_cpu_us_per_char']:.1f} us/char; engine "
                      f"alone {result['engine_chars_per_s']:9,.0f}", flush=True)
            raw.append(baselines.raw_ort_rate(src, c, 1.5, "cpu", a.threads))
            if a.profile and int(a.profile.split(",")[0]) == c:
                pk = a.profile.split(",")[1]
                n, overlap = variant(pk)
                row["profile"] = {"steps": pk, "text": engine_alone(src, c, n, a.duration / 2, a.max_chars,
                                                                     profile=True, overlap=overlap)["profile"]}
            row["raw"] = max(r for r, _ in raw)
            row["raw_cpu"] = min(u for _, u in raw)
            print(f"{c:4d} streams: raw step {row['raw']:9,.0f} chars/s, {row['raw_cpu']:.1f} us/char", flush=True)
            rows.append(row)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    by_c = {row["concurrency"]: row for row in rows}
    report = {
        "model": f"{meta.cell.upper()} {meta.layers}x{meta.hidden}, vocab {meta.vocab_size} ({src})",
        "command": "python -m bench.decode_steps " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "date": time.strftime("%Y-%m-%d"), "controls": a.controls, "duration": a.duration, "warmup": warmup, "max_chars": a.max_chars,
        "steps": steps, "rows": rows,
    }
    if 128 in by_c and 256 in by_c:
        report["ratio_256_128"] = {str(k): by_c[256]["by_k"][str(k)]["chars_per_s"]
                                   / by_c[128]["by_k"][str(k)]["chars_per_s"] for k in steps}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / f"{a.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
