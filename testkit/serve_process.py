"""A real `charrnn-serve` subprocess for tests: free ports, its banner parsed, its logs collected.

The process runs with `torch` made unimportable (a sitecustomize on PYTHONPATH),
so every test that uses it also checks that the service runs without it. The
`onnx` package stays importable: the service builds its own small graphs with it
(service/graphs.py), and the base install (`make run`) has it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVE = str(Path(sys.executable).parent / "charrnn-serve")
GENERATE = str(Path(sys.executable).parent / "charrnn-generate")
REPO = Path(__file__).resolve().parent.parent
# sitecustomize.py: runs at interpreter start; a None entry makes `import torch` raise ImportError.
# It also installs testkit.ortfault's onnxruntime wrapper when CHARRNN_TEST_ORT_FAULT is set.
BLOCKER = (
    "import os, sys\nsys.modules['torch'] = None\n"
    "if os.environ.get('CHARRNN_TEST_ORT_FAULT'):\n"
    f"    sys.path.append({str(REPO)!r})\n"
    "    from testkit.ortfault import install_from_env\n"
    "    install_from_env()\n"
)


def blocked_env(tmp_dir: Path, extra: dict | None = None) -> dict:
    """os.environ with a sitecustomize that blocks torch first on PYTHONPATH.

    With ``CHARRNN_TEST_ORT_FAULT`` in ``extra`` the server's onnxruntime calls obey that
    control file (testkit/ortfault.py).
    """
    (tmp_dir / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARRNN_")}
    env["PYTHONPATH"] = str(tmp_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ServeProcess:
    """`charrnn-serve --models MODELS --host 127.0.0.1 --port 0 --metrics-port 0 ARGS`."""

    def __init__(self, models: Path, *args: str, env: dict):
        self.argv = [SERVE, "--models", str(models), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args]
        self.env = env
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0  # with --http-port
        self.proc: subprocess.Popen | None = None
        self._ready = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _pump(self, pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)
            if m := re.match(r"\s+gRPC\s+\S+:(\d+)", line):
                self.port = int(m.group(1))
            if m := re.match(r"\s+HTTP\s+https?://\S+:(\d+)/", line):
                self.http_port = int(m.group(1))
            if m := re.match(r"\s+metrics\s+http://\S+:(\d+)/metrics", line):
                self.metrics_port = int(m.group(1))
            if line.lstrip().startswith("try "):
                self._ready.set()
        pipe.close()

    def start(self, timeout: float = 60.0) -> "ServeProcess":
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pipe, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._pump, args=(pipe, lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"charrnn-serve did not start (rc {self.proc.returncode}):\n{self.log()}")
        return self

    def log(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def wait_for_log(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Waits for a stderr line (from index ``start`` on) matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr[start:]:
                if m := re.search(pattern, line):
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} in {timeout}s:\n{''.join(self.stderr)}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
