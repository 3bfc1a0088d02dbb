"""One typed config tree for a run: YAML file + `section.key=value` overrides, checked before any model loads.

Every field has a default and a comment; `resolve()` returns the config together with the batch arithmetic
(micro-steps per optimizer step) so that nothing downstream recomputes it. Mistakes the user can make here
(unknown keys, wrong types, paths that do not exist, a global batch that the world does not divide) raise
`VloraError` with one line that says what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from vlora.errors import VloraError


@dataclass
class ModelArgs:
    path: str = ".cache/tiny-qwen2.5-vl"  # local checkpoint folder or hub id of a Qwen2.5-VL model
    quant: str = "nf4"  # nf4 | fp4 | none: how the LLM's big linears are stored
    double_quant: bool = True  # quantize the 4-bit scales too (about 0.4 bit/param saved)
    compute_dtype: str = "auto"  # auto | fp32 | bf16 | fp16: dtype of 4-bit matmuls and unquantized weights
    attn_implementation: str = "sdpa"  # sdpa | eager
    gradient_checkpointing: bool = False  # recompute LLM layers in backward: less memory, about 30 % more time


@dataclass
class LoraArgs:
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05
    # Where adapters go: llm_attn (q/k/v/o), llm_mlp (gate/up/down), merger (vision-language projector).
    targets: list[str] = field(default_factory=lambda: ["llm_attn", "llm_mlp", "merger"])


@dataclass
class DataArgs:
    # Shard folders (manifest.json + *.tar, written by `vlora pack`), mixed by weight: "dir" or "dir:2,dir2:1".
    train: str = "shards/demo/train"
    val: str = "shards/demo/val"  # held-out shards; empty string = no evaluation
    min_pixels: int = 28 * 28 * 4  # images are resized so that h*w lies in [min_pixels, max_pixels]
    max_pixels: int = 28 * 28 * 256
    max_length: int = 2048  # tokens per sample, image tokens included; longer samples are skipped, counted
    open_shards: int = 4  # shards each data reader interleaves at random (the in-epoch shuffle)
    num_workers: int = 2  # data-loader processes per rank
    val_samples: int = 256  # at most this many held-out samples per evaluation
    pack_length: int = 0  # >0: pack several samples into rows of this many tokens (attention kept per sample)
    train_on: str = "assistant"  # assistant (loss on replies only) | all (user turns' text too; never images)


@dataclass
class OptimArgs:
    lr: float = 2e-4  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 10
    max_steps: int = 100  # optimizer steps
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    global_batch: int = 32  # samples per optimizer step over all ranks and micro-steps
    micro_batch: int = 4  # samples per forward pass on one rank


@dataclass
class RunArgs:
    name: str = "demo"
    out_dir: str = "runs"  # the run lives in out_dir/name
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    engine: str = "ddp"  # ddp (DeepSpeed comes later)
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only before and after training
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    overwrite: bool = False  # start afresh in a run folder that already holds a run (its contents are deleted)
    resume: str = ""  # "" = a new run | auto = continue from the run's latest checkpoint if any | a checkpoint folder
    trace_keys: bool = False  # write the sample keys each rank consumes per step (data-order checks)
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run (with a checkpoint)
    plot: bool = True  # write loss and lr against step as runs/NAME/curves.png at the end
    log_every: int = 1  # optimizer steps between log lines
    progress: bool = True  # tqdm bar on rank 0
    wandb: bool = False  # also log to wandb (offline unless WANDB_MODE says otherwise)
    param_digest: bool = False  # write a hash of the trainable weights per rank and step (replica checks)
    dist_timeout_s: int = 600  # a collective that waits longer than this ends the run


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


LORA_TARGETS = ("llm_attn", "llm_mlp", "merger")
CHOICES = {
    "model.quant": ("nf4", "fp4", "none"),
    "model.compute_dtype": ("auto", "fp32", "bf16", "fp16"),
    "model.attn_implementation": ("sdpa", "eager"),
    "run.precision": ("auto", "fp32", "bf16", "fp16"),
    "run.engine": ("ddp",),
    "data.train_on": ("assistant", "all"),
}


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or say which key got what."""
    origin = get_origin(hint)
    try:
        if origin is list:
            (item,) = get_args(hint)
            if isinstance(value, str):
                value = [v for v in re.split(r"[,\s]+", value) if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(key, v, item) for v in value]
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    name = getattr(hint, "__name__", str(hint))
    raise VloraError(f"config key '{key}' expects {name}, got {value!r}")


def _set(cfg: Config, key: str, value: Any) -> None:
    sections = _sections(cfg)
    section, _, name = key.partition(".")
    known = [f"{s}.{f.name}" for s, obj in sections.items() for f in dataclasses.fields(obj)]
    if section not in sections or not name or not hasattr(sections[section], name):
        hint = difflib.get_close_matches(key, known, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise VloraError(f"unknown config key '{key}'{suggestion}")
    obj = sections[section]
    setattr(obj, name, _coerce(key, value, get_type_hints(type(obj))[name]))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (nested sections), then `section.key=value` overrides, in that order."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise VloraError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise VloraError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise VloraError(f"config file {p} must hold a mapping of sections")
        for section, values in tree.items():
            if not isinstance(values, dict):
                raise VloraError(f"config file {p}: section '{section}' must be a mapping of keys")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise VloraError(f"override '{item}' must look like section.key=value")
        _set(cfg, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return cfg


def looks_like_hub_id(path: str) -> bool:
    """`owner/name` with no local meaning: the only form that may be fetched from a hub instead of disk."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path)) and not Path(path).exists()


@dataclass(frozen=True)
class Plan:
    """What the config implies for this world size: derived once, used everywhere."""

    grad_accum: int  # micro-steps per optimizer step on each rank


def validate(cfg: Config, world_size: int = 1) -> Plan:
    """Check everything that can be checked without a model; return the batch arithmetic."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise VloraError(f"config key '{key}' is '{value}'; choose one of {', '.join(allowed)}")
    for target in cfg.lora.targets:
        if target not in LORA_TARGETS:
            raise VloraError(f"lora.targets has '{target}'; choose from {', '.join(LORA_TARGETS)}")
    if not cfg.lora.targets:
        raise VloraError("lora.targets is empty: nothing would train")
    positive = {
        "lora.r": cfg.lora.r, "optim.max_steps": cfg.optim.max_steps, "optim.global_batch": cfg.optim.global_batch,
        "optim.micro_batch": cfg.optim.micro_batch, "data.max_length": cfg.data.max_length,
        "data.min_pixels": cfg.data.min_pixels, "run.log_every": cfg.run.log_every,
        "run.keep_last": cfg.run.keep_last, "run.dist_timeout_s": cfg.run.dist_timeout_s,
        "data.open_shards": cfg.data.open_shards, "run.max_bad_steps": cfg.run.max_bad_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise VloraError(f"config key '{key}' must be positive, got {value}")
    non_negative = {
        "optim.warmup_steps": cfg.optim.warmup_steps, "optim.grad_clip": cfg.optim.grad_clip,
        "optim.weight_decay": cfg.optim.weight_decay, "data.num_workers": cfg.data.num_workers,
        "data.pack_length": cfg.data.pack_length, "lora.dropout": cfg.lora.dropout,
        "run.eval_every": cfg.run.eval_every, "run.save_every": cfg.run.save_every,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise VloraError(f"config key '{key}' must be >= 0, got {value}")
    if cfg.optim.lr <= 0:
        raise VloraError(f"config key 'optim.lr' must be positive, got {cfg.optim.lr}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise VloraError(f"config key 'optim.min_lr_ratio' must lie in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.data.max_pixels < cfg.data.min_pixels:
        raise VloraError(f"data.max_pixels ({cfg.data.max_pixels}) is below data.min_pixels ({cfg.data.min_pixels})")
    if cfg.optim.warmup_steps > cfg.optim.max_steps:
        raise VloraError(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) exceeds optim.max_steps ({cfg.optim.max_steps})"
        )
    per_pass = cfg.optim.micro_batch * world_size
    if cfg.optim.global_batch % per_pass:
        raise VloraError(
            f"optim.global_batch={cfg.optim.global_batch} is not divisible by optim.micro_batch x world size "
            f"= {cfg.optim.micro_batch} x {world_size} = {per_pass}; pick a global batch that is a multiple of {per_pass}"
        )
    model_path = cfg.model.path
    if not Path(model_path).exists() and not looks_like_hub_id(model_path):
        raise VloraError(f"model.path '{model_path}' does not exist (a local folder or an owner/name hub id)")
    from vlora.data.manifest import read_manifest
    from vlora.data.stream import check_sources

    # Manifests are read now, so a missing or damaged shard is named here, not in a data worker later.
    check_sources(cfg.data.train, world_size, cfg.data.num_workers)  # "dir:weight,..." parsed, each folder checked
    if cfg.data.val:
        if not Path(cfg.data.val).is_dir():
            raise VloraError(f"data.val shard folder '{cfg.data.val}' does not exist; run `make shards` or `vlora pack`")
        read_manifest(cfg.data.val)
    run_dir = cfg.run_dir
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (cfg.run.overwrite or cfg.run.resume):
        raise VloraError(f"run folder {run_dir} already holds a run; set run.resume=auto to continue it, "
                         "run.overwrite=true to start afresh, or choose another run.name")
    if cfg.run.overwrite and cfg.run.resume:
        raise VloraError("run.overwrite=true would delete the checkpoint that run.resume asks for; set only one")
    return Plan(grad_accum=cfg.optim.global_batch // per_pass)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(obj) for name, obj in _sections(cfg).items()}


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
