"""Serving benchmark: the real charrnn-serve under N concurrent streams, against its baselines.

    python -m bench.serving            # make bench; several minutes on 2 cores
    python -m bench.serving --quick    # a short run: 1, 8, 32 streams, 4 s each
    python -m bench.serving --device cuda   # concurrency 1, 64, 1024, 4096

Starts two real servers on the same model (continuous batching, and the naive
--batching off), drives each with the load generator (bench/loadgen.py, its
own process) at every concurrency, and measures in the same run the raw
onnxruntime step at each batch size (the ceiling), a PyTorch eager sampling
loop, and the roofline (bench/baselines.py). Writes bench/results/serving.md,
serving.json and serving.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import baselines, oldtree
from testkit import probes
from charrnn import modelfile as mf
from charrnn.service.runtime import load_model

RESULTS = Path(__file__).parent / "results"
VOCAB_65 = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase  # tiny-shakespeare's characters


def find_or_make_model(models: Path, work: Path) -> Path:
    """A 2x512 LSTM: the newest one under ``models`` if any, else random weights through the exporter."""
    for path in sorted(models.glob(f"*/*/{mf.MODEL_FILE}"), key=lambda p: (p.parent.parent.name, int(p.parent.name)
                                                                             if p.parent.name.isdigit() else 0)):
        try:
            meta = load_model(path, "probe", 1, "cpu").metadata
        except (mf.ModelFormatError, ValueError):
            continue
        if (meta.cell, meta.layers, meta.hidden) == ("lstm", 2, 512):
            found = path
    if "found" in locals():
        return found
    from charrnn.exporter.export import export_model
    from charrnn.training.model import CharRNN, ModelConfig
    import torch

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=len(VOCAB_65), cell="lstm", layers=2, hidden=512)).eval()
    path = work / "shakespeare" / "1" / mf.MODEL_FILE
    export_model(model, list(VOCAB_65), path, check=False)
    return path


def one_model_repo(work: Path, model: str) -> Path:
    """A repository of one version, shakespeare/1, linking ``model`` (or the 2x512 LSTM found or made)."""
    path = Path(model) if model else find_or_make_model(Path("models"), work / "made")
    version = work / "repo" / "shakespeare" / "1"
    version.mkdir(parents=True)
    (version / path.name).symlink_to(path.resolve())
    return work / "repo"


def write_report(out: Path, stem: str, report: dict, markdown: str) -> None:
    """OUT/STEM.json and OUT/STEM.md, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


class ServerProcess:
    """charrnn-serve in a subprocess; the ports are read from its start-up banner."""

    def __init__(self, models: Path, batching: bool, device: str, max_active: int, threads: int,
                 rev: str = "", name: str = "", extra: tuple[str, ...] = ()):
        """``rev``: serve with that earlier revision's charrnn-serve instead (the baseline of the run);
        ``extra``: more flags (``--http-port 0`` also sets ``http_url``)."""
        env, cwd = None, None
        if rev:
            env, cwd = oldtree.environment(rev)
            cmd = [sys.executable, "-c", "import sys; from charrnn.service.server import main; sys.exit(main())"]
        else:
            exe = Path(sys.executable).parent / "charrnn-serve"
            cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "charrnn.service.server"]
        cmd += ["--models", str(models), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                "--batching", "on" if batching else "off", "--device", device, "--log-level", "warning",
                "--max-active-streams", str(max_active), "--max-queue", str(4 * max_active),
                "--max-chars", "100000", "--drain-grace", "2"]
        if threads:
            cmd += ["--threads", str(threads)]
        cmd += list(extra)
        self.http_url = ""
        self.name = name or ("batching" if batching else "naive")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=cwd)
        self.target = self.metrics_url = ""
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline and not (self.target and self.metrics_url):
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"gRPC\s+\S+:(\d+)", line):
                self.target = f"127.0.0.1:{m.group(1)}"
            if m := re.search(r"HTTP\s+http://\S+:(\d+)/", line):
                self.http_url = f"http://127.0.0.1:{m.group(1)}"
            if m := re.search(r"metrics\s+http://\S+:(\d+)/metrics", line):
                self.metrics_url = f"http://127.0.0.1:{m.group(1)}/metrics"
        if not (self.target and self.metrics_url):
            self.stop()
            raise RuntimeError(f"charrnn-serve ({self.name}) did not start:\n{''.join(lines)}")

    def engine_totals(self) -> dict[str, float]:
        """Sums of the engine histograms so far (step seconds, steps, batch rows)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out = {}
        for key, name in (("step_sum", "charrnn_step_seconds_sum"), ("steps", "charrnn_step_seconds_count"),
                          ("rows", "charrnn_batch_size_sum")):
            out[key] = sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU seconds so far of the server and its processes (engine cores, front-ends; Linux)."""
        total = 0.0
        for pid in [self.proc.pid, *probes.children(self.proc.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        return total if total else math.nan

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def load(server: ServerProcess, concurrency: int, duration: float, warmup: float, max_chars: int, vocab: str,
         controls: dict | None = None, client_processes: int = 0, http: bool = False) -> dict:
    """One load point (bench/loadgen.py); ``controls``: more GenerateRequest fields for every request;
    ``client_processes``: load generator processes (0: 1 below 32 streams, else 2); ``http``: over the
    server's HTTP port (SSE) instead of gRPC."""
    before = server.engine_totals()
    cpu_before = server.cpu_seconds()
    # The client in several processes from 32 streams on, so that it does not measure itself.
    processes = min(client_processes, concurrency) if client_processes else (1 if concurrency < 32 else 2)
    target = server.http_url if http else server.target
    cmd = [sys.executable, "-m", "bench.loadgen", "--target", target, "--concurrency", str(concurrency),
           "--duration", str(duration), "--warmup", str(warmup), "--max-chars", str(max_chars), "--vocab", vocab,
           "--processes", str(processes)] + (["--controls", json.dumps(controls)] if controls else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120,
                          cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    after = server.engine_totals()
    # CPU per character is steadier than wall time on a shared machine: it shows the server's own cost.
    chars_total = result["chars_total"]
    result["server_cpu_us_per_char"] = 1e6 * (server.cpu_seconds() - cpu_before) / chars_total if chars_total else math.nan
    result["client_cpu_us_per_char"] = 1e6 * result["client_cpu_s"] / chars_total if chars_total else math.nan
    steps = after["steps"] - before["steps"]
    result["engine_mean_step_ms"] = 1e3 * (after["step_sum"] - before["step_sum"]) / steps if steps else math.nan
    result["engine_mean_batch"] = (after["rows"] - before["rows"]) / steps if steps else math.nan
    return result


def _ms(seconds: float, digits: int = 1) -> str:
    """Milliseconds for the table; a dash where no request gave a sample in the measured window."""
    return "—" if math.isnan(seconds) else f"{1e3 * seconds:.{digits}f}"


def markdown(report: dict) -> str:
    r = report
    lines = [
        f"# Serving benchmark: {r['model']}",
        "",
        f"`{r['command']}` on {r['machine']}, device {r['device']}, {r['date']}. "
        f"Each load point: {r['duration']:g} s of load, first {r['warmup']:g} s not counted, best of {r['repeat']}; "
        f"requests of {r['max_chars'] // 2}-{r['max_chars']} characters, each with its own prime, temperature and seed.",
        "",
        f"Roofline: {r['matmul_gflops']:.1f} GFLOP/s measured sgemm / {r['flops_per_char'] / 1e6:.2f} MFLOP per "
        f"character = {r['roofline_chars_per_s']:,.0f} chars/s.",
        "",
        "| streams | server chars/s | TTFC p50 / p99 ms | between chars p50 / p99 ms | mean batch | naive server chars/s "
        "| naive TTFC p99 ms | raw ORT step chars/s | server / raw | server / naive | PyTorch eager chars/s "
        "| CPU µs/char: server (client) / raw ORT | before chars/s (TTFC p99 ms) | server / before |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        s, n = row["server"], row["naive"]
        lines.append(
            f"| {row['concurrency']} | {s['chars_per_s']:,.0f} | {_ms(s['ttfc_p50'])} / {_ms(s['ttfc_p99'])} "
            f"| {_ms(s['inter_char_p50'], 2)} / {_ms(s['inter_char_p99'], 2)} | {s['engine_mean_batch']:.1f} "
            f"| {n['chars_per_s']:,.0f} | {_ms(n['ttfc_p99'])} | {row['raw_ort_chars_per_s']:,.0f} "
            f"| {row['server_vs_raw']:.0%} | {row['server_vs_naive']:.1f}x | {row['torch_eager_chars_per_s']:,.0f} "
            f"| {s['server_cpu_us_per_char']:.0f} ({s['client_cpu_us_per_char']:.0f}) / {row['raw_ort_cpu_us_per_char']:.0f} "
            + (f"| {row['before']['chars_per_s']:,.0f} ({_ms(row['before']['ttfc_p99'])}) | {row['server_vs_before']:.2f}x |"
               if "before" in row else "| — | — |")
        )
    lines += ["", "PyTorch eager at 1 stream is the classic one-stream sampling loop; at N it samples a batch of N. "
              "A dash: no request was both sent and answered inside the measured window. "
              "Raw ORT and PyTorch are each the best of two runs (before and after the load), the sgemm rate "
              "the best of one run per point. The server also prefills every "
              "new stream's prime, which the raw step does not. CPU µs per character (server process, load "
              "generator process, raw loop) is steadier than chars/s on a shared machine.",
              "", "Targets:"]
    if r.get("baseline_rev"):
        lines.insert(6, f"Before: charrnn-serve of revision {r['baseline_rev']} (the engine as a thread beside the "
                        "gRPC loop), on the same model in the same run.")
        lines.insert(7, "")
    lines += [f"- {t['what']}: {t['value']} -> {'met' if t['met'] else 'MISSED'}" for t in r["targets"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [row["concurrency"] for row in report["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, key, style in (("charrnn-serve (batching)", lambda r: r["server"]["chars_per_s"], "o-"),
                              ("charrnn-serve --batching off", lambda r: r["naive"]["chars_per_s"], "s-"),
                              ("raw onnxruntime step (no server)", lambda r: r["raw_ort_chars_per_s"], "^--"),
                              ("PyTorch eager loop", lambda r: r["torch_eager_chars_per_s"], "x:")):
        ax.plot(xs, [key(r) for r in report["rows"]], style, label=label)
    ax.axhline(report["roofline_chars_per_s"], color="grey", lw=1, label="roofline (sgemm rate / FLOPs per char)")
    ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="characters / s",
           title=f"{report['model']} on {report['device']}")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def targets(rows: dict[int, dict]) -> list[dict]:
    out = []
    if 128 in rows:
        r = rows[128]
        out += [
            {"what": "128 streams: server >= 80% of the raw ORT step rate at B=128",
             "value": f"{r['server_vs_raw']:.0%}", "met": r["server_vs_raw"] >= 0.8},
            {"what": "128 streams: server >= 3x the naive server", "value": f"{r['server_vs_naive']:.1f}x",
             "met": r["server_vs_naive"] >= 3},
            {"what": "128 streams: p99 time to first char <= 50 ms",
             "value": f"{1e3 * r['server']['ttfc_p99']:.1f} ms", "met": r["server"]["ttfc_p99"] <= 0.05},
        ]
    if 128 in rows and 256 in rows:
        ratio = rows[256]["server"]["chars_per_s"] / rows[128]["server"]["chars_per_s"]
        out.append({"what": "256 streams: server >= 90% of its 128-stream rate", "value": f"{ratio:.0%}",
                    "met": ratio >= 0.9})
    if all("before" in r for r in rows.values()):
        worst = min(rows.values(), key=lambda r: r["server_vs_before"])
        out.append({"what": "no point worse than the engine before", "value":
                    f"worst {worst['server_vs_before']:.2f}x at {worst['concurrency']} streams",
                    "met": worst["server_vs_before"] >= 1.0})
    if 1 in rows:
        out.append({"what": "1 stream: server >= 70% of the raw ORT step rate at B=1",
                    "value": f"{rows[1]['server_vs_raw']:.0%}", "met": rows[1]["server_vs_raw"] >= 0.7})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serving benchmark of charrnn-serve (see bench/serving.py).")
    p.add_argument("--quick", action="store_true", help="a short run: 1, 8, 32 streams, 4 s of load each")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device of the servers and baselines")
    p.add_argument("--concurrency", default="", help="comma-separated stream counts (default by device)")
    p.add_argument("--duration", type=float, default=0, help="seconds of load per point (default 12, quick 4)")
    p.add_argument("--models", default="models", help="where to look for a trained 2x512 LSTM first")
    p.add_argument("--model", default="", help="serve this model file instead (e.g. models/default/2/model.onnx)")
    p.add_argument("--baseline-rev", default="d91a215",
                   help="also serve with this earlier revision (the engine before this one); '' to skip")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = one per core)")
    p.add_argument("--max-chars", type=int, default=400, help="longest request, characters")
    p.add_argument("--client-processes", type=int, default=0,
                   help="load generator processes from 32 streams on (0: 2 on the CPU, 8 with --device cuda)")
    p.add_argument("--no-naive", action="store_true", help="skip the --batching off server")
    p.add_argument("--repeat", type=int, default=1, help="load runs per point and server; the best is kept")
    p.add_argument("--server-args", default="", help="more charrnn-serve flags for the server under test "
                   "(e.g. '--decode-steps 1'), not for the baseline revision")
    p.add_argument("--out", default=str(RESULTS), help="folder for serving.md, serving.json, serving.png")
    a = p.parse_args(argv)
    default = "1,64,1024,4096" if a.device == "cuda" else ("1,8,32" if a.quick else "1,8,32,128,256")
    levels = [int(x) for x in (a.concurrency or default).split(",")]
    duration = a.duration or (4.0 if a.quick else 12.0)
    warmup = min(3.0, duration / 3)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="charrnn-bench-"))
    servers: list[ServerProcess] = []
    try:
        src = Path(a.model) if a.model else find_or_make_model(Path(a.models), work)
        repo = work / "repo"
        (repo / "shakespeare" / "1").mkdir(parents=True)
        shutil.copy(src, repo / "shakespeare" / "1" / mf.MODEL_FILE)
        meta = load_model(src, "bench", 1, "cpu").metadata
        print(f"model {src} ({meta.cell} {meta.layers}x{meta.hidden}, vocab {meta.vocab_size})", flush=True)
        flops = baselines.flops_per_char(meta)
        gemm = baselines.matmul_flops()  # measured again after each point; the best is the roofline
        print(f"sgemm {gemm / 1e9:.1f} GFLOP/s; {flops / 1e6:.2f} MFLOP/char", flush=True)
        base_seconds = 1.0 if a.quick else 2.5
        servers = [ServerProcess(repo, b, a.device, max(levels), a.threads,
                                 extra=tuple(a.server_args.split()) if b else ()) for b in (True, False)
                   if b or not a.no_naive]
        if a.baseline_rev:
            servers.append(ServerProcess(repo, True, a.device, max(levels), a.threads, rev=a.baseline_rev,
                                         name="before"))
        rows = {}
        for c in levels:
            row: dict = {"concurrency": c}
            raw = [baselines.raw_ort_rate(src, c, base_seconds / 2, a.device, a.threads)]
            torch_rates = [baselines.torch_eager_rate(meta, c, base_seconds / 2, a.device)]
            for _ in range(a.repeat):  # the servers take turns; each keeps its best run
                for s in servers:
                    key = {"batching": "server", "naive": "naive", "before": "before"}[s.name]
                    clients = a.client_processes or (8 if a.device == "cuda" else 0)
                    result = load(s, c, duration, warmup, a.max_chars, "".join(meta.vocab),
                                  client_processes=clients if c >= 32 else 1)
                    if key not in row or result["chars_per_s"] > row[key]["chars_per_s"]:
                        row[key] = result
            row.setdefault("naive", {"chars_per_s": math.nan, "ttfc_p99": math.nan})  # --no-naive
            # Measured before and after the load, best of the two: the ceiling should not be a victim of noise.
            raw.append(baselines.raw_ort_rate(src, c, base_seconds / 2, a.device, a.threads))
            torch_rates.append(baselines.torch_eager_rate(meta, c, base_seconds / 2, a.device))
            row["torch_eager_chars_per_s"] = max(torch_rates)
            gemm = max(gemm, baselines.matmul_flops(0.5))  # the machine's best moment is its roofline
            row["raw_ort_chars_per_s"] = max(r for r, _ in raw)
            row["raw_ort_cpu_us_per_char"] = min(u for _, u in raw)
            row["server_vs_raw_cpu"] = row["raw_ort_cpu_us_per_char"] / row["server"]["server_cpu_us_per_char"]
            row["server_vs_raw"] = row["server"]["chars_per_s"] / row["raw_ort_chars_per_s"]
            row["server_vs_naive"] = row["server"]["chars_per_s"] / max(row["naive"]["chars_per_s"], 1e-9)
            if "before" in row:
                row["server_vs_before"] = row["server"]["chars_per_s"] / max(row["before"]["chars_per_s"], 1e-9)
            rows[c] = row
            print(f"{c:5d} streams: server {row['server']['chars_per_s']:9,.0f} chars/s "
                  f"(TTFC p99 {1e3 * row['server']['ttfc_p99']:.1f} ms, batch {row['server']['engine_mean_batch']:.1f})"
                  f" | naive {row['naive']['chars_per_s']:8,.0f} | raw ORT {row['raw_ort_chars_per_s']:9,.0f}"
                  f" | torch {row['torch_eager_chars_per_s']:8,.0f}"
                  + (f" | before {row['before']['chars_per_s']:9,.0f}" if "before" in row else ""), flush=True)
        gemm = max(gemm, baselines.matmul_flops())
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "model": f"LSTM {meta.layers}x{meta.hidden}, vocab {meta.vocab_size}", "device": a.device,
        "command": "python -m bench.serving " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or platform.system()})",
        "date": time.strftime("%Y-%m-%d"), "duration": duration, "warmup": warmup, "max_chars": a.max_chars,
        "repeat": a.repeat,
        "matmul_gflops": gemm / 1e9, "flops_per_char": flops, "roofline_chars_per_s": gemm / flops,
        "rows": list(rows.values()), "targets": targets(rows), "baseline_rev": a.baseline_rev,
    }
    (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serving.md").write_text(markdown(report))
    plot(report, out / "serving.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
