"""Engine faults, timed: how long callers wait when onnxruntime fails under a running server.

    python -m bench.engine_faults

Starts a real charrnn-serve (batching on, then off) whose onnxruntime calls fail
on command (testkit/ortfault.py) and prints, in seconds: from a fault to the
stream in flight ending with UNAVAILABLE; from a one-call fault to the next
successful request; from a permanent fault to the model's health turning
NOT_SERVING; and how long a request waits to be refused once the model failed.
tests/test_engine_failures.py asserts the behaviour; this measures it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from testkit import faults


def main() -> int:
    """The engine-fault timings, batching on and off, as a table."""

    from testkit.modelfactory import make_model_repo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = make_model_repo(Path(tmp) / "models", name="tiny")
        for batching in ("on", "off"):
            work = Path(tmp) / batching
            work.mkdir()
            rows.append(faults.engine_faults_timed(models, work, batching=batching))
    print("| batching | fault -> stream in flight ends | one-call fault -> next success | permanent fault -> NOT_SERVING "
          "| refusal while failed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batching']} | {r['transient_seconds_to_unavailable']:.3f} s ({r['transient_in_flight_code']}) "
              f"| {r['transient_seconds_to_next_success']:.3f} s | {r['permanent_seconds_to_not_serving']:.3f} s "
              f"| {r['refused_seconds']:.3f} s ({r['refused_code']}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
