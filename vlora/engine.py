"""One small interface over plain DDP and DeepSpeed ZeRO, so that the loop in train.py is the same for both.

Per optimizer step, on every rank, the loop does

    for i, batch in enumerate(micro_batches):
        with engine.micro_step(boundary=i == last):   # DDP: no_sync() unless last; ZeRO: the accumulation boundary
            loss = engine(batch)                        # forward (ZeRO-3 gathers each layer's weights as it runs)
            engine.backward(loss * scale)               # gradients reduced over ranks only on the boundary
    result = engine.step(step_loss)                     # clip, check finiteness, update or skip, zero the grads

and keeps everything else: the global-token normalisation, the learning rate (set on `engine.optimizer`'s
groups), the bookkeeping of skipped steps, metrics, checkpoints. The engine owns the mechanics of the update and
the state that comes with it: the optimizer state (and under DeepSpeed the trained weights' master copies) in
checkpoints, how the model is built (ZeRO-3: 4-bit storage in the compute dtype, optionally created already
partitioned), and the full trained weights for an adapter export (ZeRO-3: gathered to rank 0).

A checkpoint resumes on any number of processes. DDP's optimizer state is sharded by parameter index over the
ranks that wrote it, and merged from all of them. DeepSpeed's own files (ZeRO partitions) load only on the world
size that wrote them, so beside them each rank writes its share of vlora's gathered copy of the trained state
(`trained_state_file`: fp32 masters and AdamW moments, whole tensors); a resume on another world size loads that
into its own partitions. `trained_state()` gathers what an engine holds, in that layout, for checks.

`make_engine(cfg, plan, world, precision)` picks one by `run.engine`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlora.checkpoint import DEEPSPEED_DIR as DS_TAG  # DeepSpeed's own files in a checkpoint folder (its "tag")
from vlora.checkpoint import optimizer_file
from vlora.config import Config, Plan
from vlora.errors import VloraError

# Keys vlora writes into the DeepSpeed config from its own (so the two cannot disagree), by the config key they
# come from. In a user's JSON each may be absent, "auto" (HF Trainer's convention), or equal; else it is an error.
OWNED = {
    "train_batch_size": "optim.global_batch",
    "train_micro_batch_size_per_gpu": "optim.micro_batch",
    "gradient_accumulation_steps": "optim.global_batch / (optim.micro_batch x world size)",
    "gradient_clipping": "optim.grad_clip",
}
# What vlora starts from; the user's JSON overrides what it names. DeepSpeed's own progress lines and timers are
# off: the loop logs loss, grad norm and throughput itself.
DEFAULTS = {"steps_per_print": 2**31 - 1, "wall_clock_breakdown": False, "zero_optimization": {"stage": 2}}


@dataclass
class StepResult:
    """What `Engine.step` did: the same decision on every rank."""

    grad_norm: torch.Tensor  # the global gradient norm before clipping (inf or nan when that made the step skip)
    loss_ok: bool  # the step's loss, summed over all ranks, is finite
    applied: bool  # the optimizer update was applied
    overflow: bool  # skipped by fp16 loss scaling, which lowered its scale: normal early in a run, not an error


class Engine:
    """The plain DDP engine (also a world of one): the base of the interface."""

    name = "ddp"
    zero_stage = 0
    # Every rank must run the same forward passes in the same order: ZeRO-3 gathers each module's weights with a
    # collective as the module runs (so a text-only batch still runs the vision tower, and evaluation runs the
    # same number of batches on every rank).
    lockstep = False
    # load() restores the trained weights as well; otherwise the checkpoint's adapter does.
    restores_weights = False

    def __init__(self, cfg: Config, plan: Plan, world, precision):
        self.cfg, self.plan, self.world, self.precision = cfg, plan, world, precision
        self.module = self.optimizer = self.net = self.scaler = None
        self.params: list[torch.nn.Parameter] = []
        self.trained_names: list[str] = []  # self.params' names in the loss module, in the same order

    # ---- building ----
    def quant_storage(self, compute_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype bitsandbytes packs 4-bit weights into (None: its default, uint8)."""
        return None

    def model_init(self):
        """The context the model is built in."""
        return contextlib.nullcontext()

    def prepare(self, loss_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wrap the loss module (whose trainable parameters are exactly the optimizer's) for training."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.module, self.optimizer = loss_model, optimizer
        self.params = [p for p in loss_model.parameters() if p.requires_grad]
        self.trained_names = [n for n, p in loss_model.named_parameters() if p.requires_grad]
        self.scaler = self.precision.grad_scaler()
        self.net = loss_model
        if self.world.distributed:
            # DDP would broadcast every frozen weight from rank 0 at start (the whole 4-bit base, across nodes) and
            # the constant buffers at every step; all ranks load them identically, so only what trains is its
            # business (ignored buffers are never broadcast).
            frozen = [n for n, p in loss_model.named_parameters() if not p.requires_grad]
            DDP._set_params_and_buffers_to_ignore_for_model(loss_model, frozen + [n for n, _ in loss_model.named_buffers()])
            device = self.world.device
            self.net = DDP(loss_model, device_ids=[device.index] if device.type == "cuda" else None,
                           gradient_as_bucket_view=True)

    # ---- one step ----
    def __call__(self, batch: dict) -> torch.Tensor:
        return self.net(batch)

    def micro_step(self, boundary: bool):
        """Around one micro-batch's forward and backward: gradients are reduced over ranks only on the boundary."""
        if boundary or not self.world.distributed:
            return contextlib.nullcontext()
        return self.net.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, step_loss: torch.Tensor) -> StepResult:
        """Unscale (fp16), clip, and apply the update unless the loss or the gradient is not finite."""
        scaler, optimizer = self.scaler, self.optimizer
        if scaler:
            scaler.unscale_(optimizer)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)
        # The step's host sync. Gradients and the step loss are all-reduced, so every rank computes the same norm
        # and loss and takes the same decision.
        loss_ok, norm_ok = torch.isfinite(torch.stack([step_loss.double(), grad_norm.double()])).tolist()
        applied = overflow = False
        if scaler is not None and loss_ok and not norm_ok:
            scaler.step(optimizer)  # fp16 overflow: GradScaler skips this update and lowers its scale
            scaler.update()
            overflow = True
        elif not (loss_ok and norm_ok):
            if scaler:
                scaler.update()
        else:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            applied = True
        optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=grad_norm, loss_ok=loss_ok, applied=applied, overflow=overflow)

    # ---- state ----
    def save(self, folder: Path) -> dict:
        """Collective: write this rank's share of the engine's state into `folder`; return what train_state.json
        should record (rank 0's copy is written)."""
        state = shard_optimizer_state(self.optimizer.state_dict(), self.world.rank, self.world.size)
        torch.save(state, optimizer_file(folder, self.world.rank))
        out = {"engine": self.name}
        if self.scaler is not None:
            out["grad_scaler"] = self.scaler.state_dict()
        return out

    def load(self, folder: Path, train_state: dict) -> None:
        # The shards of the world that wrote the checkpoint, which may differ from this one's.
        saved_world = int(train_state.get("world_size", self.world.size))
        merged = merge_optimizer_shards(folder, saved_world, len(self.params), self.world.device)
        try:
            self.optimizer.load_state_dict(merged)
        except ValueError as e:  # torch's check of the groups' sizes
            raise VloraError(f"checkpoint {folder}: its optimizer state does not fit this run's optimizer "
                             f"({str(e).splitlines()[0]}); resume with the same lora.*, model.freeze_* "
                             "settings") from None
        if self.scaler is not None and "grad_scaler" in train_state:
            self.scaler.load_state_dict(train_state["grad_scaler"])

    def trained_state(self) -> dict | None:
        """Collective: on rank 0 what the engine holds of the trained tensors, full and fp32 on the CPU:
        {name: weight, name.exp_avg: ..., name.exp_avg_sq: ...} for each of `trained_names`, and "step" (0-d int64,
        AdamW's step; 0 and zero moments before its first step); None on the other ranks. DDP: every rank holds
        it all, so nothing is exchanged."""
        if not self.world.is_main:
            return None
        state = self.optimizer.state
        out = {}
        for name, p in zip(self.trained_names, self.params):
            own = state[p] if p in state else {}
            out[name] = _cpu_fp32(p)
            for key in MOMENTS:
                out[f"{name}.{key}"] = _cpu_fp32(own[key]) if key in own else torch.zeros(p.shape)
        steps = [int(s["step"]) for s in state.values() if "step" in s]
        out["step"] = torch.tensor(max(steps, default=0), dtype=torch.int64)
        return out

    def full_weights(self):
        """Collective: inside it every rank sees the whole trained weights (only ZeRO-3 has to gather them)."""
        return contextlib.nullcontext()

    def adapter_state(self, peft_model) -> dict | None:
        """Collective: the trained weights by name on rank 0 where the model's own are partitioned (ZeRO-3);
        None where the model holds them whole (then save_adapter reads the model)."""
        return None

    def export_adapter(self, peft_model, out: Path) -> None:
        """Collective: rank 0 writes the adapter in PEFT's layout."""
        from vlora.model import save_adapter

        state = self.adapter_state(peft_model)
        if self.world.is_main:
            save_adapter(peft_model, out, state_dict=state)

    def close(self) -> None:
        pass


def shard_optimizer_state(state: dict, rank: int, world_size: int) -> dict:
    """This rank's share of a replicated optimizer state: the parameters whose index is rank mod world size, and
    the indices of every parameter that has state (so a resume can tell the shards cover all of it)."""
    return {"state": {i: v for i, v in state["state"].items() if i % world_size == rank},
            "param_groups": state["param_groups"], "state_ids": sorted(state["state"])}


def merge_optimizer_shards(folder: Path, world_size: int, n_params: int, device) -> dict:
    """The optimizer state that `world_size` ranks saved as shards (`shard_optimizer_state`), merged: every shard
    must be there, hold only its own parameters, and together they must hold exactly the state that was saved,
    of an optimizer with `n_params` parameters. Anything else is refused in one line naming the file."""
    from vlora.checkpoint import load_tensors

    merged = {"state": {}, "param_groups": None}
    saved_ids = None
    for r in range(world_size):
        path = optimizer_file(folder, r)
        shard = load_tensors(path, map_location=device)  # a missing file: one line naming it
        if not (isinstance(shard, dict) and isinstance(shard.get("state"), dict)
                and isinstance(shard.get("param_groups"), list)):
            raise VloraError(f"checkpoint file {path} is not an optimizer state shard")
        listed = sorted(i for g in shard["param_groups"] for i in g.get("params", []))
        if listed != list(range(n_params)):
            raise VloraError(f"checkpoint file {path} holds the optimizer state of {len(listed)} parameters, this "
                             f"run trains {n_params}; resume with the same lora.*, model.freeze_* settings")
        stray = [i for i in shard["state"] if not isinstance(i, int) or i % world_size != r or i >= n_params]
        if stray:
            raise VloraError(f"checkpoint file {path} holds the state of parameter {stray[0]}, which is not rank "
                             f"{r}'s share of {world_size} ranks (a file of another save?)")
        ids = shard.get("state_ids")  # absent in checkpoints of older vlora versions
        if ids is not None and saved_ids is not None and list(ids) != saved_ids:
            raise VloraError(f"checkpoint file {path} was written with other parameters' state than "
                             f"{optimizer_file(folder, 0).name} (a file of another save?)")
        saved_ids = list(ids) if ids is not None else saved_ids
        merged["state"].update(shard["state"])
        merged["param_groups"] = shard["param_groups"]
    if saved_ids is not None and sorted(merged["state"]) != saved_ids:
        odd = sorted(set(saved_ids) ^ set(merged["state"]))[0]
        raise VloraError(f"checkpoint {folder}: its {world_size} optimizer.rank*.pt shards hold the state of other "
                         f"parameters than were saved (parameter {odd}; a file of another save?)")
    return merged


MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter, beside its step
# DeepSpeed's fp16 loss scaler: what a resume on another world size restores (DynamicLossScaler's fields).
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    """A copy of its own (not a view into a flat buffer) on the CPU, fp32: what safetensors writes."""
    return t.detach().to("cpu", torch.float32, copy=True).contiguous()


def trained_state_file(folder: Path, rank: int) -> Path:
    """Engine deepspeed: rank `rank`'s share of vlora's gathered trained state (parameters rank, rank + world,
    ...: for each its fp32 master weight `NAME` and AdamW moments `NAME.exp_avg`, `NAME.exp_avg_sq`, full shape,
    fp32; the metadata key "vlora_trained_state" holds JSON {step, count, names, rank, world_size}). Written
    beside DeepSpeed's own files, so a checkpoint resumes on any number of processes."""
    return folder / f"trained_state.rank{rank:05d}.safetensors"


TRAINED_STATE_KEY = "vlora_trained_state"


def write_trained_state(path: Path, tensors: dict, *, names: list[str], step: int, count: int, rank: int,
                        world_size: int) -> None:
    from safetensors.torch import save_file

    meta = {"step": step, "count": count, "names": names, "rank": rank, "world_size": world_size}
    save_file(tensors, str(path), metadata={TRAINED_STATE_KEY: json.dumps(meta)})


def _read_trained_share(path: Path, folder: Path, world_size: int) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise VloraError(f"checkpoint {folder} has no {path.name} (written by a vlora without elastic resume): it "
                         f"can only resume on {world_size} processes, the number that wrote it")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[TRAINED_STATE_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        step, count, names = int(meta["step"]), int(meta["count"]), [str(n) for n in meta["names"]]
    except Exception as e:  # safetensors, JSON and key errors alike: not what vlora wrote
        text = str(e).strip().splitlines()
        raise VloraError(f"checkpoint file {path} is not a vlora trained-state file ({type(e).__name__}"
                         f"{': ' + text[0][:200] if text else ''})") from None
    return tensors, {"step": step, "count": count, "names": names}


def read_trained_state(folder: Path, world_size: int) -> tuple[dict, list[str]]:
    """What `world_size` ranks wrote with `write_trained_state`, merged: ({NAME, NAME.exp_avg, NAME.exp_avg_sq
    for each trained tensor, "step": 0-d int64}, the names in the order of the engine's parameters). The layout of
    `trained_state()`. A missing or inconsistent file is refused in one line naming it."""
    shares = [(trained_state_file(folder, r), *_read_trained_share(trained_state_file(folder, r), folder,
                                                                   world_size)) for r in range(world_size)]
    _, _, first = shares[0]
    count = first["count"]
    names = [""] * count
    out = {}
    for r, (path, tensors, meta) in enumerate(shares):
        if meta["step"] != first["step"] or meta["count"] != count:
            raise VloraError(f"checkpoint file {path} records step {meta['step']} of {meta['count']} tensors, "
                             f"{shares[0][0].name} step {first['step']} of {count} (a file of another save?)")
        mine = range(r, count, world_size)
        if len(meta["names"]) != len(mine):
            raise VloraError(f"checkpoint file {path} names {len(meta['names'])} tensors, rank {r}'s share of "
                             f"{count} over {world_size} ranks is {len(mine)}")
        for i, name in zip(mine, meta["names"]):
            names[i] = name
            for key in (name, *(f"{name}.{m}" for m in MOMENTS)):
                if key not in tensors:
                    raise VloraError(f"checkpoint file {path} lacks {key}")
                if tensors[key].dtype != torch.float32:
                    raise VloraError(f"checkpoint file {path} holds {key} as {tensors[key].dtype}, not float32")
                out[key] = tensors[key]
    out["step"] = torch.tensor(first["step"], dtype=torch.int64)
    return out, names


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed


def _config_path(name: str) -> Path:
    """The JSON as given (relative to the working folder), else the file of that name in this checkout."""
    path = Path(name)
    if not path.is_file() and not path.is_absolute():
        shipped = Path(__file__).resolve().parents[1] / name
        if shipped.is_file():
            return shipped
    return path


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config, plan: Plan, world_size: int, precision: str | None = None) -> dict:
    """The DeepSpeed config of this run: DEFAULTS, then the user's JSON (run.deepspeed_config), then what vlora owns
    (batch sizes, accumulation, clipping, precision), which the JSON may name only with the same value.

    `precision` is the resolved run precision (fp32 | bf16 | fp16); without it (config checks before the device is
    known) an explicit run.precision is checked and `auto` is left for later.
    """
    name = cfg.run.deepspeed_config
    path = _config_path(name)
    if not path.is_file():
        raise VloraError(f"run.deepspeed_config '{name}' does not exist (ds_configs/zero2.json, zero3.json, "
                         "zero3_offload.json, or your own JSON)")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VloraError(f"run.deepspeed_config '{name}' is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise VloraError(f"run.deepspeed_config '{name}' must hold a JSON object")
    for section, why in (("optimizer", "vlora builds AdamW from optim.* (per-component groups)"),
                         ("scheduler", "vlora sets the learning rate every step from optim.* (warm-up + cosine)")):
        if section in user:
            raise VloraError(f"run.deepspeed_config '{name}' has an '{section}' section; {why}: remove it")
    ours = {
        "train_batch_size": cfg.optim.global_batch,
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in ours.items():
        theirs = user.get(key, "auto")
        if theirs != "auto" and theirs != value:
            raise VloraError(f"run.deepspeed_config '{name}' sets {key}={theirs}, but {OWNED[key]} gives {value} "
                             f"(world size {world_size}); vlora writes {key} itself: drop it from the JSON or "
                             "change the vlora setting")
    precision = precision or (cfg.run.precision if cfg.run.precision != "auto" else None)
    if isinstance(user.get("bfloat16"), dict):  # DeepSpeed's old name for the bf16 section
        user["bf16"] = _merge(user.pop("bfloat16"), user.get("bf16", {}))
    for section in ("bf16", "fp16"):
        if not isinstance(user.get(section, {}), dict):
            raise VloraError(f"run.deepspeed_config '{name}': '{section}' must be an object")
        enabled = user.get(section, {}).get("enabled", "auto")
        if precision is not None and enabled != "auto" and bool(enabled) != (precision == section):
            raise VloraError(f"run.deepspeed_config '{name}' sets {section}.enabled={str(enabled).lower()}, but "
                             f"run.precision is {precision}; vlora writes the precision itself: drop "
                             f"{section}.enabled from the JSON or change run.precision")
    stage = user.get("zero_optimization", {}).get("stage", DEFAULTS["zero_optimization"]["stage"])
    if stage not in (0, 1, 2, 3):
        raise VloraError(f"run.deepspeed_config '{name}': zero_optimization.stage is {stage!r}; choose 0, 1, 2 or 3")
    if stage == 3 and cfg.lora.dora:
        raise VloraError("lora.dora=true does not work under ZeRO-3 (DeepSpeed loses track of the base weights "
                         "peft's DoRA layers touch: \"'Params4bit' object has no attribute 'ds_id'\"); use "
                         "ds_configs/zero2.json for DoRA")
    merged = _merge(_merge(DEFAULTS, user), ours)
    if precision is not None:
        merged["bf16"] = dict(merged.get("bf16", {}), enabled=precision == "bf16")
        merged["fp16"] = dict(merged.get("fp16", {}), enabled=precision == "fp16")
    zero = merged["zero_optimization"]
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # vlora's AdamW (torch's, on the CPU copy of the trained weights) instead of DeepSpeed's compiled CPU Adam:
        # the same optimizer as every other engine, and no C++ build. LoRA weights are few, so it costs little.
        merged.setdefault("zero_force_ds_cpu_optimizer", False)
    return merged


def _quiet_deepspeed(device: torch.device) -> None:
    """Before deepspeed is imported: keep its start-up chatter and compile caches in order."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else it warns on every rank that it fell back to the CPU
    # Ops DeepSpeed compiles on first use land in the project's cache, so later runs skip the build.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage from the JSON) under the same loop: forward, `backward`, `step` with explicit
    accumulation boundaries; AdamW and the learning rate stay vlora's."""

    restores_weights = True

    def __init__(self, cfg: Config, plan: Plan, world, precision):
        super().__init__(cfg, plan, world, precision)
        self.config = deepspeed_config(cfg, plan, world.size, precision.name)
        self.zero_stage = self.config["zero_optimization"]["stage"]
        self.name = f"deepspeed-zero{self.zero_stage}"
        self.lockstep = self.zero_stage == 3
        self.ds = None
        self._hf_config = None
        self._set_local_rank = False
        _quiet_deepspeed(world.device)

    def quant_storage(self, compute_dtype):
        # ZeRO-3 partitions the 4-bit weights like any other. Packed into the dtype the other weights have (the
        # compute dtype; under DeepSpeed bf16/fp16 the dtype it casts every floating weight to) they share their
        # flat buffers, and DeepSpeed's cast leaves them as they are instead of converting packed bits as numbers.
        if self.zero_stage != 3 or self.cfg.model.quant == "none":
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision.name, compute_dtype)

    @contextlib.contextmanager
    def model_init(self):
        if self.zero_stage == 3 and self.cfg.run.zero3_init:
            # transformers sees this object and creates the model under deepspeed.zero.Init: each weight is
            # partitioned as soon as it is loaded (and quantized), so no rank holds the whole base.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(self.config)
        yield

    def prepare(self, loss_model, optimizer):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        if self.world.device.type == "cpu":
            # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (~45 s on a 2-core machine) that only
            # its tensor-parallel inference uses; training talks through gloo.
            import importlib

            ds_comm = importlib.import_module("deepspeed.comm.torch")  # (the package's `torch` attribute is torch)
            if hasattr(ds_comm, "build_shm_op"):
                ds_comm.build_shm_op = lambda: None
        if "LOCAL_RANK" not in os.environ:  # DeepSpeed asks; unset without torchrun. Removed again by close(): HF
            os.environ["LOCAL_RANK"] = str(self.world.local_rank)  # code later in this process would take it for
            self._set_local_rank = True  # torchrun's and look for a rendezvous
        self.module, self.optimizer = loss_model, optimizer
        self.params = [p for p in loss_model.parameters() if p.requires_grad]
        self.trained_names = [n for n, p in loss_model.named_parameters() if p.requires_grad]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision.name)
        if dtype is not None and self._hf_config is not None:
            # DeepSpeed casts the weights of a model it partitions itself to bf16/fp16 (its master copies stay
            # fp32), but not those of a model created under zero.Init: the LoRA weights peft added afterwards.
            for p in self.params:
                p.data = p.data.to(dtype)
        self.ds, *_ = deepspeed.initialize(model=loss_model, optimizer=optimizer, config=self.config,
                                           dist_init_required=False)
        # DeepSpeed saves the module's whole state dict (exclude_frozen_parameters drops frozen weights but keeps
        # the 4-bit layers' quant-state entries, which its loader then rejects): keep only what trains.
        full_state_dict = self.ds.module_state_dict
        trained = set(self.trained_names)

        def trained_state_dict(*args, **kwargs):
            return {k: v for k, v in full_state_dict(*args, **kwargs).items() if k in trained}

        self.ds.module_state_dict = trained_state_dict

    def __call__(self, batch):
        return self.ds(batch)

    @contextlib.contextmanager
    def micro_step(self, boundary):
        self.ds.set_gradient_accumulation_boundary(boundary)
        yield

    def backward(self, loss):
        # The loop normalised the loss already (by the step's global token count): no division by accumulation.
        # DeepSpeed skips an update by the gradients alone; an infinite loss can still give finite gradients, which
        # it would apply. Times NaN where the loss is not finite (times exactly 1 where it is; no host sync), its
        # gradients are NaN, so the step is skipped on every rank, as the DDP engine skips it by the loss.
        finite = torch.isfinite(loss.detach())
        poison = torch.where(finite, torch.ones_like(loss), torch.full_like(loss, math.nan)).detach()
        self.ds.backward(loss * poison, scale_wrt_gas=False)

    def step(self, step_loss):
        # On the boundary: the global norm, DeepSpeed's check for non-finite gradients (then it skips the update
        # on every rank), clipping, the update, and the gradients cleared. `step_loss` is the step's loss summed
        # over all ranks (the loop all-reduces it first), so loss_ok, and with it `overflow`, is the same on every
        # rank; a non-finite loss on any rank made the gradients NaN (backward), so DeepSpeed skipped that step.
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        grad_norm = torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float64)
        applied = bool(self.ds.was_step_applied())
        loss_ok = bool(torch.isfinite(step_loss).item())
        overflow = not applied and loss_ok and self.precision.name == "fp16"
        return StepResult(grad_norm=grad_norm, loss_ok=loss_ok, applied=applied, overflow=overflow)

    def save(self, folder):
        # Each rank writes its shards of the optimizer state (and, under ZeRO-3, of the trained weights) into
        # folder/deepspeed/; nothing frozen is saved. A resume on as many processes loads them (bit-exact).
        self.ds.save_checkpoint(str(folder), tag=DS_TAG, client_state={"vlora_trained": self.trained_names},
                                save_latest=False, exclude_frozen_parameters=True)
        out = {"engine": self.name}
        if self.zero_stage >= 1:
            # DeepSpeed's files load only on the world size that wrote them: vlora's own copy of the trained
            # state, whole tensors, is what a resume on another number of processes loads. Rank r writes
            # parameters r, r + world, ...
            world = self.world.size
            tensors, step = self._gather_trained(owner=lambda i: i % world)
            write_trained_state(trained_state_file(folder, self.world.rank), tensors,
                                names=self.trained_names[self.world.rank::world], step=step,
                                count=len(self.trained_names), rank=self.world.rank, world_size=world)
        scaler = self._loss_scaler_state()
        if scaler:
            out["loss_scaler"] = scaler
        return out

    # What DeepSpeed's own checkpoint files pickle besides tensors and plain containers (found by loading the files of
    # ZeRO-2, ZeRO-3 and ZeRO-3-offload runs, fp32 and bf16, with weights_only=True; the model-states files need
    # none): in the optimizer states, the loss scaler (LossScaler, a static scale of 1, unless fp16; under fp16
    # DynamicLossScaler, which the CPU cannot run: taken from DeepSpeed's code), the ZeRO stage as an int enum, and
    # under ZeRO-1/2 each parameter's (numel, start) slice of the flat partition (fragment_address). They hold
    # numbers, flags and a dtype; making one runs no code but setting its fields.
    SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                    "deepspeed.runtime.zero.config.ZeroStageEnum",
                    "deepspeed.utils.tensor_fragment.fragment_address")

    @classmethod
    def check_checkpoint_files(cls, folder: Path) -> list[Path]:
        """Read every file under folder/deepspeed with `weights_only=True` and only SAFE_GLOBALS allowed, before
        DeepSpeed's load_checkpoint unpickles them in full (`weights_only=False`): a file that names any other
        global is refused in one line naming it, and nothing in it runs. Returns the files checked."""
        import importlib

        from vlora.checkpoint import load_tensors

        allowed = []
        for name in cls.SAFE_GLOBALS:
            module, _, attr = name.rpartition(".")
            allowed.append(getattr(importlib.import_module(module), attr))
        ds_dir = Path(folder) / DS_TAG
        files = sorted(p for p in ds_dir.rglob("*") if p.is_file()) if ds_dir.is_dir() else []
        if not files:
            raise VloraError(f"checkpoint {folder}: {ds_dir} holds no DeepSpeed files")
        with torch.serialization.safe_globals(allowed):
            for path in files:
                load_tensors(path, map_location="cpu")
        return files

    def load(self, folder, train_state):
        saved_world = int(train_state.get("world_size", self.world.size))
        if saved_world != self.world.size:
            self._load_elastic(folder, train_state, saved_world)
            return
        self.check_checkpoint_files(folder)
        path, client = self.ds.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise VloraError(f"checkpoint {folder}: DeepSpeed could not load {folder / DS_TAG}")
        if client.get("vlora_trained") != self.trained_names:
            raise VloraError(f"checkpoint {folder} trained other tensors than this run; resume with the same "
                             "lora.*, model.freeze_* settings")

    # ---- vlora's own copy of the trained state: a resume on another number of processes ----
    # DeepSpeed's ZeRO optimizer (self.ds.optimizer) keeps fp32 master weights in flat partitions, one per
    # parameter group (ZeRO-3: per sub-group), which the torch AdamW it wraps (self.ds.optimizer.optimizer, vlora's)
    # steps; its state (step, exp_avg, exp_avg_sq) is keyed by those flat tensors. DeepSpeed's fragment API
    # (deepspeed.utils.safe_get/set_full_*) reads and writes one parameter's whole tensor across them.

    def _flat_partitions(self) -> list[torch.Tensor]:
        zero = self.ds.optimizer
        return list(zero.fp32_partitioned_groups_flat if self.zero_stage == 3 else zero.single_partition_of_fp32_groups)

    def _adam_step(self) -> int:
        """AdamW's step count (0 before its first update: DeepSpeed skips steps with non-finite gradients)."""
        state = self.ds.optimizer.optimizer.state
        return max((int(state[f]["step"]) for f in self._flat_partitions() if f in state and "step" in state[f]),
                   default=0)

    def _link_moments(self) -> None:
        """ZeRO-1/2: point each parameter's fragment at the AdamW state of its flat partition. DeepSpeed links them
        only after its first update (`_lazy_init_hp_params_optimizer_state`), not after a load; linking again is
        harmless (views of the current state tensors)."""
        if self.zero_stage in (1, 2):
            zero = self.ds.optimizer
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _gather_trained(self, owner) -> tuple[dict, int]:
        """Collective, one pass over the trained parameters (every rank gathers each in the same order): ({NAME,
        NAME.exp_avg, NAME.exp_avg_sq: full fp32 tensor on the CPU} for the parameters i with owner(i) == this
        rank, AdamW's step). Before AdamW's first step the moments are zeros, as AdamW would start them."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step = self._adam_step()
        if step:
            self._link_moments()
        rank, out = self.world.rank, {}
        for i, (name, p) in enumerate(zip(self.trained_names, self.params)):
            full = {name: safe_get_full_fp32_param(p)}
            for key in MOMENTS:
                full[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key) if step else None
            if owner(i) == rank:
                shape = tuple(getattr(p, "ds_shape", p.shape))
                out.update((k, _cpu_fp32(v) if v is not None else torch.zeros(shape)) for k, v in full.items())
        return out, step

    def trained_state(self):
        if self.zero_stage == 0:
            raise VloraError("trained_state() needs ZeRO stage 1, 2 or 3 (stage 0 has no flat partitions)")
        tensors, step = self._gather_trained(owner=lambda i: 0)
        if not self.world.is_main:
            return None
        return {**tensors, "step": torch.tensor(step, dtype=torch.int64)}

    def _loss_scaler_state(self) -> dict:
        """fp16: the dynamic loss scale and its counters (DeepSpeed keeps them in its own files only)."""
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        if self.precision.name != "fp16" or scaler is None:
            return {}
        out = {}
        for key in LOSS_SCALER_FIELDS:
            value = getattr(scaler, key, None)
            if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
                out[key] = value.item() if isinstance(value, torch.Tensor) else value
        return out

    def _elastic_refusal(self) -> str | None:
        """Why this engine cannot take a checkpoint of another world size, if it cannot."""
        zero = self.ds.optimizer
        if self.zero_stage == 0:
            return "under ZeRO stage 0 vlora keeps no world-size-free copy of the optimizer state"
        # ZeRO-3 offload with a ratio below 1 steps some sub-groups on the device with a second AdamW, whose state
        # DeepSpeed's fragment API does not reach; NVMe swaps the state out of memory.
        partly = getattr(zero, "offload_optimizer", False) and any(
            d != "cpu" for d in getattr(zero, "subgroup_to_device", {}).values())
        if getattr(zero, "swap_optimizer", False) or partly:
            return ("the optimizer state is swapped to NVMe or only partly offloaded (zero_optimization."
                    "offload_optimizer), which vlora cannot refill")
        if self.zero_stage == 3 and any(f is None for f in zero.fp16_partitioned_groups_flat):
            return "the parameters are swapped to NVMe (zero_optimization.offload_param), which vlora cannot refill"
        return None

    def _load_elastic(self, folder: Path, train_state: dict, saved_world: int) -> None:
        """A checkpoint of another world size: vlora's gathered copy (trained_state_file) into this world's
        partitions, the model's weights refreshed from it."""
        why = self._elastic_refusal()
        if why:
            raise VloraError(f"checkpoint {folder} was written by {saved_world} rank(s), this run has "
                             f"{self.world.size}: {why}; resume on {saved_world} processes")
        state, names = read_trained_state(folder, saved_world)
        if names != self.trained_names:
            raise VloraError(f"checkpoint {folder} trained other tensors than this run; resume with the same "
                             "lora.*, model.freeze_* settings")
        for name, p in zip(names, self.params):
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(state[name].shape) != shape:
                raise VloraError(f"checkpoint {folder}: {name} has shape {tuple(state[name].shape)} there, {shape} "
                                 "in this run; resume with the same lora.* settings")
        self._set_trained(state, int(state["step"]))
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        for key, value in train_state.get("loss_scaler", {}).items():
            if scaler is not None and key in LOSS_SCALER_FIELDS:
                setattr(scaler, key, value)
        # DeepSpeed's own counters, as its load would set them (one per optimizer step, applied or not).
        step = int(train_state.get("step", 0))
        self.ds.global_steps, self.ds.global_samples = step, step * self.ds.train_batch_size()
        self.ds.skipped_steps = int(train_state.get("skipped_steps", 0))

    def _create_adam_state(self, step: int) -> None:
        """AdamW's state for every flat partition, as torch makes it (through load_state_dict, which places the step
        where the fused or plain kernel wants it): `step`, zero moments, which `_set_trained` then fills. DeepSpeed
        creates it only at its first update; at step 0 none is made (a fresh AdamW starts so)."""
        zero, opt = self.ds.optimizer, self.ds.optimizer.optimizer
        for flat in self._flat_partitions():
            opt.state.pop(flat, None)
        if self.zero_stage in (1, 2):
            zero._hp_optimizer_states_linked = False
        if not step:
            return
        if self.zero_stage == 3:  # ZeRO-3 hands AdamW one sub-group at a time; load_state_dict needs them all
            zero._set_fp32_optimizer_param_groups()
        try:
            saved = opt.state_dict()
            flats = [p for g in opt.param_groups for p in g["params"]]
            saved["state"] = {i: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(flats)}
            opt.load_state_dict(saved)
        finally:
            if self.zero_stage == 3:
                zero._clear_fp32_optimizer_param_groups()
        self._link_moments()

    def _set_trained(self, state: dict, step: int) -> None:
        """Every parameter's full fp32 master weight and moments into this rank's partitions, then the model's own
        (low-precision) weights refreshed from the masters, as DeepSpeed's universal-checkpoint load does."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = self.ds.optimizer
        if self.zero_stage == 3:
            zero.checkpoint_event_prologue()  # every parameter released to its partition, which is rewritten
        self._create_adam_state(step)
        for name, p in zip(self.trained_names, self.params):
            safe_set_full_fp32_param(p, state[name])
            if step:
                for key in MOMENTS:
                    safe_set_full_optimizer_state(p, state[f"{name}.{key}"], key)
        if self.zero_stage == 3:
            for sub_group in range(len(zero.fp16_groups)):
                zero._reassign_or_swap_out_partitioned_parameters(sub_group)  # masters -> the model's partitions
            zero.checkpoint_event_epilogue()  # persistent (small) parameters gathered whole again
        else:
            zero.update_lp_params()  # masters -> the model's weights, all-gathered

    def full_weights(self):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)

    def adapter_state(self, peft_model):
        if self.zero_stage != 3:
            return None
        import deepspeed

        # Gathered in slices, each copied to rank 0's memory, so no rank holds more than a slice beyond its shard.
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        state = {}
        for i in range(0, len(named), 64):
            chunk = named[i : i + 64]
            with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=0):
                if self.world.is_main:
                    state.update((n, p.detach().to("cpu", copy=True)) for n, p in chunk)
        return state if self.world.is_main else None

    def close(self):
        if self._hf_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_config = None
        if self.ds is not None:
            # DeepSpeed keeps the process groups it made (a clone of the world group) in module globals and would
            # hand them to the next engine of this process: after vlora.distributed.cleanup() and a new group (an
            # in-process run after another) they are destroyed ("Group ... is not registered"). Forget them.
            from deepspeed.utils import groups

            release = getattr(groups, "_release_process_group_references", None)
            if release is not None:
                release(None)
        if self._set_local_rank:
            os.environ.pop("LOCAL_RANK", None)
            self._set_local_rank = False


def make_engine(cfg: Config, plan: Plan, world, precision) -> Engine:
    """The engine `run.engine` names."""
    if cfg.run.engine == "deepspeed":
        return DeepSpeedEngine(cfg, plan, world, precision)
    return Engine(cfg, plan, world, precision)
