"""Step-numbered checkpoints in the run folder, written atomically, with a `latest` pointer and keep-last-k.

runs/NAME/step_00000100/
    adapter/adapter_config.json, adapter/adapter_model.safetensors   (PEFT's layout: loadable by plain peft)
    optimizer.pt                                                      (AdamW state; identical on every DDP rank)
    train_state.json                                                  (step, world size, skipped-sample count)
    rank00000.json, rank00001.json, ...                               (each rank's data-stream position)
runs/NAME/latest                                                      (the name of the newest complete folder)

A checkpoint is assembled in a hidden temporary folder and renamed into place in one step, and `latest` is
replaced atomically after that, so a crash mid-save leaves the previous checkpoint as the one to resume from.
The run folder must be on a file system that every rank sees (as for any multi-node checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from vlora.distributed import World, barrier
from vlora.errors import VloraError
from vlora.model import save_adapter

STEP_PREFIX = "step_"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{STEP_PREFIX}{step:08d}"


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank:05d}.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, *, world: World, peft_model, optimizer, train_state: dict,
                    rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank writes its own state, rank 0 the shared part; then rank 0 publishes the folder."""
    final = step_dir(run_dir, step)
    tmp = run_dir / f".tmp-{final.name}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _rank_file(tmp, world.rank).write_text(json.dumps(rank_state) + "\n")
    barrier()
    if world.is_main:
        save_adapter(peft_model, tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {"step": step, "world_size": world.size, **train_state}
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(run_dir / "latest", final.name + "\n")
        for old in sorted(run_dir.glob(f"{STEP_PREFIX}*"))[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the run's latest checkpoint, if any; a path: that checkpoint folder; empty: none."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "train_state.json").is_file():
        raise VloraError(f"run.resume '{resume}' is not a checkpoint folder (no train_state.json)")
    return path


def load_checkpoint(path: Path, *, world: World, peft_model, optimizer) -> tuple[dict, dict]:
    """Restore adapter weights and optimizer state in place; return (train_state, this rank's state)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    train_state = json.loads((path / "train_state.json").read_text())
    if train_state["world_size"] != world.size:
        raise VloraError(
            f"checkpoint {path} was written by {train_state['world_size']} rank(s), this run has {world.size}; "
            "resume with the same number of processes (the data position is kept per rank)"
        )
    weights = load_file(path / "adapter" / "adapter_model.safetensors", device=str(world.device))
    result = set_peft_model_state_dict(peft_model, weights)
    if result.unexpected_keys:
        raise VloraError(f"checkpoint {path}: adapter has keys this model lacks, e.g. {result.unexpected_keys[0]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=world.device, weights_only=True))
    rank_state = json.loads(_rank_file(path, world.rank).read_text())
    return train_state, rank_state
