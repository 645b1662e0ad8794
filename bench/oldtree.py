"""An earlier revision of charrnn, importable as ``charrnn`` in a process of its own: the baseline of a benchmark.

    env, cwd = oldtree.environment("d91a215")
    subprocess.run([sys.executable, "-c", "import charrnn.service.engine"], env=env, cwd=cwd)

The revision is extracted with ``git archive`` into a temporary folder, where
a package folder maps the project's rooms (service/, training/, ...) to
``charrnn.*`` as pyproject.toml does. A process started with this environment
and working folder imports that revision instead of the installed one.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {"service": "service", "training": "training", "exporter": "exporter", "inspector": "inspector"}


@functools.cache
def extract(rev: str) -> Path:
    """The package folder of ``rev``: charrnn/ inside it is that revision's package."""
    tree = Path(tempfile.mkdtemp(prefix=f"charrnn-{rev}-"))
    subprocess.run(f"git -C {ROOT} archive {rev} | tar -x -C {tree}", shell=True, check=True)
    pkg = tree / "pkg" / "charrnn"
    pkg.mkdir(parents=True)
    for entry in (tree / "charrnn").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, folder in ROOMS.items():
        if (tree / folder).is_dir():
            (pkg / name).symlink_to(tree / folder)
    return tree / "pkg"


def environment(rev: str, extra_path: str = "") -> tuple[dict, Path]:
    """(environment, working folder) of a process that imports revision ``rev`` as charrnn."""
    pkg = extract(rev)
    path = os.pathsep.join(p for p in (str(pkg), extra_path) if p)
    # The working folder is the package folder: the current one (the project's root) holds another charrnn/.
    return {**os.environ, "PYTHONPATH": path}, pkg
