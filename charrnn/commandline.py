"""The argument parser of every charrnn command: a usage error is one line on stderr and exit status 2.

argparse prints the whole usage block before its error, which for commands
with thirty flags buries the one line that matters. Here the error line names
the flag, the value and what is allowed, and points at ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """``prog: error: <message> (see prog --help)`` on stderr, then exit status 2 (argparse's convention)."""
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)
