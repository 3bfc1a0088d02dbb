"""Rank-aware logging: a log line and a progress bar on rank 0, metrics.jsonl in the run folder, optional wandb.

Other ranks get the same object with every output switched off, so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("vlora")


def setup_logging(rank: int, world_size: int) -> None:
    """Rank 0 logs INFO; other ranks only warnings, each line tagged with its rank so a grep finds who said it."""
    tag = f"[rank {rank}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class Metrics:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, progress: bool, wandb_config: dict | None):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.bar = None
        # A bar only where someone watches it: in a log file (Slurm, CI) it is noise; the log lines carry the facts.
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        self.wandb = None
        if enabled and wandb_config is not None:
            import os

            import wandb

            # Offline unless the user says otherwise: a run never blocks on a login or the network.
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(dir=str(run_dir), name=run_dir.name, config=wandb_config)
        self.started = time.perf_counter()

    def write(self, record: dict) -> None:
        """One JSON line per record: the file anyone can grep or plot."""
        if not self.enabled:
            return
        record = {"time": round(time.perf_counter() - self.started, 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def tick(self) -> None:
        """One optimizer step done: advance the progress bar."""
        if self.bar is not None:
            self.bar.update(1)

    def step(self, record: dict) -> None:
        """A training step's record: written, shown on the progress bar and as a log line."""
        if not self.enabled:
            return
        self.write(record)
        line = (
            f"step {record['step']:>5} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad_norm {record['grad_norm']:.3f} | tok/s {record['tokens_per_s']:,.0f} | "
            f"peak_mem {record['peak_mem_gib']:.2f} GiB"
        )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}")
            self.bar.write(line, file=sys.stderr)
        else:
            log.info(line)

    def info(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
