"""Two torchrun launchers on 127.0.0.1 as the two nodes of one training run, and faults in one of them.

Each launcher is what a node runs:

    torchrun --nnodes 2 --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT
             --rdzv-id ID --local-addr 127.0.0.1 --max-restarts R -m charrnn.training.cli ...

Node 0 starts first and hosts the rendezvous store; which node holds rank 0 is
the rendezvous's choice. Every address is the loopback one (gloo's too:
GLOO_SOCKET_IFNAME=lo). ``kill_worker`` sends SIGKILL to a worker of one node:
its launcher restarts its workers (--max-restarts), the other launcher sees the
node rejoin and restarts its own. ``kill_node`` kills a launcher with its
workers and ``restart_node`` starts it again, as a lost machine comes back.
Either way every rank resumes from the run folder's last.pt (the runs pass
--resume).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from testkit.training_faults import TIMING_FIELDS, records, steps_logged

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def env() -> dict:
    # One torch thread per worker: two launchers' workers share the machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def node_argv(port: int, run_id: str, train_args: list[str], nproc: int = 1, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{LOOPBACK}:{port}", "--rdzv-id", run_id,
            "--local-addr", LOOPBACK, "--max-restarts", str(max_restarts), "--monitor-interval", "0.2",
            "-m", "charrnn.training.cli", *train_args]


def train_args(data: Path, out: Path, max_steps: int, eval_interval: int, *extra: str) -> list[str]:
    """The tiny preset on the CPU, one thread, a fixed seed, and --resume: every (re)start continues the run."""
    return ["--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu", "--threads", "1",
            "--max-steps", str(max_steps), "--eval-interval", str(eval_interval), "--seed", "7", "--resume", *extra]


class TwoNodes:
    """Two launchers of one run, their output in LOGDIR/node0.log and node1.log; each node its own train args.

    Node 0 starts first and hosts the rendezvous store (as the pod named in --rdzv-endpoint does on
    Kubernetes), so that node 1 can die whole and come back, as a lost pod does.
    """

    def __init__(self, logdir: Path, node_args: tuple[list[str], list[str]], nproc: int = 1, max_restarts: int = 0,
                 node_env: tuple[dict, dict] = ({}, {})):
        self.logdir, self.port, self.run_id = logdir, free_port(), f"charrnn-{os.getpid()}-{time.monotonic_ns()}"
        self.argv = [node_argv(self.port, self.run_id, args, nproc, max_restarts) for args in node_args]
        self.node_env = node_env  # added to each node's environment (CUDA_VISIBLE_DEVICES: a node's own GPUs)
        self.procs: list[subprocess.Popen] = []

    def start(self) -> TwoNodes:
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs = [self._launch(0)]
        deadline = time.monotonic() + 60
        while not _listening(self.port):
            if self.procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node 0 did not open the rendezvous port:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        self.procs.append(self._launch(1))
        return self

    def _launch(self, i: int) -> subprocess.Popen:
        with open(self.logdir / f"node{i}.log", "a") as log:
            # A session of its own: a stuck run is ended with its workers (see stop).
            return subprocess.Popen(self.argv[i], env={**env(), **self.node_env[i]}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_node(self, i: int) -> None:
        """SIGKILL to node ``i``'s launcher and its workers at once, as when a machine is lost."""
        workers = self.workers(self.procs[i].pid).values()  # torchrun starts them in process groups of their own
        os.killpg(self.procs[i].pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        self.procs[i].wait()

    def restart_node(self, i: int) -> None:
        """Node ``i`` comes back with the command it had (a replacement pod)."""
        self.procs[i] = self._launch(i)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"the two nodes did not finish in {timeout:.0f} s:\n{self.output()[-4000:]}") from None

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def output(self) -> str:
        return "\n".join(f"--- node{i}\n" + (self.logdir / f"node{i}.log").read_text(errors="replace")
                         for i in range(len(self.procs)))

    def workers(self, launcher: int | None = None) -> dict[int, int]:
        """Global rank -> pid of every worker process the launchers (or the one ``launcher``) run now."""
        launchers = {p.pid for p in self.procs} if launcher is None else {launcher}
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                if ppid not in launchers:
                    continue
                environ = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
            except (OSError, ValueError):
                continue  # gone meanwhile
            if "RANK" in environ:
                found[int(environ["RANK"])] = int(entry.name)
        return found

    def kill_worker(self, node: int, timeout: float = 30.0) -> dict:
        """SIGKILL to one worker process of node ``node`` (its lowest rank); returns that rank and pid."""
        deadline = time.monotonic() + timeout
        while not (workers := self.workers(self.procs[node].pid)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node} runs no worker:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        rank = min(workers)
        os.kill(workers[rank], signal.SIGKILL)
        return {"rank": rank, "pid": workers[rank]}

    def __enter__(self) -> TwoNodes:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def wait_for_steps(out: Path, steps: int, nodes: TwoNodes, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while steps_logged(out) < steps:
        if any(p.poll() is not None for p in nodes.procs) or time.monotonic() > deadline:
            raise RuntimeError(f"the run did not reach step {steps}:\n{nodes.output()[-3000:]}")
        time.sleep(0.02)


def final_digest(out: Path) -> str:
    """sha256 of the weights in OUT/last.pt (the same digest each rank checks at every checkpoint)."""
    from charrnn.training.checkpoint import load_checkpoint  # torch: only where training runs
    from charrnn.training.resume import state_digest

    return state_digest(load_checkpoint(out / "last.pt")["model"])


def two_node_run(workdir: Path, data: Path, name: str, max_steps: int, eval_interval: int, fault: str = "",
                 kill_after: int = 0, max_restarts: int = 0, timeout: float = 240.0, extra: tuple[str, ...] = (),
                 nproc: int = 1, node_env: tuple[dict, dict] = ({}, {})) -> dict:
    """One run of two nodes into WORKDIR/NAME. Once ``kill_after`` steps are logged, ``fault``:

    - "worker": SIGKILL to a worker of node 1 (torchrun restarts every rank);
    - "node": SIGKILL to node 1's launcher and worker together, then node 1 started again.

    ``extra`` flags follow the tiny preset's (``--device cuda`` overrides ``--device cpu``); each node runs
    ``nproc`` ranks. Returns the exit statuses, the steps resumed from, the logs' records, the final
    weights' digest and the launchers' output.
    """
    out = workdir / name
    args = train_args(data, out, max_steps, eval_interval, *extra)
    started = time.monotonic()
    with TwoNodes(workdir / f"{name}-logs", (args, args), nproc, max_restarts, node_env) as nodes:
        killed = None
        if fault:
            wait_for_steps(out, kill_after, nodes)
            if fault == "worker":
                killed = {"worker": nodes.kill_worker(1)}
            else:
                nodes.kill_node(1)
                killed = {"node": 1}
                nodes.restart_node(1)
            killed["steps_logged"] = steps_logged(out)
        codes = nodes.wait(timeout)
        output = nodes.output()
    resumed = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines() if line.startswith("resumed from ")]
    return {
        "returncodes": codes, "seconds": round(time.monotonic() - started, 1), "killed": killed, "resumed_from": resumed,
        "steps": records(out / "steps.jsonl"), "metrics": records(out / "metrics.jsonl", TIMING_FIELDS),
        "digest": final_digest(out) if (out / "last.pt").is_file() else None, "output": output,
    }
