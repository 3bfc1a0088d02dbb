"""Preflight: every check of a run that reads files or asks another module, once, before any model loads or process
group forms.

`preflight(cfg, world_size)` runs `vlora.config.validate` (the values alone), then checks what the values point at:
lora.init_from (an adapter folder), model.path (a local folder or an owner/name hub id), the shard folders and
their manifests (read now, so a missing or damaged shard is named here and not in a data worker later; enough
shards for every reader; images packed for data.max_pixels), the run folder (a used one needs run.resume or
run.overwrite), the DeepSpeed JSON (read and checked against optim.*). It returns the `Plan`. Each failure is a
`VloraError` of one line. Last it estimates the GPU memory the run needs (vlora.memory, from the model's
config.json alone, no weights) and logs a warning, not an error, when that exceeds the memory of the GPU it finds;
without CUDA, or without a config.json to read, it skips that.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vlora.config import Config, DataArgs, Plan, looks_like_hub_id, validate
from vlora.errors import VloraError
from vlora.memory import GiB, MemoryEstimate, ModelShape, estimate, read_shape

log = logging.getLogger("vlora")


def preflight(cfg: Config, world_size: int = 1) -> Plan:
    """All checks of `cfg` for a world of `world_size` ranks before anything loads; returns the batch arithmetic."""
    plan = validate(cfg, world_size)
    check_init_adapter(cfg)
    check_model_path(cfg)
    check_data(cfg, world_size)
    check_run_folder(cfg)
    ds_config = None
    if cfg.run.engine == "deepspeed":
        from vlora.engine import deepspeed_config

        ds_config = deepspeed_config(cfg, plan, world_size)  # the JSON is read and checked now, not after loading
    warn_if_too_big(cfg, world_size, ds_config)
    return plan


def check_init_adapter(cfg: Config) -> None:
    """lora.init_from, when set, is an adapter folder in PEFT's layout."""
    if not cfg.lora.init_from:
        return
    folder = Path(cfg.lora.init_from)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise VloraError(f"lora.init_from '{cfg.lora.init_from}' is not an adapter folder (no {name}); "
                             "give a run's adapter/ or a checkpoint's step_*/adapter/ folder")


def check_model_path(cfg: Config) -> None:
    """model.path exists, or is an owner/name hub id (resolved, or refused, when the model loads)."""
    path = cfg.model.path
    if not Path(path).exists() and not looks_like_hub_id(path):
        raise VloraError(f"model.path '{path}' does not exist (a local folder or an owner/name hub id)")


def check_data(cfg: Config, world_size: int) -> None:
    """data.train's folders ("dir" or "dir:weight,...") and data.val: present, manifests readable, enough shards for
    world_size ranks x data.num_workers readers, images packed for this data.max_pixels."""
    from vlora.data.manifest import read_manifest
    from vlora.data.remote import is_remote
    from vlora.data.stream import check_sources

    sources = check_sources(cfg.data.train, world_size, cfg.data.num_workers)
    folders = [folder for folder, _ in sources]
    if cfg.data.val:
        if not is_remote(cfg.data.val) and not Path(cfg.data.val).is_dir():
            raise VloraError(f"data.val shard folder '{cfg.data.val}' does not exist; run `make shards` or `vlora pack`")
        folders.append(cfg.data.val)
    factor = resize_factor(cfg.model.path)
    for folder in folders:
        checks = read_manifest(folder).get("checks", {})
        check_packed_pixels(cfg.data, folder, checks, factor)
        if cfg.data.boxes == "original" and checks.get("boxes") == "as_written":
            raise VloraError(f"{folder} was packed with --boxes as_written (boxes left as written, not checked against "
                             "the images), but data.boxes=original would convert them from image pixels; set "
                             "data.boxes=as_written, or repack without --boxes if they are in image pixels")


def resize_factor(model_path: str) -> int:
    """Pixels per image token along a side for model.path's family; Qwen2.5-VL's 28 when its config cannot be read
    here (a hub id not yet downloaded; loading the model names any other problem)."""
    from vlora import families

    try:
        return families.of_model_path(model_path).resize_factor
    except VloraError:
        return 28


def check_packed_pixels(data: DataArgs, folder: str, checks: dict, factor: int = 28) -> None:
    """data.max_pixels must not be below what `vlora pack` made sure every image of `folder` resizes under.

    Only max_pixels can break a resize (a narrow image shrunk to a zero side in a data worker); min_pixels only
    ever enlarges. The manifest's max_pixels_floor is the smallest safe value for its images at each resize factor;
    an older pack's single number, or a still older pack's max_pixels, was checked at 28 px per token only, which
    says nothing of a family at 32 (a repack is asked for).
    """
    floor = checks.get("max_pixels_floor")
    if isinstance(floor, dict):
        floor = floor.get(str(factor), max(floor.values(), default=0))
    elif factor != 28 and (isinstance(floor, int) or isinstance(checks.get("max_pixels"), int)):
        raise VloraError(f"{folder} was packed by an older vlora, which checked its images at 28 pixels per image "
                         f"token only; this model has {factor}: repack it with this vlora (`vlora pack`)")
    if isinstance(floor, int):
        if data.max_pixels < floor:
            raise VloraError(f"data.max_pixels={data.max_pixels} is below {floor}, the least that every image in {folder} "
                             "resizes under without a zero side (its narrowest image); raise data.max_pixels to "
                             f"{floor} or repack with `vlora pack --max-pixels {data.max_pixels}`, which rejects those images")
    elif isinstance(checks.get("max_pixels"), int) and data.max_pixels < checks["max_pixels"]:
        raise VloraError(f"data.max_pixels={data.max_pixels} is below max_pixels={checks['max_pixels']}, which {folder} was "
                         "packed (its images checked) with, so a narrow image may resize to a zero side in a data worker; "
                         f"set data.max_pixels >= {checks['max_pixels']} or repack with this vlora (or with --max-pixels "
                         f"{data.max_pixels})")


def check_run_folder(cfg: Config) -> None:
    """A run folder that already holds a run is continued (run.resume) or replaced (run.overwrite), never mixed."""
    run_dir = cfg.run_dir
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (cfg.run.overwrite or cfg.run.resume):
        raise VloraError(f"run folder {run_dir} already holds a run; set run.resume=auto to continue it, "
                         "run.overwrite=true to start afresh, or choose another run.name")


# ---------------------------------------------------------------------------------------------------------------
# Memory


def model_shape(cfg: Config) -> ModelShape | None:
    """The architecture in model.path's config.json: a local folder's, or a hub id's already in the local Hugging
    Face cache (nothing is downloaded). None when there is none, or it is no family vlora knows (loading the
    model names that problem)."""
    path = Path(cfg.model.path)
    if path.is_dir():
        file = path / "config.json"
    elif looks_like_hub_id(cfg.model.path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(cfg.model.path, "config.json")
        except Exception:  # an odd cache is no reason to stop a run before it starts
            return None
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    else:
        return None
    if not file.is_file():
        return None
    try:
        return read_shape(file)
    except VloraError as e:
        log.debug("no memory estimate: %s", e)
        return None


def estimate_run_memory(cfg: Config, world_size: int, ds_config: dict | None = None,
                        shape: ModelShape | None = None) -> MemoryEstimate | None:
    """vlora.memory.estimate for this run: ZeRO stage and offload from `ds_config` (the merged DeepSpeed config,
    vlora.engine.deepspeed_config; None for DDP), the shape from model.path's config.json unless given."""
    shape = shape or model_shape(cfg)
    if shape is None:
        return None
    if ds_config is None:
        return estimate(shape, cfg, world_size=world_size)
    zero = ds_config.get("zero_optimization", {})
    offloaded = lambda key: zero.get(key, {}).get("device", "none") not in ("none", None)  # noqa: E731
    return estimate(shape, cfg, world_size=world_size, zero_stage=int(zero.get("stage", 0)),
                    offload_optimizer=offloaded("offload_optimizer"), offload_params=offloaded("offload_param"))


def gpu_memory() -> int | None:
    """Total memory of this rank's GPU (LOCAL_RANK's), in bytes; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.cuda.get_device_properties(index).total_memory


def warn_if_too_big(cfg: Config, world_size: int, ds_config: dict | None = None,
                    available: int | None = None) -> MemoryEstimate | None:
    """Log a warning (rank 0 only) when the run's estimate exceeds `available` bytes (default: the GPU's memory).
    Returns the estimate, or None when there is no GPU or no config.json to estimate from."""
    available = gpu_memory() if available is None else available
    if available is None:
        return None
    est = estimate_run_memory(cfg, world_size, ds_config)
    if est is None:
        return None
    if est.total > available and int(os.environ.get("RANK", "0")) == 0:
        log.warning("vlora: warning: this run may not fit the GPU's %.1f GiB: estimated %s. Turn on "
                    "model.gradient_checkpointing, lower optim.micro_batch or data.max_length, or shard with "
                    "run.engine=deepspeed (ZeRO-3 divides the weights over the GPUs)", available / GiB, est.summary())
    return est
