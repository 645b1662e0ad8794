"""Where a run executes: the device, CPU threads, and the process group under torchrun.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE (and, after an
elastic restart, TORCHELASTIC_RESTART_COUNT); without them the run is a single
process and none of the collectives below do anything.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass
class Runtime:
    device: torch.device  # where the model and batches live
    rank: int  # this process's index under torchrun; 0 alone
    world: int  # processes under torchrun, on all nodes; 1 alone
    bf16: bool = False  # matrix math under bfloat16 autocast (weights and optimizer stay float32)
    local_rank: int = 0  # this process's index on its own node
    restarts: int = 0  # times torchrun has restarted the workers of this launch (--max-restarts)

    def autocast(self):
        """The context each forward pass runs in."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def cpu_has_bf16_units() -> bool:
    """AMX or AVX-512 BF16: there bfloat16 LSTM steps run about 3x faster than float32 (oneDNN)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def start_runtime(device: str, threads: int = 0, precision: str = "auto") -> Runtime:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "auto or cpu on this machine (torch sees no CUDA device)", device)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        if threads:
            torch.set_num_threads(threads)
        elif local_world > 1:  # the ranks on one machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        torch.set_flush_denormal(True)  # denormal floats are very slow on x86 and change no result that matters
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    bf16 = precision == "bf16" or (precision == "auto" and (use_cuda or cpu_has_bf16_units()))
    return Runtime(dev, rank, world, bf16, local_rank, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))


def stop_runtime(rt: Runtime, finished: bool = False) -> None:
    """Tears the process group down. ``finished``: the run ended normally on this rank, and every rank reaches
    this point before any tears down; a rank whose peers already left can abort in gloo's shutdown
    ("terminate called without an active exception"), which torchrun counts a failure. After an error no rank
    waits for the others, which may be gone."""
    if rt.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def any_rank(rt: Runtime, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a stop decision all ranks must share)."""
    if not rt.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_main(rt: Runtime, obj):
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); ``[obj]`` alone."""
    if not rt.distributed:
        return [obj]
    out = [None] * rt.world if rt.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_to_all(rt: Runtime, obj) -> list:
    """Every rank's ``obj`` as a list, on every rank; ``[obj]`` alone."""
    if not rt.distributed:
        return [obj]
    out = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def in_turn(rt: Runtime, work):
    """Runs ``work()`` on rank 0; then on the first rank of every other node; then on the remaining ranks.

    Each group starts once the one before has finished, so a file that ``work`` writes into a
    folder is written once per folder: by rank 0 into a folder every node shares, or by the first
    rank of each node into a folder of the node's own; later ranks find it finished.
    """
    if not rt.distributed:
        return work()
    turn = 0 if rt.is_main else 1 if rt.local_rank == 0 else 2
    result = None
    for group in range(3):
        if group == turn:
            result = work()
        dist.barrier()
    return result


def broadcast_from_main(rt: Runtime, obj):
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
