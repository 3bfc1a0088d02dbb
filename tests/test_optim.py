"""The learning-rate schedule is a pure function of the step: warm-up, then cosine to the floor."""

import math

import pytest
import torch

from vlora.config import OptimArgs
from vlora.errors import VloraError
from vlora.optim import build_optimizer, describe_param_groups, lr_at, set_lr


def run_lrs(o: OptimArgs) -> list[float]:
    """The rates of the steps a run actually takes: 0 .. max_steps - 1."""
    return [lr_at(s, o) for s in range(o.max_steps)]


def test_warmup_reaches_the_peak_once_and_the_last_step_runs_at_the_floor():
    o = OptimArgs(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    lrs = run_lrs(o)
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])  # linear warm-up, ends at the peak
    assert lrs.count(max(lrs)) == 1 and lrs[9] == pytest.approx(1e-3)  # the peak at one step only
    assert lrs[10] < lrs[9]  # the decay starts right after it
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-12)  # the last step the run takes runs at min_lr
    assert min(lrs) == lrs[-1]
    assert lrs[59] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way down the cosine (step 9 + 100/2)
    assert all(a > b for a, b in zip(lrs[9:], lrs[10:]))  # strictly falling after the peak
    assert lr_at(200, o) == pytest.approx(1e-4)  # past the end: the floor


def test_no_warmup_starts_at_the_peak_and_ends_at_the_floor():
    o = OptimArgs(lr=2e-4, min_lr_ratio=0.0, warmup_steps=0, max_steps=5)
    assert run_lrs(o) == pytest.approx([2e-4 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)])
    assert run_lrs(o)[0] == 2e-4 and run_lrs(o)[-1] == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("warmup,steps", [(1, 2), (2, 3), (3, 40), (0, 1), (2, 2), (5, 5)])
def test_peak_once_floor_last_at_the_edges(warmup, steps):
    o = OptimArgs(lr=1.0, min_lr_ratio=0.25, warmup_steps=warmup, max_steps=steps)
    lrs = run_lrs(o)
    assert lrs.count(1.0) == 1
    if steps > 1:
        assert lrs[-1] == pytest.approx(0.25)


def test_the_rates_a_run_uses_are_the_schedule(tiny_model_dir, demo_shards, tmp_path, monkeypatch):
    """The rates metrics.jsonl records for the steps that ran: warm-up to the peak once, the last at the floor."""
    from helpers import read_jsonl, train_in_process

    train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **{
        "optim.max_steps": 5, "optim.warmup_steps": 2, "optim.lr": 1e-3, "optim.min_lr_ratio": 0.1,
        "optim.global_batch": 2, "optim.micro_batch": 2, "data.val": "", "run.log_every": 1, "run.plot": "false"})
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "t" / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 3)),
                                 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(2 * math.pi / 3)), 1e-4])


def test_a_warmup_as_long_as_the_run_still_ends_at_the_floor():
    o = OptimArgs(lr=1.0, min_lr_ratio=0.5, warmup_steps=4, max_steps=4)
    assert run_lrs(o) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5])


def test_adamw_groups_skip_decay_on_vectors():
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([w, b], OptimArgs(weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["params"][0] is w and opt.param_groups[1]["params"][0] is b


def test_component_groups_scale_the_lr_and_decay_only_matrices():
    """Groups by parameter name: llm / merger / vision, each split into decayed matrices and undecayed vectors."""
    named = [(f"base_model.model.model.{n}", torch.nn.Parameter(torch.ones(*shape))) for n, shape in [
        ("language_model.layers.0.self_attn.q_proj.lora_A.default.weight", (4, 8)),
        ("language_model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight", (8,)),
        ("visual.merger.mlp.0.lora_B.default.weight", (8, 4)),
        ("visual.merger.modules_to_save.default.mlp.0.bias", (8,)),
        ("visual.blocks.0.attn.qkv.lora_A.default.weight", (4, 8)),
    ]]
    o = OptimArgs(lr=1.0, warmup_steps=0, weight_decay=0.1, lr_llm=0.5, lr_merger=10.0, lr_vision=0.1)
    opt = build_optimizer(named, o, torch.device("cpu"))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5, 10.0, 10.0, 0.1])  # lr_at(0) x scale
    set_lr(opt, 1e-3)
    got = [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups]
    ids = [id(p) for _, p in named]
    assert got == [("llm", pytest.approx(5e-4), 0.1, [ids[0]]),
                   ("llm/no_decay", pytest.approx(5e-4), 0.0, [ids[1]]),
                   ("merger", pytest.approx(1e-2), 0.1, [ids[2]]),
                   ("merger/no_decay", pytest.approx(1e-2), 0.0, [ids[3]]),
                   ("vision", pytest.approx(1e-4), 0.1, [ids[4]])]
    assert describe_param_groups(opt).startswith("param groups: llm: 32 params lr x0.5 wd 0.1 | llm/no_decay: 8 params")
    # On resume the config decides multipliers and decay, not the checkpoint (torch would restore the saved ones).
    resumed = build_optimizer(named, OptimArgs(lr=1.0, warmup_steps=0, lr_merger=2.0), torch.device("cpu"))
    resumed.load_state_dict(opt.state_dict())
    set_lr(resumed, 1e-3)
    assert [(g["lr"], g["weight_decay"]) for g in resumed.param_groups] == [
        (1e-3, 0.0), (1e-3, 0.0), (2e-3, 0.0), (2e-3, 0.0), (1e-3, 0.0)]
    other = build_optimizer(named[:4], o, torch.device("cpu"))  # no vision group: not this checkpoint's run
    with pytest.raises(VloraError, match=r"optimizer groups \[.*'vision'\] differ from this run's"):
        other.load_state_dict(opt.state_dict())


def test_unnamed_parameters_cannot_take_component_multipliers():
    w = torch.nn.Parameter(torch.ones(3, 3))
    with pytest.raises(VloraError, match="needs the model or named parameters"):
        build_optimizer([w], OptimArgs(lr_merger=10.0), torch.device("cpu"))
