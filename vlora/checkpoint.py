"""Step-numbered checkpoints in the run folder, published atomically, with a `latest` pointer and keep-last-k.

runs/NAME/step_00000100/
    adapter/adapter_config.json, adapter/adapter_model.safetensors   (PEFT's layout: loadable by plain peft)
    optimizer.rank00000.pt, ...   (engine ddp: AdamW state, sharded: rank r holds parameters r, r+world, ...)
    deepspeed/                    (engine deepspeed, instead: DeepSpeed's own shards of the trained weights and
                                   their optimizer state, one set per rank; nothing frozen)
    zero_to_fp32.py, ...          (engine deepspeed: DeepSpeed's scripts that consolidate deepspeed/ offline)
    train_state.json              (step, world size, engine, counters; written last)
    trained_state.rank00000.safetensors, ...  (engine deepspeed: vlora's own gathered copy of the trained weights
                                   and their AdamW moments, sharded over ranks: a resume on another world size)
    rank00000.json, ...           (each rank's data-stream position)
    rng.rank00000.safetensors     (each rank's torch / CUDA / numpy / python RNG states, as tensors and numbers:
                                   dropout resumes exactly)
    config.yaml                   (the resolved config of the run that wrote it)
runs/NAME/latest                  (the name of the newest complete folder)

A resume on another number of ranks or data workers (elastic) merges or re-partitions the engine's state, deals
the data stream's interrupted passes over the new readers (vlora/data/stream.py), and gives ranks that did not
exist fresh RNG states from (seed, step, rank).

How a save stays safe against a kill at any moment:
- it is assembled in `.tmp-step_X` and renamed into place in one step, then `latest` is replaced atomically, so a
  crash mid-save leaves the previous checkpoint as the one to resume from; leftovers of killed saves (of any step)
  are removed by the next save;
- a step already saved by this run (a pre-emption right after a periodic save, a resume that stops before its
  first step, a finished run resumed) is reused, not rewritten; a step_X that must be replaced (an earlier,
  abandoned attempt at that step) is moved aside to `.old-step_X` first and deleted only once `latest` names its
  replacement, so there is always a complete folder to resume from;
- `run.resume=auto` trusts `latest` only when it names a complete `step_*` folder of this run; otherwise it takes
  the newest complete checkpoint in the folder (and says so), or refuses in one line.

Nothing a resume reads runs code: JSON, safetensors, and torch files loaded with `weights_only=True` (a pickle
that names anything but tensors and plain containers is refused). DeepSpeed's own files (engine deepspeed) are
pickles that DeepSpeed unpickles in full: vlora first reads each of them with `weights_only=True` and a short list
of DeepSpeed's plain classes, and refuses the checkpoint if one names anything else.

The run folder must be on a file system that every rank sees (as for any multi-node checkpoint).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

from dataclasses import dataclass

import numpy as np
import torch

from vlora.distributed import World, barrier
from vlora.errors import VloraError
from vlora.failpoints import failpoint
from vlora.metrics import log

STEP_PREFIX = "step_"
STEP_NAME = re.compile(r"step_\d{8}")
ASIDE_PREFIX = ".old-"  # a published checkpoint moved aside while its replacement is renamed into place
TMP_PREFIX = ".tmp-"  # a checkpoint being assembled


DEEPSPEED_DIR = "deepspeed"  # engine deepspeed: DeepSpeed's own files in a checkpoint (its "tag")


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint records beside the weights and the engine's state.

    `step`, `skipped_samples` and `skipped_steps` are the same on every rank (train_state.json); `data` (this rank's
    stream position) and `rng` (this rank's RNG states) are per rank.
    """

    step: int = 0  # optimizer steps done
    skipped_samples: int = 0  # over data.max_length, all ranks together
    skipped_steps: int = 0  # non-finite or fp16-overflow steps whose update was not applied
    data: dict | list | None = None  # this rank's position, or every rank's (an elastic resume: load_checkpoint)
    rng: dict | None = None

    COUNTERS = ("step", "skipped_samples", "skipped_steps")

    def state_dict(self) -> dict:
        """The part every rank shares."""
        return {k: getattr(self, k) for k in self.COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        for k in self.COUNTERS:
            setattr(self, k, int(state.get(k, 0)))


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{STEP_PREFIX}{step:08d}"


def optimizer_file(folder: Path, rank: int) -> Path:
    """Engine ddp: this rank's share of the optimizer state."""
    return folder / f"optimizer.rank{rank:05d}.pt"


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank:05d}.json"


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng.rank{rank:05d}.safetensors"


# ---- RNG states as tensors and numbers (safetensors), never a pickle ----


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def fresh_rng_states(seed: int, step: int, rank: int) -> dict:
    """RNG states for a rank that the checkpoint has none for (it was written by fewer ranks): seeded by (seed,
    step, rank), so a resume on the same ranks draws the same again."""
    import hashlib

    value = int.from_bytes(hashlib.sha256(f"vlora-rng/{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1
    return {"torch": torch.Generator().manual_seed(value).get_state(),
            "numpy": np.random.RandomState(value % 2**32).get_state(), "python": random.Random(value).getstate(),
            "cuda": [], "cuda_seed": value}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    elif states.get("cuda_seed") is not None and torch.cuda.is_available():
        torch.cuda.manual_seed_all(states["cuda_seed"])


def save_rng_states(path: Path, states: dict) -> None:
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, cached_gaussian = states["numpy"]
    version, internal, gauss_next = states["python"]
    tensors = {"torch": states["torch"], "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "python_state": torch.tensor(internal, dtype=torch.int64)}
    tensors.update({f"cuda{i}": s for i, s in enumerate(states["cuda"])})
    numbers = {"numpy_kind": kind, "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss),
               "numpy_cached_gaussian": float(cached_gaussian), "python_version": version,
               "python_gauss_next": gauss_next, "cuda_devices": len(states["cuda"])}
    save_file(tensors, str(path), metadata={"vlora_rng": json.dumps(numbers)})


def load_rng_states(path: Path) -> dict:
    """The RNG states `save_rng_states` wrote; anything else (a pickle, a torn file, wrong shapes) is refused in one
    line."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            numbers = json.loads((f.metadata() or {})["vlora_rng"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        cuda = [tensors[f"cuda{i}"] for i in range(int(numbers["cuda_devices"]))]
        states = {
            "torch": tensors["torch"],
            "numpy": (str(numbers["numpy_kind"]), tensors["numpy_keys"].numpy().astype(np.uint32),
                      int(numbers["numpy_pos"]), int(numbers["numpy_has_gauss"]),
                      float(numbers["numpy_cached_gaussian"])),
            "python": (int(numbers["python_version"]), tuple(int(x) for x in tensors["python_state"].tolist()),
                       None if numbers["python_gauss_next"] is None else float(numbers["python_gauss_next"])),
            "cuda": cuda,
        }
        ok = (states["torch"].dtype == torch.uint8 and states["torch"].ndim == 1 and len(states["numpy"][1]) == 624
              and len(states["python"][1]) == 625 and all(c.dtype == torch.uint8 for c in cuda))
    except Exception as e:  # safetensors, JSON and key errors alike: the file is not what vlora wrote
        raise VloraError(f"checkpoint file {path} is not a vlora RNG state file ({_first_line(e)})") from None
    if not ok:
        raise VloraError(f"checkpoint file {path} holds RNG states of the wrong shape or type")
    return states


# ---- files a resume reads: plain formats only ----


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise VloraError(f"checkpoint file {path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise VloraError(f"checkpoint file {path} is not JSON ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise VloraError(f"checkpoint file {path} does not hold a JSON object")
    return value


def load_tensors(path: Path, map_location=None):
    """A torch file of tensors and plain containers (`weights_only=True`: no code runs); a pickle that names
    anything else is refused in one line."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise VloraError(f"checkpoint file {path} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise VloraError(f"checkpoint file {path} is not a plain tensor file; refused to unpickle it "
                         f"({_first_line(e)})") from None


def load_safetensors(path: Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise VloraError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # SafetensorError for anything that is not a safetensors file (a pickle included)
        raise VloraError(f"checkpoint file {path} is not a safetensors file ({_first_line(e)})") from None


# ---- which checkpoints a run folder holds ----


def is_complete(folder: Path) -> bool:
    """A folder that a finished save published: train_state.json (written last) and every rank's files."""
    try:
        state = json.loads((folder / "train_state.json").read_text())
        world_size = int(state["world_size"])
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (folder / "adapter" / "adapter_model.safetensors").is_file() and all(
        _rank_file(folder, r).is_file() and _rng_file(folder, r).is_file() for r in range(world_size))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints in the run folder, oldest first; at the same step a published `step_X` comes after
    (is preferred to) a `.old-step_X` that a killed save had moved aside."""
    found = []
    for path in run_dir.glob(f"*{STEP_PREFIX}*"):
        name = path.name.removeprefix(ASIDE_PREFIX)
        if STEP_NAME.fullmatch(name) and (path.name == name or path.name.startswith(ASIDE_PREFIX)) and \
                is_complete(path):
            found.append((name, path.name == name, path))
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, when it is a complete step_* folder of this run; else None."""
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = run_dir / name
    return path if STEP_NAME.fullmatch(name) and is_complete(path) else None


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the run's latest complete checkpoint (None in a folder that holds none and no `latest`); a path: that
    checkpoint folder; empty: none."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise VloraError(f"run.resume '{resume}' is not a checkpoint folder (no train_state.json)")
        return path
    pointer = run_dir / "latest"
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    if named is not None and not STEP_NAME.fullmatch(named):
        raise VloraError(f"{pointer} names '{named[:80]}', not a step_NNNNNNNN folder of this run: refused; "
                         "point it at one of the run's step_* folders or resume from a path (run.resume=PATH)")
    if named is not None and is_complete(run_dir / named):
        return run_dir / named
    complete = complete_checkpoints(run_dir)
    if named is None:
        if complete:  # killed between publishing a folder and writing `latest` for the first time
            log.warning("run.resume=auto: %s has no `latest`; resuming from %s, the newest complete checkpoint",
                        run_dir, complete[-1].name)
            return complete[-1]
        return None
    if not complete:
        raise VloraError(f"run.resume=auto: {pointer} names {named}, which is missing or incomplete, and {run_dir} "
                         "holds no other complete checkpoint; start afresh with run.overwrite=true (deletes the "
                         "folder) or another run.name")
    log.warning("run.resume=auto: %s names %s, which is missing or incomplete; resuming from %s, the newest "
                "complete checkpoint", pointer, named, complete[-1].name)
    return complete[-1]


# ---- save and load ----


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, state: TrainState, *, world: World, peft_model, engine, keep_last: int,
                    config_text: str = "", reuse: bool = False, preempted: bool = False) -> Path:
    """Collective: a checkpoint of `state` at `state.step`. Every rank writes its own
    files (its data position `state.data`, its RNG states as they are now, its share of the engine's state), rank 0
    the shared part (the adapter, the counters, the config); then rank 0 publishes the folder.

    `reuse`: this run already saved (or resumed from) this step; if that folder is complete it is kept as it is.
    `preempted`: rank 0 also writes runs/NAME/PREEMPTED (the step), before the save's last barrier, so no rank
    leaves the save before the marker exists.
    """
    step = state.step
    final = step_dir(run_dir, step)
    if reuse and is_complete(final):
        if world.is_main:
            if latest_checkpoint(run_dir) != final:
                _write_atomic(run_dir / "latest", final.name + "\n")
            _remove_leftovers(run_dir)
            _finish(run_dir, step, preempted)
        barrier()
        return final

    tmp = run_dir / f"{TMP_PREFIX}{final.name}"
    if world.is_main:
        for stale in run_dir.glob(f"{TMP_PREFIX}{STEP_PREFIX}*"):  # killed saves, of this step or any other
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    failpoint("save:begin", step)
    # Every rank writes its own files: the data position, the RNG states, and its share of the engine's state
    # (DDP: 1/world of the replicated optimizer state, so the checkpoint's write is spread out; DeepSpeed: its
    # shards).
    _rank_file(tmp, world.rank).write_text(json.dumps({"data": state.data}) + "\n")
    save_rng_states(_rng_file(tmp, world.rank), rng_states())
    engine_state = engine.save(tmp)
    engine.export_adapter(peft_model, tmp / "adapter")  # collective under ZeRO-3 (gathered to rank 0)
    failpoint("save:rank_files", step)
    barrier()
    if world.is_main:
        if config_text:
            (tmp / "config.yaml").write_text(config_text)
        shared = {**state.state_dict(), "world_size": world.size, **engine_state}
        (tmp / "train_state.json").write_text(json.dumps(shared, indent=2) + "\n")  # last: marks the folder whole
        failpoint("save:before_rename", step)
        aside = run_dir / f"{ASIDE_PREFIX}{final.name}"
        if final.exists():  # an abandoned attempt's step_X: kept (aside) until `latest` names its replacement
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        failpoint("save:after_rename", step)
        _write_atomic(run_dir / "latest", final.name + "\n")
        failpoint("save:after_latest", step)
        _remove_leftovers(run_dir)
        for old in sorted(run_dir.glob(f"{STEP_PREFIX}*"))[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        _finish(run_dir, step, preempted)
    barrier()
    return final


def _remove_leftovers(run_dir: Path) -> None:
    """Once `latest` names a complete folder: the folders of killed saves and those moved aside."""
    for old in [*run_dir.glob(f"{ASIDE_PREFIX}{STEP_PREFIX}*"), *run_dir.glob(f"{TMP_PREFIX}{STEP_PREFIX}*")]:
        shutil.rmtree(old, ignore_errors=True)


def _finish(run_dir: Path, step: int, preempted: bool) -> None:
    if preempted:
        _write_atomic(run_dir / "PREEMPTED", f"{step}\n")
    failpoint("save:end", step)


def load_checkpoint(path: Path, state: TrainState, *, world: World, peft_model, engine, data_workers: int = 1,
                    seed: int = 0) -> None:
    """Restore the trained weights and the engine's state (optimizer, grad scaler) in place, and `state`
    (counters, the data position and RNG states). The caller sets the RNG states just before the first step:
    building data loaders draws from them.

    On as many ranks, each with as many data readers (`data_workers`), as wrote the checkpoint, `state.data` is
    this rank's data position (an exact resume). Otherwise (an elastic resume) it is the list of every rank's, for
    the data stream to deal the rest of the interrupted passes over the new readers (vlora.data.stream); a rank
    that did not exist gets fresh RNG states from (seed, step, rank), and the engine re-partitions its state.
    """
    from peft import set_peft_model_state_dict

    shared = read_json(path / "train_state.json")
    saved_world = shared.get("world_size")
    if type(saved_world) is not int or saved_world < 1:
        raise VloraError(f"checkpoint {path / 'train_state.json'}: world_size is {saved_world!r}, not a count of ranks")
    saved_engine = shared.get("engine", "ddp")
    if saved_engine != engine.name:
        raise VloraError(
            f"checkpoint {path} was written by engine {saved_engine}, this run uses {engine.name}; resume with the "
            "same run.engine and ZeRO stage (or start a new run from its adapter with lora.init_from)"
        )
    # Every file is checked before anything is restored: a bad file fails the resume, not half of it.
    step = int(shared.get("step", 0))
    mine = world.rank < saved_world  # this rank wrote files of its own
    rng = load_rng_states(_rng_file(path, world.rank)) if mine else fresh_rng_states(seed, step, world.rank)
    data = read_json(_rank_file(path, world.rank)).get("data") if mine else None
    if saved_world != world.size or not isinstance(data, dict) or data.get("workers") != max(1, data_workers):
        data = [read_json(_rank_file(path, r)).get("data") for r in range(saved_world)]
    weights = load_safetensors(path / "adapter" / "adapter_model.safetensors",
                               device="cpu" if engine.restores_weights else str(world.device))
    if not engine.restores_weights:
        result = set_peft_model_state_dict(peft_model, weights)
        if result.unexpected_keys:
            raise VloraError(f"checkpoint {path}: adapter has keys this model lacks, e.g. {result.unexpected_keys[0]}")
    engine.load(path, shared)
    state.load_state_dict(shared)
    state.data, state.rng = data, rng
