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


def test_engine_core_processes_read_the_servers_sampler_graphs_without_importing_onnx(model_repo, no_torch_env):
    """The server builds the sampler graphs once (sampler.write_graphs); its core processes, which start again at
    every restart and reload, read them and never load onnx (its extension module is not mapped in them)."""
    from testkit import probes
    from testkit.serve_process import ServeProcess

    with ServeProcess(model_repo, env=no_torch_env) as server:
        cores = [pid for pid, cmd in probes.children(server.proc.pid).items() if "charrnn.service.corerun" in cmd]
        assert cores
        for pid in cores:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
            assert "onnxruntime" in maps and "onnx_cpp2py_export" not in maps
        with open(f"/proc/{server.proc.pid}/maps") as f:
            assert "onnx_cpp2py_export" in f.read()  # the server built them
