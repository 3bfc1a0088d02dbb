"""The learning-rate schedule is a pure function of the step: warm-up, then cosine to the floor."""

import math

import pytest
import torch

from vlora.config import OptimArgs
from vlora.optim import build_optimizer, lr_at


def test_warmup_then_cosine():
    o = OptimArgs(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, o) == pytest.approx(1e-4)
    assert lr_at(9, o) == pytest.approx(1e-3)  # warm-up ends at the peak
    assert lr_at(10, o) == pytest.approx(1e-3)
    assert lr_at(60, o) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way down the cosine
    assert lr_at(110, o) == pytest.approx(1e-4)
    lrs = [lr_at(s, o) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warm-up


def test_no_warmup():
    o = OptimArgs(lr=2e-4, min_lr_ratio=0.0, warmup_steps=0, max_steps=4)
    assert [lr_at(s, o) for s in range(5)] == pytest.approx(
        [2e-4 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    )


def test_adamw_groups_skip_decay_on_vectors():
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([w, b], OptimArgs(weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["params"][0] is w and opt.param_groups[1]["params"][0] is b
