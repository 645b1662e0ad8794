"""Bad input on every command line: one error line naming the flag, the value and what is allowed; no traceback.

Each row runs the installed entry point as a subprocess. A usage error exits 2
with the one line "<prog>: error: <flag> must be <rule>, got <value>", followed,
where argparse reports it, by " (see <prog> --help)" (charrnn/commandline.py), and
nothing else on stderr. A request the server refuses exits 1
with the gRPC status and the server's message, which names the request field.
A command whose extra is not installed (charrnn-train: train, charrnn-export:
export) exits 2 with the line that says how to install it.

Most rows run as after `make run`: the service alone, torch unimportable
(testkit/serve_process.py blocked_env). Flags are checked before torch is needed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.serve_process import REPO, ServeProcess

BIN = Path(sys.executable).parent
SERVICE, DEV = "service", "dev"  # the install a row runs in: `make run` (no torch), or `make test`
MISSING_EXTRA = (r"error: (torch|onnx) is not installed, and {prog} needs it: install the {extra} extra with "
                 r"pip install -e '\.\[{extra}\]' in the charrnn checkout \(or make test, which installs every extra\)$")
TRAIN = ["--data", "{tmp}/corpus.txt", "--out", "{tmp}/run"]

ROWS = [
    # (command, argv, install, exit status, the error line: a regex)
    ("charrnn-generate", ["--max-chars", "-5"], SERVICE, 2,
     r"error: --max-chars must be a whole number in \[0, 4294967295\], got -5$"),
    ("charrnn-generate", ["--seed", "-1"], SERVICE, 2,
     r"error: --seed must be a whole number in \[0, 18446744073709551615\], got -1$"),
    ("charrnn-generate", ["-n", "-3"], SERVICE, 2, r"error: -n must be a whole number in \[0, 4294967295\], got -3$"),
    ("charrnn-generate", ["--score", "{tmp}/missing.txt", "--logprobs", "2"], SERVICE, 2,
     r"error: --score must be a readable text file \(or - for stdin\), got '.*missing.txt': No such file"),
    ("charrnn-generate", ["--score", "{tmp}/latin1.txt"], SERVICE, 2,
     r"error: --score must be a UTF-8 text file, got '.*latin1.txt': an undecodable byte at 3$"),
    ("charrnn-generate", ["--timeout", "0"], SERVICE, 2, r"error: --timeout must be a number of seconds > 0, got 0.0$"),
    ("charrnn-generate", ["--max-resumes", "-1"], SERVICE, 2, r"error: --max-resumes must be >= 0 \(0: never resume\), got -1$"),
    ("charrnn-generate", ["--bias", "q"], SERVICE, 2, r"error: --bias must be C=V \(a character, a number\), got 'q'$"),
    ("charrnn-generate", ["--max-chars", "many"], SERVICE, 2, r"error: argument --max-chars: invalid int value: 'many'$"),
    ("charrnn-generate", ["--server", "{server}", "--regex", "[A-Z"], SERVICE, 1,
     r"INVALID_ARGUMENT: regex must be a regular expression interegular can parse "
     r"\(unterminated character set at position 0\), got '\[A-Z' \(server 127\.0\.0\.1:\d+\)$"),
    ("charrnn-generate", ["--server", "{server}", "--max-chars", "0"], SERVICE, 1,
     r"INVALID_ARGUMENT: max_chars must be in \[1, 10000\], got 0 \(server 127\.0\.0\.1:\d+\)$"),
    ("charrnn-train", [*TRAIN, "--layers", "0"], SERVICE, 2, r"error: --layers must be an integer >= 1, got 0$"),
    ("charrnn-train", [*TRAIN, "--seed", "-1"], SERVICE, 2,
     r"error: --seed must be an integer in \[0, 4294967295\] \(numpy's seed range\), got -1$"),
    ("charrnn-train", [*TRAIN, "--lr", "nan"], SERVICE, 2, r"error: --lr must be a finite number > 0, got nan$"),
    ("charrnn-train", ["--data", "{tmp}/corpus.txt", "--out", "{tmp}/corpus.txt"], SERVICE, 2,
     r"error: --out must be a run folder \(new or existing\), got '.*corpus.txt': a file$"),
    ("charrnn-train", [*TRAIN, "--preset", "huge"], SERVICE, 2, r"error: argument --preset: invalid choice: 'huge'"),
    ("charrnn-train", TRAIN, SERVICE, 2, MISSING_EXTRA.format(prog="charrnn-train", extra="train")),
    ("charrnn-export", ["{tmp}/run", "--name", "with space"], SERVICE, 2,
     r"error: --name: model name must be 1 to 128 characters .*, got 'with space'$"),
    ("charrnn-export", ["{tmp}/run", "--name", "m", "--version", "0"], SERVICE, 2,
     r"error: --version must be a positive integer of at most 18 digits, got 0$"),
    ("charrnn-export", ["{tmp}/run", "--name", "m", "--tolerance", "nan"], SERVICE, 2,
     r"error: --tolerance must be >= 0, got nan$"),
    ("charrnn-export", ["{tmp}/run", "--name", "m"], SERVICE, 2,
     MISSING_EXTRA.format(prog="charrnn-export", extra="export")),
    ("charrnn-export", ["{tmp}/none.pt", "--name", "m"], DEV, 2, r"charrnn-export: .*none.pt: no such checkpoint file"),
    ("charrnn-inspect", ["sweep", "{models}", "--seed", "-1"], SERVICE, 2, r"error: --seed must be in \[0, 2\*\*64\), got -1$"),
    ("charrnn-inspect", ["sweep", "{models}", "--temperatures", "hot"], SERVICE, 2,
     r"error: --temperatures must be numbers separated by commas, got 'hot'$"),
    ("charrnn-inspect", ["{models}", "{tmp}/corpus.txt", "--out", "{tmp}/corpus.txt/page.html"], SERVICE, 2,
     r"error: --out must be a file in a folder that can be made, got '.*corpus.txt/page.html': .*corpus.txt is a file$"),
    ("charrnn-inspect", ["{models}", "{tmp}/corpus.txt", "--top", "0"], SERVICE, 2, r"error: --top must be in \[1, 50\], got 0$"),
    ("charrnn-serve", ["--models", "{tmp}", "--port", "-1"], SERVICE, 2,
     r"error: --port \(or CHARRNN_PORT\) must be in \[0, 65535\] \(0 picks a free port\), got -1$"),
    ("charrnn-serve", ["--models", "{tmp}/missing"], SERVICE, 2,
     r"error: --models \(or CHARRNN_MODELS\) must be a folder, got '.*missing'$"),
    ("charrnn-serve", ["--models", "{tmp}", "--batching", "maybe"], SERVICE, 2,
     r"error: argument --batching: must be on or off, got 'maybe'$"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_errors")
    (folder / "corpus.txt").write_text("To be, or not to be: that is the question.\n" * 20, encoding="utf-8")
    (folder / "latin1.txt").write_bytes("abc\xe9".encode("latin-1"))
    return folder


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    with ServeProcess(model_repo, env=no_torch_env) as proc:
        yield proc


@pytest.mark.parametrize("command,argv,install,code,line", ROWS,
                         ids=[f"{row[0]} {' '.join(row[1])}" for row in ROWS])
def test_bad_input_exits_with_one_line_naming_flag_and_value(command, argv, install, code, line, tmp, no_torch_env,
                                                             request):
    server = request.getfixturevalue("server").target if "{server}" in argv else ""
    # {models}: the bundled models/default, a real model for charrnn-inspect with no training
    argv = [a.format(tmp=tmp, server=server, models=REPO / "models") for a in argv]
    env = no_torch_env if install == SERVICE else {k: v for k, v in os.environ.items() if not k.startswith("CHARRNN_")}
    done = subprocess.run([str(BIN / command), *argv], env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, done.stderr
    assert done.stdout == ""  # nothing done halfway
    errors = done.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"{command}: "), done.stderr
    assert re.search(line, errors[0].removesuffix(f" (see {command} --help)")), errors[0]
