"""One run on several machines: what every rank must share, and who writes the files they share.

Under ``torchrun --nnodes N`` every rank reads ``--data`` on its own node (a
volume every node mounts, or a copy of the corpus on each node) and all ranks
name one ``--out``, a folder every node mounts: rank 0 writes the checkpoints
there, and each rank reads its own part of last.pt from it when the run resumes.
Two checks turn a wrong set-up into a message instead of ranks that train on
different text or resume from different steps:

- every rank's corpus has rank 0's sha256, checked before anything is written;
- every rank finds the same last.pt in ``--out`` (or none).

``tokens.bin`` is written once per run folder (``runtime.in_turn``): by rank 0,
then by the first rank of each other node, which finds rank 0's file when
``--out`` is shared, then read by the remaining ranks.

``launch_warnings`` names two ways a torchrun launch can break its restarts.

A single process passes through all of this unchanged.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .config import ConfigError
from .corpus import Corpus, prepare_corpus, scan_spec
from .runtime import Runtime, gather_to_all, in_turn


def prepare_corpus_on_every_rank(rt: Runtime, spec: str, out: Path, errors: str, vocab: list[str] | None) -> Corpus:
    """``corpus.prepare_corpus`` on every rank, after every rank has scanned the same corpus."""
    scanned = scan_spec(spec, out, errors)
    check_same_corpus(rt, spec, scanned[2].sha256, scanned[2].chars)
    return in_turn(rt, lambda: prepare_corpus(spec, out, errors, vocab, scanned=scanned))


def check_same_corpus(rt: Runtime, spec: str, sha256: str, chars: int) -> None:
    """Every rank read the bytes rank 0 read (a collective: every rank calls it)."""
    seen = gather_to_all(rt, (socket.gethostname(), sha256, chars))
    host0, sha0, chars0 = seen[0]
    for rank, (host, sha, n) in enumerate(seen):
        if sha != sha0:
            raise ConfigError(
                "data", f"the same corpus on every node: rank 0 on {host0} read {chars0:,} characters with sha256"
                f" {sha0[:12]}... (copy the same files to every node, or read them from one shared volume)",
                f"{spec} with {n:,} characters and sha256 {sha[:12]}... on rank {rank} ({host})")


def check_same_checkpoint(rt: Runtime, out: Path, step: int | None) -> None:
    """Every rank found last.pt of the same step in ``out``, or every rank found none (a collective).

    ``step`` is that of the last.pt this rank loaded; None when it loaded none.
    """
    seen = gather_to_all(rt, (socket.gethostname(), step))
    host0, step0 = seen[0]
    for rank, (host, s) in enumerate(seen):
        if s != step0:
            raise ConfigError(
                "out", f"one folder that every node mounts (a shared volume), so that all ranks resume from one"
                f" last.pt: rank 0 on {host0} finds {_found(step0)}", f"{out}, where rank {rank} on {host} finds {_found(s)}")


def launch_warnings(rt: Runtime, resume: bool, env: dict | None = None) -> list[str]:
    """What rank 0 should say about how torchrun started this run (nothing for a single process)."""
    env = os.environ if env is None else env
    warnings = []
    if rt.restarts and not resume:
        warnings.append(f"torchrun restarted the workers ({rt.restarts}) and --resume is not set: training starts"
                        " again from step 0; add --resume to continue from the run folder's last.pt")
    if rt.distributed and int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)) and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's rendezvous store outlives a restart and keeps the dead workers' addresses under the
        # keys the new ones use, so a restarted rank may dial a dead one (pytorch/pytorch#135712, #167288).
        warnings.append("torchrun --max-restarts shares its rendezvous store with the workers: after a restart a"
                        " rank may read a dead rank's address and fail again; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
                        " in torchrun's environment so that every restart gets a store of its own")
    return warnings


def _found(step: int | None) -> str:
    return "no last.pt" if step is None else f"last.pt of step {step}"
