"""Rank-aware logging: a log line and a progress bar on rank 0, metrics.jsonl in the run folder, optional wandb,
and `plot_curves` (loss and lr against step as runs/NAME/curves.png).

Other ranks get the same object with every output switched off, so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import json
import logging
import math
import os
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
        self.file = None
        if enabled:
            path = run_dir / "metrics.jsonl"
            # A run killed mid-write leaves a partial last line; a resumed run appends on a line of its own.
            torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
            self.file = open(path, "a")
            if torn:
                self.file.write("\n")
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
        """Idempotent: the end of a run closes it before plotting, and the run's exit stack again."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl, in file order, and the number of lines that are not JSON objects
    (a run killed while writing leaves a torn line)."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _curves(records: list[dict]) -> tuple[dict, dict, dict, list[int], dict]:
    """Step -> value for training loss, held-out loss and lr, the steps where a resumed segment begins, and step ->
    held-out exact match (run.eval_generate; empty without it).

    A resumed run appends to the same file. It starts where its checkpoint was, so whatever the killed run
    logged from that step on is dropped: each curve shows the history of the run that went on. A new segment
    shows as a clock that goes back (`time` counts from each process's start) or a training step that does
    not advance.
    """
    loss, val, lr, resumes, em = {}, {}, {}, [], {}
    last_step, last_time = None, None
    for r in records:
        step, t = r["step"], r.get("time")
        clock_back = isinstance(t, (int, float)) and last_time is not None and t < last_time
        step_back = "loss" in r and last_step is not None and step <= last_step
        if clock_back or step_back:
            resumes.append(step)
            for curve in (loss, val, lr, em):
                for s in [s for s in curve if s >= step]:
                    del curve[s]
        if isinstance(t, (int, float)):
            last_time = t
        if "loss" in r:
            last_step = step
            loss[step] = r["loss"]
            if "lr" in r:
                lr[step] = r["lr"]
        if "val_loss" in r:
            val[step] = r["val_loss"]
        if "val_exact_match" in r:
            em[step] = r["val_exact_match"]
    return loss, val, lr, resumes, em


def plot_curves(run_dir: Path | str) -> Path | None:
    """Write run_dir/curves.png from run_dir/metrics.jsonl: training and held-out loss against step above,
    the learning rate below. Returns the PNG's path, or None (with a log line saying why) when matplotlib is
    not installed or there is nothing to plot. Non-finite losses show as gaps."""
    run_dir = Path(run_dir)
    source = run_dir / "metrics.jsonl"
    if not source.is_file():
        log.warning("no loss plot: %s does not exist", source)
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("no loss plot: matplotlib is not installed (pip install matplotlib)")
        return None
    records, bad = read_metrics(source)
    if bad:
        log.warning("%s: %d line(s) that are not metrics records were ignored", source, bad)
    loss, val, lr, resumes, em = _curves(records)
    if not loss and not val:
        log.warning("no loss plot: %s holds no loss records yet", source)
        return None

    # The object API with an explicit Agg canvas: no pyplot, no global backend switch, no display needed.
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    if loss:
        steps = sorted(loss)
        ax_loss.plot(steps, [loss[s] for s in steps], label="training loss", color="tab:blue", lw=1.2)
    if val:
        steps = sorted(val)
        ax_loss.plot(steps, [val[s] for s in steps], label="held-out loss", color="tab:orange", lw=1.5,
                     marker="o", ms=3)
    for i, step in enumerate(resumes):
        for ax in (ax_loss, ax_lr):
            ax.axvline(step, color="grey", ls=":", lw=0.8, label="resumed" if (i == 0 and ax is ax_loss) else None)
    finite = [v for v in (*loss.values(), *val.values()) if isinstance(v, (int, float)) and math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (per supervised token)")
    ax_loss.set_title(run_dir.name)
    ax_loss.grid(alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    if em:  # on its own axis at the right: a percentage beside per-token losses
        ax_em = ax_loss.twinx()
        steps = sorted(em)
        line = ax_em.plot(steps, [em[s] for s in steps], label="held-out exact match (%)", color="tab:red", lw=1.5,
                          marker="s", ms=3)
        ax_em.set_ylim(0, 100)
        ax_em.set_ylabel("exact match (%)")
        handles, labels = handles + line, labels + ["held-out exact match (%)"]
    ax_loss.legend(handles, labels, loc="upper right")
    if lr:
        steps = sorted(lr)
        ax_lr.plot(steps, [lr[s] for s in steps], color="tab:green", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(alpha=0.3)

    out = run_dir / "curves.png"
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")  # then renamed: a viewer never sees a half-written file
    os.replace(tmp, out)
    return out
