"""Process-group set-up for torchrun (and Slurm through torchrun): who am I, which device, how to talk.

NCCL on GPUs, gloo on the CPU. A single process (plain `python train.py`) is a world of one and never
initialises a process group, so every helper here also works without one.
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: int = 600) -> World:
    """Read torchrun's environment, pick the device, and join the process group when there is more than one rank."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    size = world_size_from_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return World(rank=rank, local_rank=local_rank, size=size, device=device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; a no-op in a world of one."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class PreemptionSignal:
    """Remembers that SIGTERM or SIGUSR1 arrived (Slurm's pre-emption warning, torchrun forwarding a stop).

    The handler only sets a flag: the loop finishes the step it is in, agrees with the other ranks (one of them
    may have been signalled first), saves and exits. A second signal of the same kind is not special.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def restore(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
