"""The optional parts of an install (the extras of pyproject.toml), and the line that says how to add one.

`make run` installs the service alone: no torch (onnx is there, for the
service's own graphs). charrnn-train needs the `train` extra and charrnn-export
the `export` extra; `make test` installs every extra. Installing an extra also
installs whatever the base install lacks.
"""

from __future__ import annotations


def missing_extra(prog: str, extra: str, error: ModuleNotFoundError) -> str:
    """The one error line of ``prog`` when the import of what ``extra`` installs failed with ``error``."""
    module = error.name or "a module it needs"
    return (f"{prog}: error: {module} is not installed, and {prog} needs it: install the {extra} extra with "
            f"pip install -e '.[{extra}]' in the charrnn checkout (or make test, which installs every extra)")
