"""Faults injected into onnxruntime from outside the project, the way a broken GPU or driver would make them.

A server started with ``CHARRNN_TEST_ORT_FAULT=<control file>`` in its
environment (``serve_process.blocked_env(..., fault_file=...)``) wraps
``onnxruntime.InferenceSession.run`` and ``run_with_iobinding`` before any
project code runs. Every call reads the control file:

    ok (or empty)   the call runs
    fail N          the next N calls raise, then calls run again (the file counts down)
    fail            every call raises
    hang            the call blocks until the file says something else

Nothing in charrnn knows about this module.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

ENV = "CHARRNN_TEST_ORT_FAULT"
MESSAGE = "[ONNXRuntimeError] : 1 : FAIL : injected fault (CUDA failure 999: unknown error)"


def set_fault(path: str | os.PathLike, mode: str) -> None:
    """Writes the control file atomically: "ok", "fail", "fail N" or "hang"."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(mode)
    os.replace(tmp, path)


def _take(path: Path) -> str:
    """The fault this call gets ("ok", "fail" or "hang"); counts a "fail N" down under a file lock."""
    try:
        with open(path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            words = f.read().split()
            if not words or words[0] == "ok":
                return "ok"
            if words[0] == "fail" and len(words) == 2:
                left = int(words[1])
                if left <= 0:
                    return "ok"
                f.seek(0)
                f.truncate()
                f.write(f"fail {left - 1}")
                return "fail"
            return words[0]
    except FileNotFoundError:
        return "ok"


def install(control: str | os.PathLike) -> None:
    import onnxruntime as ort

    path = Path(control)
    cls = ort.InferenceSession

    def check() -> None:
        fault = _take(path)
        while fault == "hang":
            time.sleep(0.02)
            fault = _take(path)
        if fault == "fail":
            raise RuntimeError(MESSAGE)

    def wrap(method):
        def faulty(self, *args, **kwargs):
            check()
            return method(self, *args, **kwargs)

        faulty.__name__ = method.__name__
        return faulty

    cls.run = wrap(cls.run)
    cls.run_with_iobinding = wrap(cls.run_with_iobinding)


def install_from_env() -> None:
    """Called by the test servers' sitecustomize: installs the wrapper when the variable is set."""
    control = os.environ.get(ENV)
    if control:
        install(control)
