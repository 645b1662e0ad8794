"""deploy/docker: the container recipes name real files, real commands and a non-root user.

There is no container engine here, so the images are not built; instead the
files each Dockerfile copies are copied the same way into a temporary context
and the package is built from exactly them (pip wheel), and every command,
extra, port and user is checked against pyproject.toml and the Kubernetes pods.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.deploytools import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

DOCKER = REPO / "deploy" / "docker"
IMAGES = {"service": DOCKER / "Dockerfile.service", "train": DOCKER / "Dockerfile.train"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _args(dockerfile: Path, word: str) -> list[str]:
    return [rest for w, rest in instructions(dockerfile) if w == word]


def _exec_form(text: str) -> list[str]:
    value = yaml.safe_load(text)  # a JSON array is valid YAML
    assert isinstance(value, list), f"{text!r} is not exec form"
    return value


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_runs_as_a_numeric_non_root_user_matching_the_pods(image):
    users = _args(IMAGES[image], "USER")
    assert users, "no USER instruction"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    kind = {"service": "deployment.yaml", "train": "train-job.yaml"}[image]
    pod = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / kind).read_text())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_copies_every_package_folder_and_nothing_missing(image):
    sources = [shlex.split(rest)[:-1] for rest in _args(IMAGES[image], "COPY")]
    copied = {s.rstrip("/") for group in sources for s in group}
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    top_level = {d.split("/")[0] for d in package_dirs}
    assert top_level | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    ignore = (DOCKER / f"{IMAGES[image].name}.dockerignore").read_text().split()
    kept = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    assert copied <= kept, f"{IMAGES[image].name}.dockerignore leaves out {sorted(copied - kept)}"


@pytest.mark.slow
def test_the_copied_files_build_the_package_with_its_commands(tmp_path):
    """pip builds the wheel from exactly what Dockerfile.service copies; its commands are in it."""
    context = tmp_path / "context"
    for rest in _args(IMAGES["service"], "COPY"):
        *sources, _ = shlex.split(rest)
        for source in sources:
            src = REPO / source
            dst = context / source
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheels"), str(context)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    wheel = next((tmp_path / "wheels").glob("charrnn-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "charrnn/service/metrics.py" in names and "charrnn/v1/generator_pb2.py" in names
    for script in ("charrnn-serve", "charrnn-train", "charrnn-export"):
        assert f"{script} = " in entry_points


def test_service_image_serves_models_from_the_volume():
    dockerfile = IMAGES["service"]
    entrypoint = _exec_form(_args(dockerfile, "ENTRYPOINT")[-1])
    assert entrypoint == ["charrnn-serve"] and "charrnn-serve" in SCRIPTS
    cmd = _exec_form(_args(dockerfile, "CMD")[-1])
    volumes = _exec_form(_args(dockerfile, "VOLUME")[-1])
    assert cmd[cmd.index("--models") + 1] in volumes
    exposed = {int(p) for rest in _args(dockerfile, "EXPOSE") for p in rest.split()}
    container = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    ports = {p["containerPort"] for p in container["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert exposed == ports


@pytest.mark.parametrize("image, extra", [("service", None), ("train", "export")])
def test_installs_the_package_the_way_the_project_does(image, extra):
    runs = " ".join(_args(IMAGES[image], "RUN"))
    wanted = "pip install ." if extra is None else f"pip install '.[{extra}]'"
    assert wanted in runs
    if extra:
        assert extra in PYPROJECT["project"]["optional-dependencies"]
    base = _args(IMAGES[image], "ARG")[0]
    assert base.startswith("BASE_IMAGE=") and _args(IMAGES[image], "FROM") == ["${BASE_IMAGE}"]
    assert ("nvidia/cuda:" if image == "service" else "pytorch/pytorch:") in base and "cuda" in base


def test_job_commands_exist_in_the_train_image():
    job = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "train-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        assert container["command"][0] in SCRIPTS, container["name"]
    assert _exec_form(_args(IMAGES["train"], "CMD")[-1])[0] in SCRIPTS
