"""Publishing a model file into a model repository: MODELS/<name>/<version>/model.onnx.

A new version is built in a hidden staging folder beside the versions and
renamed into place in one step, so a server scanning the repository sees
either no folder for that version or a folder with a complete, checked file;
a staging name is never a version (versions are positive integers).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from charrnn.exporter.export import published_mode
from charrnn import modelfile as mf
from charrnn.modelfile import MODEL_FILE, check_model_name



class RepositoryError(ValueError):
    """A publish request the repository cannot take; the message says what to change."""


def versions(model_dir: Path) -> list[int]:
    """The version numbers present under ``model_dir``, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and mf.is_version(p.name))


def next_version(model_dir: Path) -> int:
    return max(versions(model_dir), default=0) + 1


def publish(
    repo: str | os.PathLike,
    name: str,
    write: Callable[[Path], object],
    *,
    version: int | None = None,
    force: bool = False,
) -> tuple[Path, object]:
    """Calls ``write(path)`` to produce ``repo/name/<version>/model.onnx``; returns (path, its result).

    ``version`` defaults to the highest existing one + 1. An existing version is
    refused unless ``force``, which replaces its model.onnx (``write`` is
    expected to replace atomically). If ``write`` raises, nothing new is left.
    """
    try:
        check_model_name(name)
    except ValueError as e:
        raise RepositoryError(str(e)) from None
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"--repo must be a model repository folder, got {str(repo)!r}: a file")
    model_dir = repo / name
    if version is None:
        version = next_version(model_dir)
    elif isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RepositoryError(f"version must be a positive integer, got {version!r}")
    target = model_dir / str(version)
    if target.exists():
        if not force:
            raise RepositoryError(
                f"{target} already exists (versions there: {versions(model_dir)}); "
                f"leave out --version to publish {next_version(model_dir)}, or pass --force to replace it"
            )
        return target / MODEL_FILE, write(target / MODEL_FILE)

    created_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        result = write(staging / MODEL_FILE)
        try:
            # Atomic; fails if another export took this version meanwhile (non-empty target).
            os.chmod(staging, published_mode(directory=True))
            os.rename(staging, target)
        except OSError as e:
            raise RepositoryError(f"{target}: cannot publish ({e.strerror}); was it published meanwhile?") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_model_dir:
            try:
                model_dir.rmdir()  # only if still empty: leave no name without versions behind
            except OSError:
                pass
        raise
    return target / MODEL_FILE, result
