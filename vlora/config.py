"""One typed config tree for a run: YAML file + `section.key=value` overrides, with the value checks and the batch
arithmetic. A leaf: it imports nothing of vlora but vlora.errors.

`load_config(path, overrides)` gives the `Config` (defaults, then the file, then the overrides); every field has a
default and a comment. `validate(cfg, world_size)` checks the values alone (types, choices, ranges, which LoRA group
goes with which freeze switch, a global batch the world divides) and returns the `Plan`: the batch arithmetic
(micro-steps per optimizer step), derived once so that nothing downstream recomputes it. It reads no file.
What needs the file system or another module (the model folder, the shard folders and their manifests, the run
folder, an adapter to start from, the DeepSpeed JSON, the memory a run needs) is `vlora.preflight.preflight`,
which runs `validate` first. Every mistake raises `VloraError` with one line that says what to change.
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
    # local checkpoint folder or hub id of a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 model (its config.json
    # says which family: vlora/families)
    path: str = ".cache/tiny-qwen2.5-vl"
    quant: str = "nf4"  # nf4 | fp4 | none: how the LLM's big linears are stored (none = compute_dtype, plain LoRA)
    double_quant: bool = True  # quantize the 4-bit scales too (about 0.4 bit/param saved)
    compute_dtype: str = "auto"  # auto | fp32 | bf16 | fp16: dtype of 4-bit matmuls and unquantized weights
    quantize_vision: bool = False  # also store the vision blocks' linears in 4 bit (the merger and lm_head never are)
    attn_implementation: str = "sdpa"  # sdpa | eager
    # Recompute each LLM layer and vision block in backward (non-reentrant): less memory, about 30 % more time.
    gradient_checkpointing: bool = False
    # The vision tower's windowed attention as one call per distinct window length, its per-image-size tables
    # cached (vlora/kernels.py): outputs bit-identical to transformers' code, about 5x fewer operator calls.
    lean_vision: bool = True
    # The vision patch embedding (a Conv3d over exactly one patch per row) as one matmul: equal within fp32
    # rounding, not bit for bit; 5x faster than oneDNN's convolution on the CPU (vlora/kernels.py).
    matmul_patch_embed: bool = True
    # Liger's fused Triton kernels (vlora/liger.py): RMSNorm, SwiGLU MLPs and RoPE in the LLM, RMSNorm in the vision
    # blocks, and a fused linear cross-entropy on the supervised positions (no logits in memory). Within bf16
    # rounding of the plain path, not bit for bit. Needs a CUDA device and `pip install -e '.[gpu]'` (liger-kernel);
    # a run that asks for it without them stops before loading. Off until measured against the plain path on a GPU.
    liger: bool = False
    # Freeze switches. A frozen component gets no LoRA and no trainable weight; naming one of its groups in
    # lora.targets (or lora.train_merger_fully for the merger) is an error. An unfrozen component trains only
    # where lora.targets / lora.train_merger_fully put something. Components: vision = patch embedding + vision
    # blocks, merger = the vision-language projector (visual.merger), llm = the language model's layers.
    freeze_vision: bool = True  # the vision tower stays as pretrained unless you unfreeze it explicitly
    freeze_merger: bool = False
    freeze_llm: bool = False  # true for a projector-only stage (lora.targets=merger or lora.train_merger_fully)


@dataclass
class LoraArgs:
    r: int = 16  # LoRA rank of every targeted group without its own entry in group_r
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # dropout on the LoRA input, in [0, 1)
    # Where adapters go, by component group: llm_attn (q/k/v/o_proj; Qwen3.5 also its linear_attn projections),
    # llm_mlp (gate/up/down_proj), merger (the vision-language projector; Qwen3-VL also its DeepStack mergers),
    # vision_attn (vision blocks' attn.qkv, attn.proj), vision_mlp (vision blocks' MLP). Each family names the
    # modules (vlora/families, docs/families.md). Vision groups need model.freeze_vision=false.
    targets: list[str] = field(default_factory=lambda: ["llm_attn", "llm_mlp", "merger"])
    # Per-group rank and alpha, "group=value" items overriding r / alpha for that group:
    # lora.group_r=merger=32,vision_attn=8 on the command line, or group_r: [merger=32, vision_attn=8] in YAML.
    group_r: list[str] = field(default_factory=list)
    group_alpha: list[str] = field(default_factory=list)
    rslora: bool = False  # rank-stabilised LoRA: scale = alpha / sqrt(r), so a larger r does not shrink updates
    dora: bool = False  # weight-decomposed LoRA (DoRA): a trainable magnitude per output feature; ~20-40 % slower
    # Train the merger's own weights (ln_q, mlp.0, mlp.2; unquantized, fp32 master copy) instead of LoRA on it.
    # They are saved in the adapter through peft's modules_to_save, so PeftModel.from_pretrained restores them.
    # Exclusive with 'merger' in targets.
    train_merger_fully: bool = False
    # An earlier run's adapter folder (PEFT layout) to start from: weights of modules that both runs train are
    # loaded, groups new in this run start at their usual init. E.g. a projector-only stage, then a joint one.
    init_from: str = ""


@dataclass
class DataArgs:
    # Shard folders (manifest.json + *.tar, written by `vlora pack`), mixed by weight: "dir" or "dir:2,dir2:1".
    # A folder may be a URL: s3://bucket/prefix, gs://bucket/prefix, https://host/path, pipe:COMMAND (docs/data.md).
    train: str = "shards/demo/train"
    val: str = "shards/demo/val"  # held-out shards; empty string = no evaluation
    # Images are resized so that h*w lies in [min_pixels, max_pixels]. The same two defaults are the data package's
    # own (vlora.data.pack.DEFAULT_MIN_PIXELS / DEFAULT_MAX_PIXELS, for `vlora pack`), which may not import this
    # module, nor this module it: tests/test_config.py holds the two pairs equal.
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 256
    max_length: int = 2048  # tokens per sample, image tokens included; longer samples are skipped, counted
    open_shards: int = 4  # shards each data reader interleaves at random (the in-epoch shuffle)
    num_workers: int = 2  # data-loader processes per rank
    retries: int = 8  # a remote read that fails this many times in a row (with backoff) stops the run
    val_samples: int = 256  # at most this many held-out samples per evaluation
    pack_length: int = 0  # >0: pack several samples into rows of this many tokens (attention kept per sample)
    train_on: str = "assistant"  # assistant (loss on replies only) | all (user turns' text too; never images)
    # Grounding boxes and points in the text (<|box_start|>(x1,y1),(x2,y2)<|box_end|>, "bbox_2d", "point_2d"):
    # original = in the image's own pixels, converted to the model family's convention as each image is resized
    # (docs/families.md) | as_written = already in the family's convention, passed through untouched.
    boxes: str = "original"


@dataclass
class OptimArgs:
    lr: float = 2e-4  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 10
    max_steps: int = 100  # optimizer steps
    weight_decay: float = 0.0  # AdamW decay on matrices; never on norms, biases, DoRA magnitudes (1-D tensors)
    # Learning-rate multipliers per component (lr_at(step) x multiplier); e.g. a projector trained faster than
    # the LLM (lr_merger: 5-10) and a vision tower slower (lr_vision: 0.1).
    lr_llm: float = 1.0
    lr_merger: float = 1.0
    lr_vision: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    global_batch: int = 32  # samples per optimizer step over all ranks and micro-steps
    micro_batch: int = 4  # samples per forward pass on one rank


# run.* is one flat namespace for the user (run.resume, run.engine, ...), but four concerns in the code: a dataclass
# per concern, and RunArgs inherits them all, so the fields stay flat (cfg.run.<key>, the saved config.yaml) while
# code that needs one concern can take that type (a RunArgs is a CheckpointArgs, a LogArgs, ...).


@dataclass
class LoopArgs:
    """The run itself: where it lives, its seed and precision, when it evaluates, when it gives up."""

    name: str = "demo"
    out_dir: str = "runs"  # the run lives in out_dir/name
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only before and after training
    # At each evaluation, also answer this many held-out samples (greedy) and log their exact match
    # (val_exact_match) beside the loss; 0 = loss only. Ignored without data.val; at least one sample per rank.
    eval_generate: int = 0
    # Held-out answers generated per batch (eval_generate, report_samples); 0 = optim.micro_batch. Greedy decoding
    # is per-token overhead on small models: a larger batch is faster, at the cost of memory for the cache.
    eval_batch: int = 0
    # After training, score the saved adapter on this many data.val samples against the base and the majority
    # answer, as `vlora eval` does (runs/NAME/eval/report.html), in the same process (rank 0); 0 = off.
    report_samples: int = 0
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run (with a checkpoint)


@dataclass
class DistArgs:
    """How ranks share the work: the engine, its DeepSpeed JSON, and how long a collective may wait."""

    # ddp (plain DistributedDataParallel) | deepspeed (ZeRO, as run.deepspeed_config says). Same loop either way.
    engine: str = "ddp"
    # DeepSpeed JSON for engine=deepspeed: ds_configs/zero2.json (default), zero3.json, zero3_offload.json or yours.
    # vlora writes batch sizes, accumulation, precision and clipping into it from optim.* / run.precision; the
    # file sets only what it names (ZeRO stage, buckets, offload, ...). A key it shares with vlora must agree.
    deepspeed_config: str = "ds_configs/zero2.json"
    # ZeRO-3 only: create the model already partitioned (deepspeed.zero.Init through transformers), so no rank
    # ever holds the whole base; false loads the whole base on every rank and partitions it afterwards.
    zero3_init: bool = True
    dist_timeout_s: int = 600  # a collective that waits longer than this ends the run


@dataclass
class CheckpointArgs:
    """Checkpoints, and where a run starts from."""

    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    overwrite: bool = False  # start afresh in a run folder that already holds a run (its contents are deleted)
    resume: str = ""  # "" = a new run | auto = continue from the run's latest checkpoint if any | a checkpoint folder


@dataclass
class LogArgs:
    """What rank 0 reports, and the diagnostics a run can write."""

    log_every: int = 1  # optimizer steps between log lines
    progress: bool = True  # tqdm bar on rank 0
    wandb: bool = False  # also log to wandb (offline unless WANDB_MODE says otherwise)
    plot: bool = True  # write loss and lr against step as runs/NAME/curves.png at the end
    trace_keys: bool = False  # write the sample keys each rank consumes per step (data-order checks)
    param_digest: bool = False  # write a hash of the trainable weights per rank and step (replica checks)


@dataclass
class RunArgs(LogArgs, CheckpointArgs, DistArgs, LoopArgs):
    """Everything under run.*: the four concerns above, flat (fields in the order LoopArgs, DistArgs,
    CheckpointArgs, LogArgs)."""


RUN_CONCERNS = (LoopArgs, DistArgs, CheckpointArgs, LogArgs)


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


# LoRA component groups, each with the component whose freeze switch (model.freeze_<component>) governs it.
LORA_GROUPS = {"llm_attn": "llm", "llm_mlp": "llm", "merger": "merger", "vision_attn": "vision", "vision_mlp": "vision"}
LORA_TARGETS = tuple(LORA_GROUPS)
CHOICES = {
    "model.quant": ("nf4", "fp4", "none"),
    "model.compute_dtype": ("auto", "fp32", "bf16", "fp16"),
    "model.attn_implementation": ("sdpa", "eager"),
    "run.precision": ("auto", "fp32", "bf16", "fp16"),
    "run.engine": ("ddp", "deepspeed"),
    "data.train_on": ("assistant", "all"),
    "data.boxes": ("original", "as_written"),  # vlora.families.BOX_MODES (this module imports no other)
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
            if isinstance(value, (list, tuple)) and key in JOINED_LISTS and all(isinstance(v, (str, int, float)) for v in value):
                return ",".join(str(v).strip() for v in value)  # data.train: [a:2, b] in YAML = "a:2,b"
            if isinstance(value, (list, tuple, dict)):  # str() of it would be a nonsense path or name
                raise TypeError
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    name = getattr(hint, "__name__", str(hint))
    raise VloraError(f"config key '{key}' expects {name}, got {value!r}")


# str keys that YAML may give as a list: joined with "," (the form the key documents).
JOINED_LISTS = ("data.train",)


def _set(cfg: Config, key: str, value: Any, *, text: bool = False) -> None:
    """Set `key` to `value`; `text`: value is a command-line override's raw text (YAML-parsed unless the field is a str)."""
    sections = _sections(cfg)
    section, _, name = key.partition(".")
    known = [f"{s}.{f.name}" for s, obj in sections.items() for f in dataclasses.fields(obj)]
    if section not in sections or not name or not hasattr(sections[section], name):
        hint = difflib.get_close_matches(key, known, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise VloraError(f"unknown config key '{key}'{suggestion}")
    obj = sections[section]
    hint = get_type_hints(type(obj))[name]
    if text and hint is not str:  # a str field keeps the text as typed: run.name=007 stays "007", =yes stays "yes"
        try:
            value = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise VloraError(f"override '{key}={value}' is not a valid value: {str(e).splitlines()[0]}") from None
    setattr(obj, name, _coerce(key, value, hint))


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
        _set(cfg, key.strip(), value, text=True)
    return cfg


def looks_like_hub_id(path: str) -> bool:
    """`owner/name` with no local meaning: the only form that may be fetched from a hub instead of disk."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path)) and not Path(path).exists()


@dataclass(frozen=True)
class Plan:
    """What the config implies for this world size: derived once, used everywhere."""

    grad_accum: int  # micro-steps per optimizer step on each rank


def group_values(key: str, items: list[str]) -> dict[str, int]:
    """`lora.group_r` / `lora.group_alpha` items ("merger=32") as {group: value}; a malformed item is an error."""
    out = {}
    for item in items:
        group, eq, value = item.partition("=")
        group = group.strip()
        if not eq or not re.fullmatch(r"\s*\d+\s*", value):
            raise VloraError(f"config key '{key}' item '{item}' must look like group=integer, e.g. merger=32")
        if group not in LORA_GROUPS:
            raise VloraError(f"config key '{key}' names group '{group}'; choose from {', '.join(LORA_TARGETS)}")
        out[group] = int(value)
    return out


def _check_model_lora_optim(cfg: Config) -> None:
    """Where LoRA goes, what is frozen, what trains fully, and the per-component learning rates agree."""
    lora, model = cfg.lora, cfg.model
    for target in lora.targets:
        if target not in LORA_GROUPS:
            raise VloraError(f"lora.targets has '{target}'; choose from {', '.join(LORA_TARGETS)}")
    if not lora.targets and not lora.train_merger_fully:
        raise VloraError("lora.targets is empty and lora.train_merger_fully=false: nothing would train")
    for target in lora.targets:
        component = LORA_GROUPS[target]
        if getattr(model, f"freeze_{component}"):
            raise VloraError(f"lora.targets has '{target}' but model.freeze_{component}=true; set "
                             f"model.freeze_{component}=false or drop '{target}' from lora.targets")
    if lora.train_merger_fully:
        if model.freeze_merger:
            raise VloraError("lora.train_merger_fully=true but model.freeze_merger=true; set only one")
        if "merger" in lora.targets:
            raise VloraError("lora.train_merger_fully=true trains the merger's own weights; drop 'merger' from "
                             "lora.targets (LoRA on a fully trained module is redundant)")
    for key in ("lora.group_r", "lora.group_alpha"):
        for group, value in group_values(key, getattr(lora, key.split(".")[1])).items():
            if group not in lora.targets:
                raise VloraError(f"config key '{key}' sets '{group}', which lora.targets does not place "
                                 f"({', '.join(lora.targets) or 'none'})")
            if value <= 0:
                raise VloraError(f"config key '{key}' gives '{group}' {value}; it must be positive")
    if lora.alpha <= 0:
        raise VloraError(f"config key 'lora.alpha' must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise VloraError(f"config key 'lora.dropout' must lie in [0, 1), got {lora.dropout}")
    for key in ("lr_llm", "lr_merger", "lr_vision"):
        if getattr(cfg.optim, key) <= 0:
            raise VloraError(f"config key 'optim.{key}' must be positive, got {getattr(cfg.optim, key)}; "
                             "freeze a component with model.freeze_* instead")


def validate(cfg: Config, world_size: int = 1) -> Plan:
    """Check the values alone (no file is read, no other module asked); return the batch arithmetic.

    vlora.preflight.preflight runs this, then the checks that need files; call preflight before a run."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise VloraError(f"config key '{key}' is '{value}'; choose one of {', '.join(allowed)}")
    _check_model_lora_optim(cfg)
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
        "data.val_samples": cfg.data.val_samples, "run.eval_generate": cfg.run.eval_generate, "data.retries": cfg.data.retries,
        "run.eval_batch": cfg.run.eval_batch, "run.report_samples": cfg.run.report_samples,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise VloraError(f"config key '{key}' must be >= 0, got {value}")
    if cfg.optim.lr <= 0:
        raise VloraError(f"config key 'optim.lr' must be positive, got {cfg.optim.lr}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise VloraError(f"config key 'optim.min_lr_ratio' must lie in [0, 1], got {cfg.optim.min_lr_ratio}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg.optim, key) < 1:
            raise VloraError(f"config key 'optim.{key}' must lie in [0, 1), got {getattr(cfg.optim, key)}")
    if not cfg.optim.eps > 0:
        raise VloraError(f"config key 'optim.eps' must be positive, got {cfg.optim.eps}")
    if 0 < cfg.run.eval_generate < world_size:
        raise VloraError(f"run.eval_generate={cfg.run.eval_generate} leaves a rank without a sample to answer; "
                         f"give at least {world_size} (one per rank) or 0")
    if cfg.data.max_pixels < cfg.data.min_pixels:
        raise VloraError(f"data.max_pixels ({cfg.data.max_pixels}) is below data.min_pixels ({cfg.data.min_pixels})")
    if cfg.optim.warmup_steps > cfg.optim.max_steps:
        raise VloraError(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) exceeds optim.max_steps ({cfg.optim.max_steps})"
        )
    per_pass = cfg.optim.micro_batch * world_size
    if cfg.optim.global_batch % per_pass:
        # A run resumed on another number of processes keeps its global batch (and so its curve): say which
        # smaller micro-batch would keep it here.
        fits = [m for m in range(cfg.optim.micro_batch - 1, 0, -1) if cfg.optim.global_batch % (m * world_size) == 0]
        fix = (f"set optim.micro_batch={fits[0]} to keep this global batch on {world_size} process(es)" if fits else
               f"pick a global batch that is a multiple of {per_pass}")
        raise VloraError(
            f"optim.global_batch={cfg.optim.global_batch} is not divisible by optim.micro_batch x world size "
            f"= {cfg.optim.micro_batch} x {world_size} = {per_pass}; {fix}"
        )
    if cfg.run.overwrite and cfg.run.resume:
        raise VloraError("run.overwrite=true would delete the checkpoint that run.resume asks for; set only one")
    return Plan(grad_accum=cfg.optim.global_batch // per_pass)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(obj) for name, obj in _sections(cfg).items()}


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
