"""model.liger (vlora/liger.py): refused with its reason where it cannot run, structure checked on the CPU (what
Liger replaces, what it leaves: LoRA, the lean vision tower, stock classes for later models), and on a GPU the loss
and LoRA gradients against the plain path."""

import importlib.metadata
import importlib.util
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_lora_model
from vlora import liger
from vlora.config import Config, load_config
from vlora.errors import VloraError
from vlora.model import SupervisedLoss, load_processor

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed (pip install -e '.[gpu]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def keep_rope():
    """apply_liger's RoPE is process-wide: put transformers' function back after the test."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mod

    stock = mod.apply_rotary_pos_emb
    yield mod
    mod.apply_rotary_pos_emb = stock


def image_batch(tiny_model_dir, demo_shards, n=2, **collator_args):
    import webdataset as wds

    from vlora.data.collate import Collator
    from vlora.data.manifest import shard_paths

    collator = Collator(load_processor(str(tiny_model_dir)), min_pixels=3136, max_pixels=12544, max_length=512,
                        **collator_args)
    samples = list(wds.WebDataset(shard_paths(demo_shards / "val"), shardshuffle=False, empty_check=False))[:n]
    return collator.collate([collator.encode(s) for s in samples])


# ---- the switch, and where it cannot run (CPU) ----


def test_liger_is_off_by_default_and_typed():
    assert Config().model.liger is False
    assert load_config(None, ["model.liger=true"]).model.liger is True
    with pytest.raises(VloraError, match="model.liger"):
        load_config(None, ["model.liger=maybe"])


def test_liger_available_says_why_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in liger.liger_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    for missing, words in (("liger_kernel", "liger-kernel is not installed"), ("triton", "triton is not installed")):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, _m=missing: None if name == _m else real(name, *a))
        if missing == "triton" and not HAS_LIGER:
            continue  # the liger-kernel check comes first
        assert words in liger.liger_available()
    if HAS_LIGER:
        monkeypatch.setattr(importlib.util, "find_spec", real)
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.0")
        assert "liger-kernel 0.5.0 is older than 0.8.5" in liger.liger_available()


def test_build_model_refuses_liger_without_cuda_before_loading(tiny_model_dir, monkeypatch):
    import vlora.model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vlora.model, "load_base_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.liger=true"])
    with pytest.raises(VloraError, match=r"model\.liger=true .*no CUDA device.*set model\.liger=false"):
        vlora.model.build_model(cfg, torch.device("cpu"), torch.float32)


# ---- when the fused loss may replace lm_head + cross_entropy (CPU) ----


def test_fused_ce_blocker_names_each_unsafe_lm_head():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    hidden = torch.zeros(3, 8)
    plain = nn.Linear(8, 16, bias=False)
    assert "not on a CUDA device" in liger.fused_ce_blocker(plain, hidden)  # a plain head, only the device wrong
    lora = LoraLinear(nn.Linear(8, 16, bias=False), "default", config=LoraConfig(r=2), r=2)
    assert "LoRA" in liger.fused_ce_blocker(lora, hidden)  # LoRA on lm_head: its forward adds the adapter
    saved = ModulesToSaveWrapper(nn.Linear(8, 16, bias=False), "default")  # a trained copy lives in the wrapper
    assert "not a plain Linear" in liger.fused_ce_blocker(saved, hidden)

    zero3 = nn.Linear(8, 16, bias=False)
    zero3.weight.ds_id = 7  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    assert "ZeRO-3" in liger.fused_ce_blocker(zero3, hidden)
    hooked = nn.Linear(8, 16, bias=False)
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert "forward hooks" in liger.fused_ce_blocker(hooked, hidden)


def test_supervised_loss_falls_back_to_the_plain_loss_with_a_log_line(tiny_model_dir, demo_shards, caplog):
    model = tiny_lora_model(tiny_model_dir)
    batch = image_batch(tiny_model_dir, demo_shards)
    assert SupervisedLoss(model).fused_ce is False  # not marked by apply_liger: plain, silently
    with caplog.at_level(logging.INFO, logger="vlora"):
        fused = SupervisedLoss(model, fused_ce=True)
        loss = fused(batch)
        assert fused.fused_ce is False
        assert not SupervisedLoss(model, vision_lockstep=True, fused_ce=True).fused_ce
    assert "not on a CUDA device" in caplog.text and "ZeRO-3" in caplog.text
    assert torch.equal(loss, SupervisedLoss(model)(batch))


@needs_liger
def test_apply_liger_patches_instances_and_keeps_lora_and_the_lean_tower(tiny_model_dir, demo_shards, keep_rope):
    """What apply_liger changes, checked on the CPU: Liger's forwards on the norms and the LLM MLPs (whose
    LoRA-wrapped 4-bit linears stay), the lean vision tower untouched, RoPE process-wide but stock for CPU tensors,
    and every replaced forward still transformers' code on the CPU: the loss and its gradients are unchanged."""
    from peft.tuners.lora import LoraLayer

    mod = keep_rope
    model = tiny_lora_model(tiny_model_dir)
    batch = image_batch(tiny_model_dir, demo_shards)
    plain_loss = SupervisedLoss(model)(batch)
    plain_loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    hf = model.get_base_model()
    visual, layers = hf.model.visual, hf.model.language_model.layers
    lean = [vars(m).get("forward") for m in (visual, *(block.attn for block in visual.blocks))]
    assert all(lean)  # lean_vision (default on) installed its forwards on the instances

    lines = liger.apply_liger(model)
    assert len(lines) == 4 and not any("stock" in line for line in lines), lines
    for layer in layers:
        assert layer.mlp.forward.__func__ is liger._swiglu_forward
        assert isinstance(layer.mlp.gate_proj, LoraLayer) and isinstance(layer.mlp.down_proj, LoraLayer)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert norm.forward.__func__ is liger._rms_norm_forward
    assert [vars(m).get("forward") for m in (visual, *(block.attn for block in visual.blocks))] == lean
    assert all(block.norm2.forward.__func__ is liger._rms_norm_forward for block in visual.blocks)
    assert "forward" not in vars(visual.merger) and "forward" not in vars(hf.lm_head)
    assert f"{2 * len(layers) + 1 + 2 * len(visual.blocks)} norms" in lines[0] and f"{len(layers)} LLM" in lines[1]
    assert SupervisedLoss(model).fused_ce is True

    # RoPE: the modeling module's function is wrapped, but only this model's rotary embedding marks its cos/sin
    # for Liger's kernel; a second, plain model in the process keeps transformers' RoPE.
    rope = mod.apply_rotary_pos_emb
    assert rope.vlora_stock is not None
    x, positions = torch.zeros(1, 5, 64), torch.arange(5).expand(3, 1, 5)
    assert getattr(hf.model.language_model.rotary_emb(x, positions)[0], liger.ROPE_MARK) is True
    other = tiny_lora_model(tiny_model_dir)
    assert not hasattr(other.get_base_model().model.language_model.rotary_emb(x, positions)[0], liger.ROPE_MARK)
    liger.apply_liger(other)
    assert mod.apply_rotary_pos_emb is rope  # a second model does not stack a second wrapper
    loss = SupervisedLoss(model)(batch)  # on the CPU: transformers' code everywhere, the plain loss
    loss.backward()
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(p.grad, plain_grads[n]) for n, p in model.named_parameters() if p.requires_grad)


@needs_liger
def test_apply_liger_refuses_other_architectures():
    class Other(nn.Module):
        config = type("C", (), {"model_type": "llava"})()

    with pytest.raises(VloraError, match="Qwen2.5-VL only.*llava"):
        liger.apply_liger(Other())


# ---- on a GPU: the numbers ----


@pytest.mark.gpu
@needs_cuda
@needs_liger
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_ce_equals_cross_entropy_on_random_rows(dtype, bias):
    torch.manual_seed(0)
    head = nn.Linear(96, 5000, bias=bias, device="cuda", dtype=dtype).requires_grad_(False)
    hidden = torch.randn(77, 96, device="cuda", dtype=dtype)
    targets = torch.randint(0, 5000, (77,), device="cuda")
    assert liger.fused_ce_blocker(head, hidden) is None
    results = []
    for loss_fn in (lambda h: F.cross_entropy(head(h).float(), targets, reduction="sum"),
                    lambda h: liger.fused_supervised_ce(h, head, targets)):
        h = hidden.clone().requires_grad_(True)
        loss = loss_fn(h)
        (loss / 77).backward()  # a loss scale, as the loop divides by the global token count
        results.append((loss.detach(), h.grad))
    (plain, plain_grad), (fused, fused_grad) = results
    loss_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-3, 2e-2)
    torch.testing.assert_close(fused, plain, rtol=loss_tol, atol=0)
    assert ((fused_grad.float() - plain_grad.float()).norm() / plain_grad.float().norm()).item() < grad_tol
    empty = torch.zeros(0, 96, device="cuda", dtype=dtype, requires_grad=True)
    assert liger.fused_supervised_ce(empty, head, targets[:0]).item() == 0.0


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Liger kernels the replaced forwards call, by name."""
    real, calls = liger._functional(), {}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return getattr(real, name)(*args, **kwargs)
        return call

    names = ("liger_rms_norm", "liger_swiglu", "liger_rope")
    monkeypatch.setattr(liger, "_functional", lambda: types.SimpleNamespace(**{n: counted(n) for n in names}))
    return calls


def _loss_and_grads(model, batch, autocast_dtype, fused):
    loss_model = SupervisedLoss(model, fused_ce=fused)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = loss_model(batch)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, loss_model.fused_ce


def _tiny_on_gpu(tiny_model_dir, dtype, liger_on):
    from vlora.model import build_model

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "lora.dropout=0", f"model.liger={liger_on}"])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cuda"), dtype)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # LoRA B starts at zero, which would hide the adapter's path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


@pytest.mark.gpu
@needs_cuda
@needs_liger
@pytest.mark.parametrize("dtype, loss_tol, grad_tol", [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 1e-2, 5e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("pack", [0, 512], ids=["padded", "packed"])
def test_liger_loss_and_lora_grads_match_the_plain_path(tiny_model_dir, demo_shards, keep_rope, kernel_calls, dtype,
                                                        loss_tol, grad_tol, pack):
    batch = image_batch(tiny_model_dir, demo_shards, n=3, pixel_dtype=dtype, pack_length=pack)
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}
    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None
    plain_model = _tiny_on_gpu(tiny_model_dir, dtype, False)
    plain_loss, plain_grads, _ = _loss_and_grads(plain_model, batch, autocast, None)
    liger_loss, liger_grads, fused = _loss_and_grads(_tiny_on_gpu(tiny_model_dir, dtype, True), batch, autocast, None)
    assert fused, "the fused cross-entropy fell back to the plain loss"
    layers = len(plain_model.get_base_model().model.language_model.layers)
    blocks = len(plain_model.get_base_model().model.visual.blocks)
    # One forward of the Liger model: every norm (LLM, vision blocks), MLP and attention layer ran its kernel.
    expected = {"liger_rms_norm": 2 * layers + 1 + 2 * blocks, "liger_swiglu": layers, "liger_rope": layers}
    assert kernel_calls == expected, kernel_calls
    _loss_and_grads(plain_model, batch, autocast, None)  # the plain model again, after apply_liger: no kernel
    assert kernel_calls == expected, "a Liger kernel (RoPE is the process-wide one) ran in the plain model"
    torch.testing.assert_close(liger_loss, plain_loss, rtol=loss_tol, atol=0)
    assert plain_grads.keys() == liger_grads.keys() and plain_grads
    worst = max(((liger_grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in plain_grads.items())
    assert worst < grad_tol, worst
