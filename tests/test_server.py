"""charrnn-serve at the edges: what it refuses to start with, and what the servicer may import."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest

from charrnn.modelfile import MODEL_FILE
from charrnn.service import errors
from charrnn.service.metrics import STATUS_CODES
from charrnn.service.servicer import STATUS_FOR
from testkit.serve_process import SERVE


def _serve(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([SERVE, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *argv],
                          env=env, capture_output=True, text=True, timeout=120)


def test_servicer_and_client_import_without_torch_or_onnxruntime():
    code = (
        "import sys\n"
        "for name in ('torch', 'onnxruntime', 'onnx'):\n"
        "    sys.modules[name] = None\n"
        "import charrnn.service.servicer, charrnn.service.validation, charrnn.service.client\n"
        "import charrnn.service.generate_cli\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_every_error_kind_and_metric_code_has_one_status():
    kinds = {cls.code for cls in (errors.CharrnnError, *errors.CharrnnError.__subclasses__())}
    assert kinds <= set(STATUS_FOR)
    assert set(STATUS_CODES) == set(STATUS_FOR)
    assert all(STATUS_FOR[code].name == code for code in STATUS_FOR)


def test_refuses_to_start_when_no_model_is_usable_naming_each_file(tmp_path, no_torch_env):
    for name, data in (("broken", b"not onnx"), ("empty", b"")):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / MODEL_FILE).write_bytes(data)
    done = _serve(["--models", str(tmp_path)], no_torch_env)
    assert done.returncode == 1
    for name in ("broken", "empty"):
        assert str(tmp_path / name / "1" / MODEL_FILE) + ":" in done.stderr
    assert "cannot start: no usable model in" in done.stderr and done.stdout == ""


def test_serves_the_good_models_beside_a_bad_one(model_repo, tmp_path, no_torch_env):
    # The whole path is covered in test_e2e.py; here only that the start-up is not refused.
    repo = shutil.copytree(model_repo, tmp_path / "models")
    (tmp_path / "models" / "bad" / "1").mkdir(parents=True)
    (tmp_path / "models" / "bad" / "1" / MODEL_FILE).write_bytes(b"junk")
    proc = subprocess.Popen([SERVE, "--models", str(repo), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
                            env=no_torch_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("charrnn-serve: serving other@1, tiny@1"), banner
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and str(tmp_path / "models" / "bad" / "1" / MODEL_FILE) in err


def test_port_in_use_is_a_clear_start_up_error(model_repo, no_torch_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(["--models", str(model_repo), "--port", str(port)], no_torch_env)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (--host/--port)" in done.stderr


def test_bad_flag_through_the_real_cli_exits_2(model_repo, no_torch_env):
    done = _serve(["--models", str(model_repo), "--max-chars", "0"], no_torch_env)
    assert done.returncode == 2
    assert "--max-chars (or CHARRNN_MAX_CHARS) must be >= 1, got 0" in done.stderr


def test_device_cuda_where_cuda_is_not_usable_refuses_to_start(model_repo, no_torch_env):
    from charrnn.service.runtime import cuda_unusable_reason

    if cuda_unusable_reason() is None:
        pytest.skip("CUDA is usable here")
    done = _serve(["--models", str(model_repo), "--device", "cuda"], no_torch_env)
    assert done.returncode == 1
    assert "--device cuda" in done.stderr and "not usable" in done.stderr
