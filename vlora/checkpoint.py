"""Step-numbered checkpoints in the run folder, written atomically, with a `latest` pointer and keep-last-k.

runs/NAME/step_00000100/
    adapter/adapter_config.json, adapter/adapter_model.safetensors   (PEFT's layout: loadable by plain peft)
    optimizer.rank00000.pt, ...   (engine ddp: AdamW state, sharded: rank r holds parameters r, r+world, ...)
    deepspeed/                    (engine deepspeed, instead: DeepSpeed's own shards of the trained weights and
                                   their optimizer state, one set per rank; nothing frozen)
    zero_to_fp32.py, ...          (engine deepspeed: DeepSpeed's scripts that consolidate deepspeed/ offline)
    train_state.json              (step, world size, engine, counters)
    rank00000.json, ...           (each rank's data-stream position)
    rng.rank00000.pt, ...         (each rank's torch / CUDA / numpy / python RNG states: dropout resumes exactly)
    config.yaml                   (the resolved config of the run that wrote it)
runs/NAME/latest                                                      (the name of the newest complete folder)

A checkpoint is assembled in a hidden temporary folder and renamed into place in one step, and `latest` is
replaced atomically after that, so a crash mid-save leaves the previous checkpoint as the one to resume from.
The run folder must be on a file system that every rank sees (as for any multi-node checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import time
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


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng.rank{rank:05d}.pt"


def rng_states() -> dict:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, *, world: World, peft_model, engine=None, optimizer=None,
                    train_state: dict, rank_state: dict, keep_last: int, config_text: str = "") -> Path:
    """Collective: every rank writes its own state, rank 0 the shared part; then rank 0 publishes the folder.

    `engine` (vlora.engine) saves what it owns; a bare `optimizer` instead is saved as the DDP engine would.
    """
    from vlora.engine import Engine

    if engine is None:
        engine = Engine.for_optimizer(optimizer, world)
    final = step_dir(run_dir, step)
    tmp = run_dir / f".tmp-{final.name}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    # Every rank writes its own files: the data position, the RNG states, and its share of the engine's state
    # (DDP: 1/world of the replicated optimizer state, so the checkpoint's write is spread out; DeepSpeed: its
    # shards).
    _rank_file(tmp, world.rank).write_text(json.dumps(rank_state) + "\n")
    torch.save(rng_states(), _rng_file(tmp, world.rank))
    engine_state = engine.save(tmp)
    adapter_state = engine.adapter_state(peft_model)  # collective under ZeRO-3 (gathered to rank 0), else None
    barrier()
    if world.is_main:
        # Tests set this to hold a save open long enough to kill it half-way; it is 0 (no pause) otherwise.
        time.sleep(float(os.environ.get("VLORA_DEBUG_SAVE_PAUSE", "0")))
        if adapter_state is None:
            save_adapter(peft_model, tmp / "adapter")
        else:
            save_adapter(peft_model, tmp / "adapter", state_dict=adapter_state)
        if config_text:
            (tmp / "config.yaml").write_text(config_text)
        state = {"step": step, "world_size": world.size, **engine_state, **train_state}
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


def load_checkpoint(path: Path, *, world: World, peft_model, engine) -> tuple[dict, dict, dict]:
    """Restore the trained weights and the engine's state (optimizer, grad scaler) in place; return (train_state,
    this rank's data state, its RNG states). The caller sets the RNG states just before the first step: building
    data loaders draws from them."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    train_state = json.loads((path / "train_state.json").read_text())
    if train_state["world_size"] != world.size:
        raise VloraError(
            f"checkpoint {path} was written by {train_state['world_size']} rank(s), this run has {world.size}; "
            "resume with the same number of processes (the data position is kept per rank)"
        )
    saved_engine = train_state.get("engine", "ddp")
    if saved_engine != engine.name:
        raise VloraError(
            f"checkpoint {path} was written by engine {saved_engine}, this run uses {engine.name}; resume with the "
            "same run.engine and ZeRO stage (or start a new run from its adapter with lora.init_from)"
        )
    if not engine.restores_weights:
        weights = load_file(path / "adapter" / "adapter_model.safetensors", device=str(world.device))
        result = set_peft_model_state_dict(peft_model, weights)
        if result.unexpected_keys:
            raise VloraError(f"checkpoint {path}: adapter has keys this model lacks, e.g. {result.unexpected_keys[0]}")
    engine.load(path, train_state)
    rng = torch.load(_rng_file(path, world.rank), weights_only=False)
    rank_state = json.loads(_rank_file(path, world.rank).read_text())
    return train_state, rank_state, rng
