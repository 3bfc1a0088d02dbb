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


def init_distributed(timeout_s: int = 600, always_group: bool = False) -> World:
    """Read torchrun's environment, pick the device, and join the process group when there is more than one rank
    (or always, with `always_group`: DeepSpeed needs a group also in a world of one).

    `timeout_s` (run.dist_timeout_s) bounds every collective: one that waits longer raises on the waiting ranks.
    """
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    size = world_size_from_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (size > 1 or always_group) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Alone and not started by torchrun: a private rendezvous on a free local port.
        alone = {} if "MASTER_ADDR" in os.environ else {
            "init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": rank, "world_size": size}
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
            **alone,
        )
    return World(rank=rank, local_rank=local_rank, size=size, device=device)


def cpu_threads(cpus: int, local_ranks: int, data_workers: int) -> int:
    """Intra-op threads for one rank on the CPU: its share of the cores, less one per data worker of its own."""
    return max(1, cpus // max(1, local_ranks) - data_workers)


def limit_cpu_threads(device: torch.device, data_workers: int) -> int | None:
    """On the CPU, give torch only the cores the data workers leave free, unless OMP_NUM_THREADS says otherwise.

    torch's default is one thread per core, and its parallel ops wait for the slowest thread: with a data worker
    busy on one of those cores every op stalls (measured on 2 cores, 1 worker: a demo step takes 0.33 s with 2
    threads, 0.17 s with 1). Returns the thread count set, or None where nothing was changed.
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cpu_threads(cpus, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), data_workers)
    torch.set_num_threads(threads)
    return threads


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; a no-op in a world of one."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks; a no-op in a world of one."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
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


class Heartbeat:
    """Each rank's newest step, in the process group's key-value store (torchrun's agent hosts it, so it outlives
    any one rank): when a collective times out, the ranks that never got as far can be named.

    One small store write per rank and step; nothing without a process group.
    """

    def __init__(self, world: World):
        self.world = world
        self.store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None

    def _key(self, rank: int) -> str:
        return f"vlora/heartbeat/rank{rank}"

    def beat(self, step: int) -> None:
        """This rank has its data for `step` and enters the step's collectives."""
        if self.store is not None:
            self.store.set(self._key(self.world.rank), str(step))

    def behind(self, step: int) -> dict[int, int]:
        """{rank: newest step it entered} for every rank that has not entered `step` (0: not even the first)."""
        if self.store is None:
            return {}
        late = {}
        for rank in range(self.world.size):
            key = self._key(rank)
            last = int(self.store.get(key)) if self.store.check([key]) else 0
            if last < step:
                late[rank] = last
        return late


# What gloo (and NCCL, where the error reaches Python) say when a collective waited too long or lost a peer.
_TIMEOUT_MARKERS = ("timed out", "timeout")
_LOST_PEER_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe")


def collective_failure(err: BaseException, *, step: int, timeout_s: int, heartbeat: Heartbeat) -> str | None:
    """One line for a collective that timed out or lost a peer during `step`, naming the ranks that did not get as
    far (the stalled or dead ones); None when `err` is something else."""
    text = str(err).lower()
    timed_out = any(m in text for m in _TIMEOUT_MARKERS)
    if not isinstance(err, RuntimeError) or not (timed_out or any(m in text for m in _LOST_PEER_MARKERS)):
        return None
    if timed_out:
        what = f"collective at step {step} timed out after {timeout_s} s (run.dist_timeout_s)"
    else:
        what = f"collective at step {step} lost a peer ({str(err).strip().splitlines()[0][-160:]})"
    try:
        late = heartbeat.behind(step)
    except Exception:  # the store itself may be gone with the job
        return f"{what}; the other ranks' progress is unknown"
    if not late:
        return f"{what}; every rank entered step {step}, so one stopped inside it (see the other ranks' logs)"
    named = ", ".join(f"rank {r} (last entered step {s})" if s else f"rank {r} (never entered a step)"
                      for r, s in sorted(late.items()))
    return f"{what}; stopped answering: {named}"
