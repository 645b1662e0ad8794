"""The generated gRPC code in charrnn/v1 is what protos/ generates, and the proto documents every field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

grpc_tools = pytest.importorskip("grpc_tools")
from grpc_tools import protoc  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROTO = "charrnn/v1/generator.proto"
GENERATED = ("generator_pb2.py", "generator_pb2.pyi", "generator_pb2_grpc.py")


def test_generated_code_is_current(tmp_path):
    args = ["protoc", f"-I{REPO / 'protos'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(REPO / "protos" / PROTO)]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "charrnn" / "v1" / name).read_text()
        committed = (REPO / "charrnn" / "v1" / name).read_text()
        assert committed == fresh, f"charrnn/v1/{name} is stale: run `make proto` and commit the result"


def test_every_field_and_enum_value_has_a_comment():
    lines = (REPO / "protos" / PROTO).read_text().splitlines()
    field = re.compile(r"^\s+(optional |repeated )?[\w.]+ \w+ = \d+;|^\s+[A-Z_]+ = \d+;")
    undocumented = []
    for i, line in enumerate(lines):
        if field.match(line) and not lines[i - 1].strip().startswith("//"):
            undocumented.append(f"line {i + 1}: {line.strip()}")
    assert undocumented == []


def test_enums_start_with_unspecified():
    text = (REPO / "protos" / PROTO).read_text()
    for name, body in re.findall(r"enum (\w+) \{(.*?)\}", text, re.S):
        first = re.search(r"([A-Z_]+) = 0;", body)
        assert first and first.group(1).endswith("_UNSPECIFIED"), f"enum {name}: value 0 must be *_UNSPECIFIED"
