"""Fixtures shared by the service tests: one tiny model repository per session, an env without torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    """MODELS/tiny/1 (LSTM 1x16) and MODELS/other/1 (GRU 1x16), real exports; copy it before changing it."""
    from testkit.modelfactory import make_model_repo

    root = tmp_path_factory.mktemp("models")
    make_model_repo(root, name="tiny", versions=(1,))
    make_model_repo(root, name="other", versions=(1,), cell="gru", seed=10)
    return root


@pytest.fixture
def repo_copy(model_repo, tmp_path) -> Path:
    """A private copy of model_repo that a test may add to, break or remove from."""
    return Path(shutil.copytree(model_repo, tmp_path / "models"))


@pytest.fixture(scope="session")
def no_torch_env(tmp_path_factory) -> dict:
    """Environment for charrnn-serve subprocesses: torch cannot be imported (as after `make run`)."""
    from testkit.serve_process import blocked_env

    return blocked_env(tmp_path_factory.mktemp("no_torch"))
