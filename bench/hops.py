"""The path of one Generate: which of charrnn's functions and modules run for it, in which process and thread.

    python -m bench.hops --model models/default/2/model.onnx [--rev da8715b]

Serves the model with charrnn-serve (or an earlier revision's, ``--rev``) with a profile hook in every process
(a sitecustomize on PYTHONPATH: sys.setprofile and threading.setprofile) that records each charrnn function
called, with its thread, while a window is open. After one warm-up request it opens an idle window of
``--idle`` seconds, then a window around one Generate; the functions of the Generate window that the idle
window also saw (heartbeats, polls, metrics) are left out. What remains is the path of that request: the
functions and modules, by process and thread, in the order first called. Writes bench/results/hops[-REV].md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import oldtree

RESULTS = Path(__file__).parent / "results"

HOOK = r'''
import os, sys, threading, json, itertools
_dir = os.environ.get("CHARRNN_HOPS_DIR")
if _dir:
    _phase = {"name": ""}
    _seen = {}
    _order = itertools.count()

    def _prof(frame, event, arg):
        name = _phase["name"]
        if event != "call" or not name:
            return
        mod = frame.f_globals.get("__name__", "")
        if not mod.startswith("charrnn."):
            return
        key = (name, mod, frame.f_code.co_qualname, threading.current_thread().name.split("-")[0])
        if key not in _seen:
            _seen[key] = next(_order)

    def _poll():
        import time
        path = os.path.join(_dir, "phase")
        while True:
            try:
                with open(path) as f:
                    name = f.read().strip()
            except OSError:
                name = ""
            if name != _phase["name"]:
                _phase["name"] = name
                out = [[k[0], k[1], k[2], k[3], v] for k, v in list(_seen.items())]
                with open(os.path.join(_dir, f"{os.getpid()}.json"), "w") as f:
                    json.dump({"argv": " ".join(sys.argv)[:200], "seen": out}, f)
            time.sleep(0.005)

    sys.setprofile(_prof)
    threading.setprofile(_prof)
    threading.Thread(target=_poll, name="hops", daemon=True).start()
'''


def serve(repo: Path, env: dict, cwd: Path | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-c", "import sys; from charrnn.service.server import main; sys.exit(main())",
           "--models", str(repo), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--log-level",
           "warning", "--frontends", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.search(r"gRPC\s+\S+:(\d+)", line):
            return proc, f"127.0.0.1:{m.group(1)}"
    proc.kill()
    raise RuntimeError("the server did not start")


def generate(target: str) -> str:
    from charrnn.service.client import GeneratorClient

    with GeneratorClient(target) as client:
        return client.generate("ROMEO:", 20, seed=1, timeout=30).text()


def measure(model: Path, rev: str, idle: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="charrnn-hops-"))
    try:
        repo = work / "repo"
        (repo / "m" / "1").mkdir(parents=True)
        shutil.copy(model, repo / "m" / "1" / "model.onnx")
        hook = work / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(HOOK)
        data = work / "data"
        data.mkdir()
        if rev:
            env, cwd = oldtree.environment(rev, str(hook))
        else:
            env, cwd = {**os.environ, "PYTHONPATH": str(hook)}, None
        env = {**env, "CHARRNN_HOPS_DIR": str(data)}
        proc, target = serve(repo, env, cwd)
        try:
            generate(target)  # warm-up: lazy set-up is not the path
            time.sleep(1.0)
            phase = data / "phase"
            phase.write_text("idle")
            time.sleep(idle)
            phase.write_text("generate")
            text = generate(target)
            time.sleep(0.3)  # the last messages and the end reach every process
            phase.write_text("")
            time.sleep(0.5)
        finally:
            proc.terminate()
            proc.wait(20)
        processes = {}
        for f in data.glob("*.json"):
            d = json.loads(f.read_text())
            idle_keys = {(m, q) for ph, m, q, t, _ in d["seen"] if ph == "idle"}
            path = sorted(((o, m, q, t) for ph, m, q, t, o in d["seen"]
                           if ph == "generate" and (m, q) not in idle_keys))
            if path:
                kind = "core" if "corerun" in d["argv"] or "--address" in d["argv"] else "server (front-end 0)"
                processes[kind] = path
        return {"rev": rev or "HEAD", "text": text, "processes": processes}
    finally:
        shutil.rmtree(work, ignore_errors=True)


GENERATED = ("<listcomp>", "<genexpr>", "<setcomp>", "<dictcomp>", "__create_fn__")  # not written as a function


def _named(q: str) -> bool:
    return not any(g in q for g in GENERATED)


def summary(r: dict) -> tuple[int, int, int]:
    funcs = {(m, q) for p in r["processes"].values() for _, m, q, _ in p if _named(q)}
    mods = {m for m, _ in funcs}
    threads = {(k, t) for k, p in r["processes"].items() for *_, t in p}
    return len(funcs), len(mods), len(threads)


def markdown(results: list[dict], command: str) -> str:
    lines = ["# The path of one Generate", "", f"`{command}`: functions of charrnn that ran for one Generate "
             "(prime `ROMEO:`, 20 characters) and not in an idle window as long, by process and thread, in the "
             "order first called. Comprehensions and generated dataclass methods are not counted.", "", "| revision | functions | modules | processes | threads |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        f, m, t = summary(r)
        lines.append(f"| {r['rev']} | {f} | {m} | {len(r['processes'])} | {t} |")
    for r in results:
        lines += ["", f"## {r['rev']}", ""]
        for kind, path in sorted(r["processes"].items(), reverse=True):
            lines.append(f"- **{kind}**")
            for _, m, q, t in [x for x in path if _named(x[2])]:
                lines.append(f"  - `{m.removeprefix('charrnn.')}.{q}` ({t})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/default/2/model.onnx")
    p.add_argument("--rev", default="", help="also measure this earlier revision")
    p.add_argument("--idle", type=float, default=1.0, help="seconds of the idle window")
    p.add_argument("--out", default=str(RESULTS / "hops.md"))
    a = p.parse_args(argv)
    results = [measure(Path(a.model), rev, a.idle) for rev in ([a.rev] if a.rev else []) + [""]]
    text = markdown(results, "python -m bench.hops " + " ".join(argv if argv is not None else sys.argv[1:]))
    Path(a.out).write_text(text)
    for r in results:
        f, m, t = summary(r)
        print(f"{r['rev']}: {f} functions, {m} modules, {len(r['processes'])} processes, {t} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
