"""The README's and the docs' example commands, run against the bundled model, print what the docs say.

Every fenced block of README.md and docs/*.md is read for console examples: a
line that starts with ``$ `` is a command (a trailing backslash continues it),
and the lines after it, up to the next command or the end of the block, are
what it prints (stdout and stderr together). The commands of charrnn's own
programs and curl run for real, against one server on the bundled
``models/`` (the model `make run` serves):

- ``charrnn-generate`` finds the server through ``CHARRNN_SERVER`` and
  ``localhost:8080`` becomes the test server's HTTP port; in what they print,
  both addresses read as the docs' defaults again;
- a line ``...`` stands for any lines; ``...`` inside a line for any text; the
  ids and times of an OpenAI response are not compared;
- a command without printed lines must succeed.

Commands that need a model the docs train first (``--model names``) are left
out; ``test_every_runnable_example_was_run`` keeps the count honest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.serve_process import ServeProcess

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("charrnn-generate", "charrnn-serve", "charrnn-inspect", "charrnn-train", "charrnn-export", "curl")
GRPC_DEFAULT, HTTP_DEFAULT = "localhost:50051", "localhost:8080"


@dataclass
class Example:
    where: str  # file:line
    command: str
    printed: list[str]

    @property
    def program(self) -> str:
        return Path(self.command.split()[0]).name

    @property
    def needs_other_model(self) -> bool:
        return bool(re.search(r"--model (?!default\b)\S+", self.command))


def examples() -> list[Example]:
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        inside, current = False, None
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                inside = not inside
                current = None
                continue
            if not inside:
                continue
            if line.startswith("$ "):
                current = Example(f"{doc.relative_to(REPO)}:{number}", line[2:], [])
                found.append(current)
            elif current is not None and current.command.endswith("\\"):
                current.command = current.command[:-1] + " " + line.strip()
            elif current is not None:
                current.printed.append(line)
    return [e for e in found if e.program in PROGRAMS]


EXAMPLES = examples()
RUNNABLE = [e for e in EXAMPLES if not e.needs_other_model]


@pytest.fixture(scope="module")
def server(no_torch_env):
    with ServeProcess(REPO / "models", "--http-port", "0", env=no_torch_env) as proc:
        yield proc


def normalise(text: str, server: ServeProcess) -> list[str]:
    text = text.replace(server.target, GRPC_DEFAULT).replace(f"127.0.0.1:{server.http_port}", HTTP_DEFAULT)
    text = re.sub(r"cmpl-[0-9a-f]+", "cmpl-ID", text)
    text = re.sub(r'"created":\d+', '"created":T', text)
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def matches(printed: list[str], got: list[str]) -> bool:
    """``printed`` (the docs' lines, with ``...``) against ``got``."""
    printed = [re.sub(r"cmpl-[0-9a-f]+", "cmpl-ID", re.sub(r'"created":\d+', '"created":T', p.rstrip()))
               for p in printed]
    while printed and not printed[-1]:
        printed.pop()
    pattern = "".join(r"(?:.*\n)*?" if p == "..." else ".*".join(map(re.escape, p.split("..."))) + r"\n"
                        for p in printed)
    return re.fullmatch(pattern, "".join(g + "\n" for g in got)) is not None


def run(example: Example, server: ServeProcess) -> subprocess.CompletedProcess:
    command = example.command.replace(".venv/bin/", f"{BIN}/").replace(HTTP_DEFAULT, f"127.0.0.1:{server.http_port}")
    if example.program == "curl":  # in a terminal curl shows no progress meter; into a pipe it would
        command = "curl -sS" + command.removeprefix("curl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARRNN_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CHARRNN_SERVER"] = server.target
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)


@pytest.mark.parametrize("example", RUNNABLE, ids=[e.where for e in RUNNABLE])
def test_the_example_prints_what_the_docs_say(example, server):
    done = run(example, server)
    got = normalise(done.stdout, server)
    if not example.printed:
        assert done.returncode == 0 and got, f"$ {example.command}\nexit {done.returncode}:\n{done.stdout}"
        return
    assert matches(example.printed, got), (
        f"{example.where}: $ {example.command}\n--- the docs say:\n" + "\n".join(example.printed)
        + "\n--- it prints:\n" + "\n".join(got))


def test_every_runnable_example_was_run():
    """The parser found the examples the docs are known to have (a format change would silently skip them)."""
    programs = {e.program for e in RUNNABLE}
    assert {"charrnn-generate", "charrnn-serve", "charrnn-inspect", "curl"} <= programs, programs
    assert any(e.where.startswith("README.md") and "--seed 1" in e.command for e in RUNNABLE)
    assert len(RUNNABLE) >= 8, [e.where for e in RUNNABLE]


def test_make_run_prints_a_command_that_works_from_where_it_was_typed(tmp_path, no_torch_env):
    """`make run` starts .venv/bin/charrnn-serve from the checkout, without the venv on PATH: it prints what the
    README shows, and the "try" line runs as it is, from there."""
    env = dict(no_torch_env)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN) or "/usr/bin"
    with ServeProcess(REPO / "models", "--http-port", "0", env=env) as proc:
        banner = "".join(proc.stdout)
        shown = (banner.replace(f"127.0.0.1:{proc.port}", GRPC_DEFAULT).replace(f"127.0.0.1:{proc.http_port}", HTTP_DEFAULT)
                 .replace(f"127.0.0.1:{proc.metrics_port}", "localhost:8000"))
        readme = (REPO / "README.md").read_text()
        assert BIN != REPO / ".venv" / "bin" or "```\n" + shown + "```" in readme, f"README.md should show what make run prints:\n{shown}"
        line = next(ln for ln in banner.splitlines() if ln.strip().startswith("try"))
        command = line.strip().removeprefix("try").strip()
        if BIN.is_relative_to(REPO):
            assert command.startswith(f"{BIN.relative_to(REPO)}/charrnn-generate "), command
        done = subprocess.run(["bash", "-c", command.replace("--max-chars 300", "--max-chars 20")], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and len(done.stdout) > len("ROMEO:") + 10, done.stdout
