"""A stand-in for the GPU on the CPU: the engine core against a step that costs what the H200's did.

    python -m bench.standin                      # calibration, then the core at 1024 and 4096 streams
    python -m bench.standin --streams 4096 --seconds 20

The stand-in model's step is a busy wait with the GIL released (a C loop on
clock_gettime, called through ctypes), as long as the H200's measured raw
onnxruntime CUDA step at that batch (bench/results/gpu/, interpolated): busy,
not asleep, because onnxruntime's synchronous CUDA copy spins a host core too.

- **Host path** (the old engine, which samples on the host): the step returns
  fixed logits [B, T, V]. Mode ``calibrate`` (and ``all``) runs the engine of commit ``--rev``
  (default f486fcc, the engine the H200 figures were measured with) on it, in
  its own process, with asyncio readers and no gRPC, the way the H200 run did:
  it must reproduce 390k / 311k characters per second at 1024 / 4096 streams
  within 30% before the stand-in is trusted.
- **Device path** (this engine: sampling on the device): the step returns ids.
  The core runs in a process of its own (as in the server), and this process is
  its front-end: an ``CoreClient`` with one asyncio reader per stream. The
  core reports, twice a second, its CPU time, the time it spent in the stand-in
  step and its steps; from them: time per step against the raw step, core CPU
  per step outside the step, and the virtual rate (batch x steps per second).
  ``--laggard`` adds a second front-end that submits streams and never reads.

Workload: requests of 200 to 400 characters back to back; 1 in 8 with top-p,
1 in 8 with top-k, 1 in 16 with stop sequences, some greedy.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from testkit.stubmodel import NumpyState

# The H200's raw onnxruntime CUDA step (I/O binding), ms, at these batches (bench/results/gpu/serving_gpu.json).
H200_STEP_MS = {1: 0.378, 64: 0.392, 1024: 0.399, 4096: 0.643}
H200_ENGINE = {1024: 390_000, 4096: 311_000}  # the engine at f486fcc on that card, characters per second
VOCAB = "\n !$&',-.3:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"
SPIN_C = """
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
double spin(double seconds) { double end = now() + seconds; double x = 0; while (now() < end) x += 1; return x; }
"""


# Time dilation: this host does the engine's host work about 6 times slower than the H200 machine did
# (2 shared cores against 16 fast ones), so the stand-in's step is 6 times the H200's and every rate is
# reported times 6. The calibration checks the factor: with it, the engine of f486fcc gives 321k and
# 277k characters per second at 1024 and 4096 streams against the H200's 390k and 311k (ratio 1 would
# give 91k and 46k). Set by --scale (the environment carries it into the core's process).
SCALE = float(os.environ.get("CHARRNN_STANDIN_SCALE", "6"))


def step_seconds(batch: int) -> float:
    """The H200 step at ``batch``, linear between the measured batches, times the dilation."""
    xs = sorted(H200_STEP_MS)
    return SCALE * float(np.interp(batch, xs, [H200_STEP_MS[x] for x in xs])) / 1e3


# A call of K steps (--decode-steps) costs a fixed part once and the device's compute K times:
#   call(B, K) = CALL_FIXED + K * (step(B) - CALL_FIXED).
# The split: the H200's step is nearly flat from B = 1 to 1024 (0.378 to 0.399 ms), so most of it does not
# depend on the work: the launch of the graph's kernels, onnxruntime's run and the synchronous copy of the
# ids back. The device compute of one step at B = 1 is taken as 0.028 ms (a 2-layer LSTM step and the
# sampler are about 14 kernels of about 2 us each), which leaves 0.35 ms fixed per call; the compute then
# grows with the batch as the measured step does (0.049 ms at 1024, 0.293 ms at 4096).
CALL_FIXED_MS = 0.35


def call_seconds(batch: int, steps: int) -> float:
    """A K-step call at ``batch`` (see CALL_FIXED_MS), times the dilation."""
    fixed = SCALE * CALL_FIXED_MS / 1e3
    return fixed + steps * (step_seconds(batch) - fixed)


def load_spin():
    """``spin(seconds)``: a busy wait in C; ctypes releases the GIL for the call."""
    build = Path(tempfile.gettempdir()) / f"charrnn-spin-{os.getuid()}"
    build.mkdir(exist_ok=True)
    lib = build / "spin.so"
    if not lib.exists():
        (build / "spin.c").write_text(SPIN_C)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(build / "spin.c")], check=True)
    spin = ctypes.CDLL(str(lib)).spin
    spin.argtypes, spin.restype = [ctypes.c_double], ctypes.c_double
    return spin


class StandIn(NumpyState):
    """What an engine sees of a model, with the H200's step time: state [1, B, 1] (on the 'device')."""

    def __init__(self, metadata, device_path: bool):
        self.metadata = metadata
        self.name, self.version, self.label, self.path = "standin", 1, "standin@1", Path("standin")
        self.device = "cuda" if device_path else "cpu"
        self.device_path = device_path  # the core's CUDA slot policy
        self.spin = load_spin()
        self.spun = 0.0  # seconds spent in the step
        self.steps = 0
        self._logits = np.random.default_rng(0).normal(size=(4096, 1, len(metadata.vocab))).astype(np.float32)
        self._sampler = None

    def _busy(self, seconds: float) -> None:
        self.spin(seconds)
        self.spun += seconds

    def run(self, tokens: np.ndarray, state):
        """A prefill (or, host path, a step): the step's cost plus 10 us per extra character; fixed logits."""
        b, t = tokens.shape
        self._busy(step_seconds(b) + 1e-5 * (t - 1))
        logits = np.broadcast_to(self._logits[:1], (b, t, self._logits.shape[2])) if b > 4096 else \
            np.repeat(self._logits[:b], t, axis=1) if t > 1 else self._logits[:b]
        return logits, state

    def decode(self, tokens, state, temperature, top_k, top_p, u, controls=None):
        """Device path: model and sampler on the 'GPU' in one step; only ids come back."""
        from charrnn.service.sampler import Picked

        self._busy(step_seconds(len(tokens)))
        self.steps += 1
        ids = (tokens * 7 + 3) % len(self.metadata.vocab)  # some ids; the stand-in has no distribution
        return Picked(ids.astype(np.int64)), state

    def k_step_decoder(self, steps: int, prebuilt=None):
        """The stand-in of the fused K-step call (service/decode_graph.py): one call_seconds(B, K)."""
        return StandInDecoder(self, steps)

    def sample(self, logits, temperature, top_k, top_p, u, controls=None):
        from charrnn.service.sampler import Sampler

        self._sampler = self._sampler or Sampler()
        return self._sampler.sample(logits, temperature, top_k, top_p, u, controls)

    take = NumpyState.gather  # what an old tree's engine calls it (legacy_run)


class StandInDecoder:
    """K steps of the stand-in in one call, as Batch._decode uses decode_graph.Decoder."""

    def __init__(self, model: StandIn, steps: int):
        self.model, self.steps = model, steps

    def decode(self, tokens, state, temperature, top_k, top_p, u, controls=None, automaton=None):
        from charrnn.service.decode_graph import Decoded

        m = self.model
        k = u.shape[1]
        m._busy(call_seconds(len(tokens), k))
        m.steps += k
        ids = np.empty((len(tokens), k), np.int64)
        last = tokens[:, 0]
        for i in range(k):  # the single step's ids, chained
            last = (last * 7 + 3) % len(m.metadata.vocab)
            ids[:, i] = last
        return Decoded(ids=ids), state


def metadata():
    from charrnn.modelfile import ModelMetadata

    return ModelMetadata(vocab=tuple(VOCAB), cell="lstm", layers=1, hidden=1, val_loss=float("nan"), train_steps=0,
                         corpus_sha256="")


def workload(i: int, n: int) -> dict:
    """Request ``n`` of stream ``i``: its length and controls (the mix of the module docstring)."""
    rng = random.Random(i * 1_000_003 + n)
    kind = rng.randrange(16)
    return {"prime": ("ROMEO:", "JULIET:\n", "First Citizen:", "\n")[i % 4], "max_chars": rng.randint(200, 400),
            "temperature": 0.0 if kind == 15 else rng.choice((0.7, 0.8, 1.0)),
            "top_k": 40 if kind in (0, 1) else 0, "top_p": 0.9 if kind in (2, 3) else 0.0,
            "stop": ["\n\n"] if kind == 4 else [], "seed": i * 7919 + n}


# ---- the core, in a process of its own ----

def serve_core(address: str, max_active: int, report: str, decode_steps: int = 1, overlap: bool = False) -> int:
    """The stand-in's engine core behind a ROUTER socket, as corerun.main runs a real one."""
    import threading

    import zmq

    from charrnn.service import protocol
    from charrnn.service.core import Core
    from charrnn.service.corerun import CoreLoop, _await_primary

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 1000)  # a front-end that never reads does not hold the exit
    sock.bind(address)
    primary = _await_primary(sock)
    model = StandIn(metadata(), device_path=True)
    core = Core(model, max_active=max_active, max_queue=max_active, prime_cache=1024, decode_steps=decode_steps,
                overlap=overlap)
    loop = CoreLoop(core, sock)
    loop.message_seconds *= SCALE  # every time of the core runs dilated
    loop.frontends[primary], loop.primary = 0, primary
    sock.send_multipart([primary, protocol.encode(protocol.Up(props=model.metadata.to_props()))])

    def write() -> None:
        with open(report, "a") as f:
            while True:
                f.write(json.dumps({"t": time.monotonic(), "cpu": time.process_time(), "spun": model.spun,
                                    "steps": model.steps}) + "\n")
                f.flush()
                time.sleep(0.5)

    threading.Thread(target=write, daemon=True).start()
    if os.environ.get("CHARRNN_STANDIN_PROFILE"):  # where the core's own time goes
        import cProfile
        import pstats

        profile = cProfile.Profile()
        status = profile.runcall(loop.run)
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        return status
    return loop.run()


# ---- this process: the front-end ----

async def drive(client, meta, streams: int, seconds: float) -> dict:
    import asyncio

    from testkit.requests import generation_request

    stop_at = time.monotonic() + seconds
    chars = [0]

    async def worker(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            w = workload(i, n)
            n += 1
            req = generation_request(meta, w["prime"], w["max_chars"], temperature=w["temperature"],
                                     top_k=w["top_k"], top_p=w["top_p"], stop=w["stop"], seed=w["seed"])
            try:
                async for chunk in client.submit(req):
                    chars[0] += len(chunk)
            except Exception:  # noqa: BLE001 - the queue is full for a moment: try again
                await asyncio.sleep(0.01)

    await asyncio.gather(*(worker(i) for i in range(streams)))
    return {"chars": chars[0]}


def core_run(streams: int, seconds: float, warmup: float, laggard: bool, decode_steps: str = "1") -> dict:
    import asyncio

    import zmq

    from charrnn.service.coreclient import CoreClient
    from charrnn.service.metrics import Metrics

    work = Path(tempfile.mkdtemp(prefix="standin-"))
    address, report = f"ipc://{work}/core.sock", str(work / "report.jsonl")
    core = subprocess.Popen([sys.executable, "-m", "bench.standin", "serve-core", "--address", address,
                             "--max-active", str(streams + 64), "--report", report, "--decode-steps", decode_steps],
                            cwd=Path(__file__).parent.parent)
    ctx = zmq.Context.instance()
    meta = metadata()
    metrics = Metrics()
    client = CoreClient("standin@1", "standin", meta, ctx=ctx, address=address, metrics=metrics,
                          max_active=streams + 64, max_queue=streams + 64,
                          flush_interval=0.05 * SCALE)  # the server's default flush interval, dilated
    first = None
    while first is None:
        first = client.receive_first(1.0)
    client.start()
    lag = None
    if laggard:
        lag = ctx.socket(zmq.DEALER)
        lag.setsockopt(zmq.RCVHWM, 1)
        lag.connect(address)
        from charrnn.service import protocol

        lag.send(protocol.encode(protocol.Hello(fe=9)))
        lag.send(protocol.encode(protocol.Work(add=[
            protocol.Admit(kind="generate", row=i, prime=np.array([1], np.int64), max_chars=10**9, seed=i,
                           arrived=time.monotonic()) for i in range(64)])))

    def reading() -> dict:
        line = Path(report).read_text().strip().splitlines()[-1]
        return json.loads(line)

    def sums():
        get = metrics.registry.get_sample_value
        return (get("charrnn_step_seconds_sum", {"model": "standin"}) or 0.0,
                get("charrnn_step_seconds_count", {"model": "standin"}) or 0.0,
                get("charrnn_batch_size_sum", {"model": "standin"}) or 0.0)

    async def main():
        task = asyncio.ensure_future(drive(client, meta, streams, warmup + seconds))
        await asyncio.sleep(warmup)
        a, s0, t0 = reading(), sums(), time.monotonic()
        await asyncio.sleep(seconds)
        b, s1, t1 = reading(), sums(), time.monotonic()
        await task
        return a, b, s0, s1, t1 - t0

    a, b, s0, s1, wall = asyncio.run(main())
    client.control("stop")
    core.wait(30)
    if lag is not None:
        lag.close()
    client.close()
    steps = b["steps"] - a["steps"]
    batch = (s1[2] - s0[2]) / max(1.0, s1[1] - s0[1])
    per_step = (b["t"] - a["t"]) / max(1, steps)
    raw = step_seconds(int(round(batch)))
    return {
        "streams": streams, "laggard": laggard, "decode_steps": decode_steps, "steps": steps, "mean_batch": batch,
        # Reported on the H200's time scale: this host's seconds divided by the dilation.
        "time_per_step_ms": 1e3 * per_step / SCALE, "raw_step_ms": 1e3 * raw / SCALE, "step_over_raw": per_step / raw,
        "core_cpu_outside_step_ms": 1e3 * ((b["cpu"] - a["cpu"]) - (b["spun"] - a["spun"])) / max(1, steps) / SCALE,
        "virtual_chars_per_s": SCALE * batch / per_step,
        "target_chars_per_s": SCALE * streams / (1.25 * step_seconds(streams)), "scale": SCALE,
    }


# ---- the old engine, on the host path ----

def legacy_run(streams: int, seconds: float, warmup: float) -> dict:
    """Runs under an old tree's `charrnn` (see calibrate): its Engine, in-process, asyncio readers."""
    import asyncio

    from charrnn.service.engine import Engine
    from charrnn.service.metrics import Metrics
    from charrnn.service.requests import GenerationRequest, SamplingParams

    import charrnn.service.engine as engine_module

    meta = metadata()
    model = StandIn(meta, device_path=False)
    engine = Engine(model, metrics=Metrics(), max_active=streams, max_queue=streams)
    engine.start()
    index = {c: k for k, c in enumerate(VOCAB)}
    stop_at = time.monotonic() + warmup + seconds
    chars = [0, 0]  # all, in the window

    async def worker(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            w = workload(i, n)
            n += 1
            req = GenerationRequest(
                request_id=f"s{i}", prime=w["prime"], prime_ids=np.array([index[c] for c in w["prime"]], np.int64),
                max_chars=w["max_chars"], stop=tuple(w["stop"]), arrived=time.monotonic(),
                sampling=SamplingParams(temperature=w["temperature"], top_k=w["top_k"], top_p=w["top_p"] or 1.0,
                                        seed=w["seed"]))
            async for chunk in engine.submit(req):
                chars[0] += len(chunk)

    async def main():
        task = asyncio.ensure_future(asyncio.gather(*(worker(i) for i in range(streams))))
        await asyncio.sleep(warmup)
        c0, t0 = chars[0], time.monotonic()
        await asyncio.sleep(seconds)
        c1, t1 = chars[0], time.monotonic()
        await task
        return (c1 - c0) / (t1 - t0)

    rate = asyncio.run(main())
    engine.stop(5.0)
    return {"streams": streams, "chars_per_s": SCALE * rate, "host_chars_per_s": rate, "scale": SCALE,
            "engine": str(Path(engine_module.__file__).parent.parent)}


def calibrate(rev: str, streams: int, seconds: float, warmup: float) -> dict:
    """The engine of ``rev`` on the stand-in's host path, in a process that imports that tree as charrnn."""
    from bench import oldtree

    env, cwd = oldtree.environment(rev, str(Path(__file__).parent))
    code = (f"import json, standin; print(json.dumps(standin.legacy_run({streams}, {seconds}, {warmup})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["rev"], result["h200"] = rev, H200_ENGINE.get(streams)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="all", choices=("all", "calibrate", "core", "serve-core"))
    p.add_argument("--streams", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--rev", default="f486fcc", help="the engine the calibration runs (the H200 figures' engine)")
    p.add_argument("--laggard", action="store_true", help="also run each point with a front-end that never reads")
    p.add_argument("--scale", type=float, default=None, help="time dilation of the stand-in step (default 6)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "standin.json"))
    p.add_argument("--decode-steps", nargs="*", default=["1", "8"],
                   help="K values of the core's runs, K:on for K with --overlap on (the first is the baseline row)")
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--max-active", type=int, help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global SCALE
    SCALE = a.scale or SCALE
    os.environ["CHARRNN_STANDIN_SCALE"] = str(SCALE)  # the core's and the calibration's processes
    if a.mode == "serve-core":
        from bench.decode_steps import variant

        return serve_core(a.address, a.max_active, a.report, *variant(a.decode_steps[0]))
    results = {"calibration": [], "core": []}
    for n in a.streams:
        if a.mode in ("all", "calibrate"):
            r = calibrate(a.rev, n, a.seconds, a.warmup)
            results["calibration"].append(r)
            print(f"calibration {a.rev} at {n}: {r['chars_per_s']:,.0f} chars/s at scale {SCALE:g} "
                  f"(H200: {r['h200'] or 0:,}), ratio {r['chars_per_s'] / r['h200']:.2f}" if r["h200"] else "",
                  flush=True)
        if a.mode in ("all", "core"):
            for k in a.decode_steps:
                for laggard in ((False, True) if a.laggard else (False,)):
                    r = core_run(n, a.seconds, a.warmup, laggard, k)
                    results["core"].append(r)
                    print(json.dumps(r), flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    command = "python -m bench.standin " + " ".join(argv if argv is not None else sys.argv[1:])
    report = (f"# The engine core on the GPU stand-in\n\n`{command}` on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; stand-in step scale {SCALE:g} (bench/standin.py): "
              f"{a.seconds:g} s per point, first {a.warmup:g} s not counted. Figures are H200-equivalent (divided by "
              f"the scale).\n\n{table(results)}\n")
    Path(a.out).with_suffix(".md").write_text(report)
    print(report)
    return 0


def table(results: dict) -> str:
    lines = ["| streams | what | characters per second | time per step / raw step | core CPU per step outside it |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for r in results["calibration"]:
        within = abs(r["chars_per_s"] / r["h200"] - 1) <= 0.30 if r["h200"] else False
        lines.append(f"| {r['streams']} | calibration: engine at {r['rev']}, host path (H200 measured "
                     f"{r['h200'] or 0:,}; {'within' if within else 'NOT within'} 30%) | {r['chars_per_s']:,.0f} | | |")
    for r in results["core"]:
        from bench.decode_steps import variant

        k, overlap = variant(str(r.get("decode_steps", 1)))
        what = (f"engine core, device path, --decode-steps {k}" + (" --overlap on" if overlap else "")
                + (", with a front-end that never reads" if r["laggard"] else ""))
        lines.append(f"| {r['streams']} | {what} (mean batch {r['mean_batch']:.0f}) | {r['virtual_chars_per_s']:,.0f} "
                     f"(target {r['target_chars_per_s']:,.0f}) | {r['step_over_raw']:.2f} "
                     f"({r['time_per_step_ms']:.3f} / {r['raw_step_ms']:.3f} ms) | {r['core_cpu_outside_step_ms']:.3f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
