"""Step-numbered checkpoints in the run folder, written atomically, with a `latest` pointer and keep-last-k.

runs/NAME/step_00000100/
    adapter/adapter_config.json, adapter/adapter_model.safetensors   (PEFT's layout: loadable by plain peft)
    optimizer.pt                                                      (AdamW state; identical on every DDP rank)
    train_state.json                                                  (step, skipped-sample count)
runs/NAME/latest                                                      (the name of the newest complete folder)

A checkpoint is assembled in a hidden temporary folder and renamed into place in one step, and `latest` is
replaced atomically after that, so a crash mid-save leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from vlora.model import save_adapter

STEP_PREFIX = "step_"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{STEP_PREFIX}{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, peft_model, optimizer, train_state: dict, keep_last: int) -> Path:
    """Rank 0 only: write step `step` and point `latest` at it; prune all but the newest `keep_last`."""
    final = step_dir(run_dir, step)
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(peft_model, tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "train_state.json").write_text(json.dumps({"step": step, **train_state}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(run_dir / "latest", final.name + "\n")
    for old in sorted(run_dir.glob(f"{STEP_PREFIX}*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    return path if path.is_dir() else None
