"""What the reliability checks observe a server through: /proc, /metrics, the health service.

Everything here reads a running `charrnn-serve` from the outside, as an
operator would: its resident memory and open descriptors from /proc/PID, its
gauges and counters from the Prometheus endpoint, its health over gRPC.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The statuses the proto documents for Generate, plus OK. CANCELLED is only ever
# the client's own doing (it cancelled the call); INTERNAL and UNKNOWN mean a bug.
DOCUMENTED = frozenset(
    {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}
)
CLIENT_CANCELLED = "CANCELLED (client)"  # outcome label of a call the client cancelled itself


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/PID/status), bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    """Threads of ``pid`` (entries of /proc/PID/task)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def thread_names(pid: int) -> dict[str, int]:
    """How many threads of ``pid`` carry each name (/proc/PID/task/TID/comm, 15 characters at most)."""
    names: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except FileNotFoundError:  # the thread ended while we looked
            continue
        names[name] = names.get(name, 0) + 1
    return dict(sorted(names.items()))


def scrape(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label text: value} of every sample of ``name`` in a Prometheus exposition."""
    out = {}
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels`` (other labels summed over)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for text_labels, v in metric_values(text, name).items()
               if all(re.search(rf'[{{,]{re.escape(w)}[,}}]', text_labels) for w in wanted))


def has_series(text: str, name: str, **labels: str) -> bool:
    """Whether ``name`` has a sample whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return any(all(re.search(rf'[{{,]{re.escape(w)}[,}}]', t) for w in wanted) for t in metric_values(text, name))


def requests_by_code(text: str) -> dict[str, int]:
    """charrnn_requests_total summed over models, by code; codes never seen are left out."""
    counts: dict[str, int] = {}
    for labels, value in metric_values(text, "charrnn_requests_total").items():
        code = re.search(r'code="([^"]*)"', labels).group(1)
        counts[code] = counts.get(code, 0) + int(value)
    return {c: n for c, n in sorted(counts.items()) if n}


def wait_streams_idle(url: str, timeout: float) -> tuple[float, float, float]:
    """Polls /metrics until active and queued streams are both 0; returns (active, queued, seconds waited)."""
    start = time.monotonic()
    while True:
        text = scrape(url)
        active = metric_sum(text, "charrnn_active_streams")
        queued = metric_sum(text, "charrnn_queued_streams")
        waited = time.monotonic() - start
        if (active == 0 and queued == 0) or waited > timeout:
            return active, queued, waited
        time.sleep(0.05)


def wait_at_most(read, pid: int, target: int, timeout: float) -> tuple[int, float]:
    """Polls ``read(pid)`` (open_fds, threads) until it is at most ``target``; returns (value, seconds waited)."""
    start = time.monotonic()
    while True:
        n = read(pid)
        waited = time.monotonic() - start
        if n <= target or waited > timeout:
            return n, waited
        time.sleep(0.1)


def children(pid: int) -> dict[int, str]:
    """The child processes of ``pid``: {pid: command line}."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found[int(entry)] = f.read().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError, IndexError):  # gone while we looked
            continue
    return found


def health_status(target: str, service: str = "", timeout: float = 10.0) -> str:
    """grpc.health.v1 status name of ``service`` at ``target`` (a fresh plaintext channel)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
