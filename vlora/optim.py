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
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine down to lr * min_lr_ratio at max_steps.

    `step` counts optimizer steps from 0; the value is the rate used for that step.
    """
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    decay_steps = max(1, o.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / decay_steps)
    min_lr = o.lr * o.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - min_lr)


def build_optimizer(params: list[torch.nn.Parameter], o: OptimArgs, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; no decay on 1-D tensors (norms, biases, DoRA magnitudes)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # The fused kernel is one launch for all parameters on a GPU; the CPU keeps the default implementation.
    return torch.optim.AdamW(
        groups, lr=lr_at(0, o), betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda"
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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
