"""The service's own graphs (graphs.py): onnx is imported only by a process that builds one.

Their behaviour is pinned where they run: the sampler in test_sampling.py and
test_engine.py, the device probe and the model checks in test_runtime.py.
"""

from __future__ import annotations

import subprocess
import sys


def test_a_front_end_process_never_imports_onnx():
    # Importing onnx costs about 0.7 s of CPU; a front-end imports the engine's modules but builds no graph.
    code = (
        "import sys\n"
        "import charrnn.service.server, charrnn.service.frontend, charrnn.service.runtime, charrnn.service.sampler\n"
        "print('onnx' in sys.modules)\n"
        "charrnn.service.sampler.Sampler()\n"
        "print('onnx' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
