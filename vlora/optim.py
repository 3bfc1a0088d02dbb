"""The optimizer, the learning rate as a pure function of the step, and mixed precision.

The schedule is a function, not a scheduler object (as in nanoGPT): resuming needs only the step number.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from vlora.config import Config, OptimArgs
from vlora.errors import VloraError


def lr_at(step: int, o: OptimArgs) -> float:
    """The learning rate of optimizer step `step` (counted from 0; the run's steps are 0 .. max_steps - 1).

    With M = max_steps, W = min(warmup_steps, M - 1) (a warm-up as long as the run is shortened by one step, so the
    run still ends at the floor), peak step p = max(W - 1, 0) and floor = lr * min_lr_ratio:

        lr_at(s) = lr * (s + 1) / W                                        for s < p   (linear warm-up)
        lr_at(s) = floor + (lr - floor) * (1 + cos(pi * (s - p) / (M - 1 - p))) / 2   for p <= s < M

    so the peak is used at exactly one step (p, the last of the warm-up), and the last step the run takes (M - 1)
    runs at the floor. Past M (never run) the rate stays at the floor.
    """
    warmup = max(0, min(o.warmup_steps, o.max_steps - 1))
    peak_step = max(warmup - 1, 0)
    if step < peak_step:
        return o.lr * (step + 1) / warmup
    decay_steps = max(1, o.max_steps - 1 - peak_step)
    progress = min(1.0, (step - peak_step) / decay_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - floor)


COMPONENTS = ("llm", "merger", "vision")  # each with its multiplier optim.lr_<component>


def param_groups(named_params, o: OptimArgs) -> list[dict]:
    """AdamW parameter groups: one per component (llm, merger, vision) and decay class, empty ones left out.

    Each group carries `name`, `lr_scale` (optim.lr_<component>) and `weight_decay`: optim.weight_decay on
    matrices, 0 on 1-D tensors (norms, biases, DoRA magnitudes), which decay would only pull towards zero.
    """
    from vlora.model import param_component

    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in named_params:
        if p.requires_grad:
            buckets.setdefault((param_component(name), p.ndim >= 2), []).append(p)
    groups = []
    for component in COMPONENTS:
        for decays in (True, False):
            if (component, decays) in buckets:
                groups.append({
                    "params": buckets[component, decays],
                    "name": component if decays else f"{component}/no_decay",
                    "lr_scale": getattr(o, f"lr_{component}"),
                    "weight_decay": o.weight_decay if decays else 0.0,
                })
    return groups


def build_optimizer(params, o: OptimArgs, device: torch.device) -> torch.optim.AdamW:
    """AdamW over what trains, grouped by component for per-component learning rates (see `param_groups`).

    `params` is the model (its parameters that require grad are taken) or (name, parameter) pairs. Bare
    parameters without names cannot be told apart: they form one group at multiplier 1 (decay still by shape),
    and an optim.lr_<component> other than 1 is then an error rather than silently ignored.
    """
    if isinstance(params, torch.nn.Module):
        named = list(params.named_parameters())
    else:
        items = list(params)
        if items and isinstance(items[0], torch.Tensor):
            scales = {c: getattr(o, f"lr_{c}") for c in COMPONENTS}
            if any(v != 1.0 for v in scales.values()):
                raise VloraError("build_optimizer needs the model or named parameters to apply "
                                 f"optim.lr_<component> multipliers {scales}")
            named = [(f"param{i}", p) for i, p in enumerate(items)]  # all "llm": one multiplier of 1
        else:
            named = items
    groups = param_groups(named, o)
    if not groups:
        raise VloraError("no parameter requires grad: nothing to optimize")
    for group in groups:
        group["lr"] = lr_at(0, o) * group["lr_scale"]
    # The fused kernel: one operator call per parameter group, on a GPU and on the CPU alike (the default
    # for-each / single-tensor paths run about a dozen operators per tensor: 270 a step on the tiny model, 2 fused).
    optimizer = torch.optim.AdamW(groups, lr=lr_at(0, o), betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=device.type in ("cuda", "cpu"))
    optimizer.register_load_state_dict_pre_hook(_keep_config_groups)
    return optimizer


def _keep_config_groups(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """On resume the config, not the checkpoint, decides each group's multiplier and decay (torch would restore the
    saved ones); a checkpoint grouped differently (other targets or freeze switches) is refused by name."""
    ours = [g.get("name") for g in optimizer.param_groups]
    saved = [g.get("name") for g in state_dict["param_groups"]]
    if ours != saved:
        raise VloraError(f"the checkpoint's optimizer groups {saved} differ from this run's {ours}; resume with the "
                         "same lora.targets, lora.train_merger_fully and model.freeze_* settings")
    groups = [dict(g, lr_scale=mine.get("lr_scale", 1.0), weight_decay=mine["weight_decay"])
              for g, mine in zip(state_dict["param_groups"], optimizer.param_groups)]
    return dict(state_dict, param_groups=groups)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's rate for every group: lr x the group's component multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def describe_param_groups(optimizer: torch.optim.Optimizer) -> str:
    """One log line: each group's name, parameter count, lr multiplier and weight decay."""
    parts = []
    for i, group in enumerate(optimizer.param_groups):
        n = sum(p.numel() for p in group["params"])
        parts.append(f"{group.get('name', f'group{i}')}: {n:,} params lr x{group.get('lr_scale', 1.0):g} "
                     f"wd {group['weight_decay']:g}")
    return "param groups: " + " | ".join(parts)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """What runs in which dtype: autocast for the forward, a GradScaler only for fp16."""

    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        # bf16 has fp32's exponent range and needs no loss scaling; fp16 does.
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def resolve_precision(cfg: Config, device: torch.device) -> Precision:
    name = cfg.run.precision
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto":
        # On the CPU bf16 matmuls are 6-29x slower than fp32 (no bf16 instructions): fp32 there.
        name = "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if name == "bf16" and not bf16_ok:
        raise VloraError(f"run.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16; use fp16")
    return Precision(name=name, device_type=device.type)


def resolve_compute_dtype(cfg: Config, precision: Precision) -> torch.dtype:
    """The dtype of 4-bit matmuls and of the weights left unquantized: follow the run's precision unless set."""
    if cfg.model.compute_dtype != "auto":
        return DTYPES[cfg.model.compute_dtype]
    return precision.dtype
