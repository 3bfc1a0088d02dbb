"""LoRA placement by component group, per-group rank/alpha, rsLoRA, DoRA, freezing, a fully trained merger,
starting from an earlier adapter, per-component learning rates, gradient checkpointing and the quantization modes.

Every model here is the tiny 4-bit Qwen2.5-VL (2 LLM layers, 2 vision blocks) with LoRA B randomised, so that
every adapter changes the output and every LoRA tensor gets a non-zero gradient.
"""

import logging

import bitsandbytes as bnb
import pytest
import torch
import webdataset as wds
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from conftest import tiny_lora_model
from vlora.config import OptimArgs, load_config
from vlora.data.collate import Collator
from vlora.data.manifest import shard_paths
from vlora.errors import VloraError
from vlora.model import (
    SupervisedLoss, build_model, check_all_trainable_get_grads, full_logits, load_base_model, load_processor,
    save_adapter, set_gradient_checkpointing,
)
from vlora.optim import build_optimizer, describe_param_groups, set_lr

# peft 0.21 reads an attribute transformers 5 renamed (when plain peft loads an adapter).
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

LAYERS = BLOCKS = range(2)
EXPECTED = {  # the modules each group must wrap, and no others
    "llm_attn": {f"model.language_model.layers.{i}.self_attn.{m}" for i in LAYERS for m in ("q_proj", "k_proj",
                                                                                             "v_proj", "o_proj")},
    "llm_mlp": {f"model.language_model.layers.{i}.mlp.{m}" for i in LAYERS for m in ("gate_proj", "up_proj",
                                                                                      "down_proj")},
    "merger": {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"},
    "vision_attn": {f"model.visual.blocks.{i}.attn.{m}" for i in BLOCKS for m in ("qkv", "proj")},
    "vision_mlp": {f"model.visual.blocks.{i}.mlp.{m}" for i in BLOCKS for m in ("gate_proj", "up_proj", "down_proj")},
}
ALL_GROUPS = ["lora.targets=llm_attn,llm_mlp,merger,vision_attn,vision_mlp", "model.freeze_vision=false"]


@pytest.fixture(scope="module")
def image_batch(tiny_model_dir, demo_shards):
    collator = Collator(load_processor(str(tiny_model_dir)), min_pixels=3136, max_pixels=12544, max_length=512)
    samples = list(wds.WebDataset(shard_paths(demo_shards / "val"), shardshuffle=False, empty_check=False))[:2]
    batch = collator.collate([collator.encode(s) for s in samples])
    assert batch["pixel_values"].shape[0] > 0
    return batch


def lora_modules(peft_model) -> dict[str, LoraLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def trainable(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("group", list(EXPECTED))
def test_each_group_alone_sits_where_it_should_and_trains(tiny_model_dir, image_batch, group):
    model = tiny_lora_model(tiny_model_dir, f"lora.targets={group}", "model.freeze_vision=false")
    assert set(lora_modules(model)) == EXPECTED[group]
    names = trainable(model)
    assert names and all("lora_" in n for n in names)
    assert all(any(f".{m}.lora_" in n for m in EXPECTED[group]) for n in names)
    loss, grads = check_all_trainable_get_grads(SupervisedLoss(model), image_batch)  # raises on a None/zero grad
    assert set(grads) == set(names) and torch.isfinite(loss)


def test_per_group_rank_and_alpha_and_rslora_land_in_the_modules(tiny_model_dir, tmp_path):
    groups = ["lora.targets=llm_attn,merger,vision_attn", "model.freeze_vision=false",
              "lora.group_r=merger=8,vision_attn=4", "lora.group_alpha=merger=4"]
    model = tiny_lora_model(tiny_model_dir, *groups)
    want = {"llm_attn": (16, 32, 32 / 16), "merger": (8, 4, 4 / 8), "vision_attn": (4, 32, 32 / 4)}
    modules = lora_modules(model)
    for group, (r, alpha, scale) in want.items():
        for name in EXPECTED[group]:
            m = modules[name]
            assert (m.r["default"], m.lora_alpha["default"]) == (r, alpha), name
            assert m.scaling["default"] == pytest.approx(scale)
            assert m.lora_A["default"].weight.shape[0] == r == m.lora_B["default"].weight.shape[1]
    # The patterns travel in adapter_config.json: plain peft rebuilds the same ranks.
    save_adapter(model, tmp_path / "a")
    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    restored = lora_modules(PeftModel.from_pretrained(load_base_model(cfg, torch.device("cpu"), torch.float32),
                                                      str(tmp_path / "a")))
    assert {n: m.r["default"] for n, m in restored.items()} == {n: m.r["default"] for n, m in modules.items()}

    rs = lora_modules(tiny_lora_model(tiny_model_dir, *groups, "lora.rslora=true"))
    for group, (r, alpha, _) in want.items():
        assert all(rs[n].scaling["default"] == pytest.approx(alpha / r ** 0.5) for n in EXPECTED[group])


def test_dora_on_4bit_and_full_precision_layers_trains_its_magnitudes(tiny_model_dir, image_batch):
    model = tiny_lora_model(tiny_model_dir, "lora.targets=llm_attn,merger", "lora.dora=true")
    modules = lora_modules(model)
    assert isinstance(modules["model.language_model.layers.0.self_attn.q_proj"].get_base_layer(), bnb.nn.Linear4bit)
    assert all(m.use_dora["default"] for m in modules.values())
    magnitudes = {n: p for n, p in trainable(model).items() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(modules) and all(p.ndim == 1 for p in magnitudes.values())
    loss_model = SupervisedLoss(model)
    loss, grads = check_all_trainable_get_grads(loss_model, image_batch)
    before = {n: p.detach().clone() for n, p in magnitudes.items()}
    opt = build_optimizer(model, OptimArgs(lr=1e-2, warmup_steps=0), torch.device("cpu"))
    set_lr(opt, 1e-2)
    loss_model(image_batch).backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in magnitudes.items())
    assert loss_model(image_batch).item() < loss.item()


def test_optimizer_groups_carry_component_lr_and_no_decay_on_vectors(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir, "lora.targets=llm_attn,vision_mlp", "model.freeze_vision=false",
                            "lora.train_merger_fully=true", "lora.dora=true")
    o = OptimArgs(lr_llm=1.0, lr_merger=10.0, lr_vision=0.1, weight_decay=0.05)
    opt = build_optimizer(model, o, torch.device("cpu"))
    set_lr(opt, 1e-3)
    want = {"llm": (1e-3, 0.05), "llm/no_decay": (1e-3, 0.0), "merger": (1e-2, 0.05),
            "merger/no_decay": (1e-2, 0.0), "vision": (1e-4, 0.05), "vision/no_decay": (1e-4, 0.0)}
    got = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert got.keys() == want.keys()
    for name, (lr, wd) in want.items():
        assert got[name] == (pytest.approx(lr), wd)
    # Every trainable tensor is in exactly one group, the one its name and shape say.
    group_of = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    params = trainable(model)
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups) == len(params)
    for name, p in params.items():
        component = "merger" if ".visual.merger." in name else "vision" if ".visual." in name else "llm"
        assert group_of[id(p)] == (component if p.ndim >= 2 else f"{component}/no_decay"), name
    assert any("lora_magnitude_vector" in n and group_of[id(p)] == "llm/no_decay" for n, p in params.items())
    assert any(n.endswith("merger.modules_to_save.default.mlp.0.bias") for n in params)
    line = describe_param_groups(opt)
    assert "merger: " in line and "lr x10 wd 0.05" in line and "vision/no_decay" in line and "\n" not in line


def test_frozen_components_get_nothing_and_a_frozen_tower_records_no_graph(tiny_model_dir, image_batch):
    """Projector-only stage: the LLM frozen, LoRA on the merger only. The vision blocks run without a graph."""
    model = tiny_lora_model(tiny_model_dir, "lora.targets=merger", "model.freeze_llm=true",
                            "model.gradient_checkpointing=true")
    assert all(".visual.merger." in n for n in trainable(model))
    base = model.get_base_model()
    seen = {}
    visual = base.model.visual
    hooks = [visual.blocks[-1].register_forward_hook(lambda m, a, out: seen.update(blocks=out.requires_grad)),
             visual.merger.register_forward_hook(lambda m, a, out: seen.update(merger=out.requires_grad))]
    check_all_trainable_get_grads(SupervisedLoss(model), image_batch)
    for h in hooks:
        h.remove()
    assert seen == {"blocks": False, "merger": True}


def test_merger_trained_fully_is_saved_and_restored_by_plain_peft(tiny_model_dir, image_batch, tmp_path):
    model = tiny_lora_model(tiny_model_dir, "lora.targets=llm_attn", "lora.train_merger_fully=true")
    wrapper = model.get_base_model().model.visual.merger
    full = {n: p for n, p in trainable(model).items() if "lora_" not in n}
    assert sorted(n.split("modules_to_save.default.")[1] for n in full) == [
        "ln_q.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    assert all(p.dtype == torch.float32 for p in full.values())
    opt = build_optimizer(model, OptimArgs(lr=1e-2, warmup_steps=0), torch.device("cpu"))
    set_lr(opt, 1e-2)
    SupervisedLoss(model)(image_batch).backward()
    opt.step()
    trained = wrapper.modules_to_save["default"].mlp[0].weight.detach().clone()
    assert not torch.equal(trained, wrapper.original_module.mlp[0].weight)
    save_adapter(model, tmp_path / "adapter")

    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    restored = PeftModel.from_pretrained(load_base_model(cfg, torch.device("cpu"), torch.float32),
                                         str(tmp_path / "adapter"))
    assert torch.equal(restored.get_base_model().model.visual.merger.modules_to_save["default"].mlp[0].weight,
                       trained)
    model.eval()
    torch.testing.assert_close(full_logits(restored, image_batch), full_logits(model, image_batch))
    model.train()


def test_projector_only_stage_with_a_fully_trained_merger(tiny_model_dir, tmp_path):
    """No LoRA group at all: peft's placeholder target lets the adapter hold only the merger; plain peft loads it."""
    model = tiny_lora_model(tiny_model_dir, "lora.targets=[]", "lora.train_merger_fully=true", "model.freeze_llm=true")
    assert not lora_modules(model) and all(".visual.merger." in n for n in trainable(model))
    save_adapter(model, tmp_path / "a")
    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    PeftModel.from_pretrained(load_base_model(cfg, torch.device("cpu"), torch.float32), str(tmp_path / "a"))


def _build(tiny_model_dir, *overrides):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "lora.dropout=0", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, torch.device("cpu"), torch.float32).train()


def test_init_from_loads_shared_groups_and_starts_new_ones_fresh(tiny_model_dir, image_batch, tmp_path):
    stage1 = tiny_lora_model(tiny_model_dir, "lora.targets=merger", "model.freeze_llm=true")
    save_adapter(stage1, tmp_path / "stage1")
    fresh = lora_modules(_build(tiny_model_dir, "lora.targets=llm_attn,merger"))

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger, level = logging.getLogger("vlora"), logging.getLogger("vlora").level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        stage2 = _build(tiny_model_dir, "lora.targets=llm_attn,merger", f"lora.init_from={tmp_path / 'stage1'}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    line = next(r.getMessage() for r in records if "lora.init_from" in r.getMessage())
    assert "loaded merger (4 tensors)" in line and "new, at their init: llm_attn (16 tensors)" in line

    s1, s2 = lora_modules(stage1), lora_modules(stage2)
    for name in EXPECTED["merger"]:
        for part in ("lora_A", "lora_B"):
            assert torch.equal(getattr(s2[name], part)["default"].weight, getattr(s1[name], part)["default"].weight)
    for name in EXPECTED["llm_attn"]:
        assert torch.equal(s2[name].lora_A["default"].weight, fresh[name].lora_A["default"].weight)
        assert not torch.count_nonzero(s2[name].lora_B["default"].weight)  # B = 0: the model starts as stage 1 ended
    stage1.eval(), stage2.eval()
    torch.testing.assert_close(full_logits(stage2, image_batch), full_logits(stage1, image_batch))

    # A DoRA stage from a plain LoRA one: the magnitudes are recomputed, so the function is kept too.
    dora = _build(tiny_model_dir, "lora.targets=merger", "lora.dora=true", f"lora.init_from={tmp_path / 'stage1'}")
    torch.testing.assert_close(full_logits(dora.eval(), image_batch), full_logits(stage1, image_batch))
    stage1.train()


def test_init_from_refuses_other_ranks_and_dropping_trained_weights(tiny_model_dir, tmp_path):
    save_adapter(tiny_lora_model(tiny_model_dir, "lora.targets=merger,llm_attn"), tmp_path / "a")
    with pytest.raises(VloraError, match=r"lora.init_from .* has shape \(16, 256\), this run's has \(8, 256\); give "
                                         r"merger the rank it had"):
        _build(tiny_model_dir, "lora.targets=merger,llm_attn", "lora.group_r=merger=8",
               f"lora.init_from={tmp_path / 'a'}")
    with pytest.raises(VloraError, match=r"has 16 tensor\(s\) this run does not train \(llm_attn;"):
        _build(tiny_model_dir, "lora.targets=merger", f"lora.init_from={tmp_path / 'a'}")


def test_gradient_checkpointing_gives_every_group_the_same_loss_and_gradients(tiny_model_dir, image_batch):
    """USERS.md #5: with checkpointing on (LLM layers and vision blocks), every LoRA group still gets its gradient,
    equal to the one without checkpointing; dropout included (the recompute replays the same random mask)."""
    model = tiny_lora_model(tiny_model_dir, *ALL_GROUPS, "model.gradient_checkpointing=true", "lora.dropout=0.1")
    base = model.get_base_model()
    calls = {"vision": 0, "llm": 0}
    def counter(key):
        return lambda *args: calls.update({key: calls[key] + 1})

    hooks = [base.model.visual.blocks[0].attn.qkv.register_forward_hook(counter("vision")),
             base.model.language_model.layers[0].mlp.up_proj.register_forward_hook(counter("llm"))]
    loss_model = SupervisedLoss(model)
    torch.manual_seed(1)
    loss_ckpt, grads_ckpt = check_all_trainable_get_grads(loss_model, image_batch)
    assert calls == {"vision": 2, "llm": 2}  # forward + recompute in backward: checkpointing is really on
    set_gradient_checkpointing(base, False)
    torch.manual_seed(1)
    loss, grads = check_all_trainable_get_grads(loss_model, image_batch)
    assert calls == {"vision": 3, "llm": 3}
    for h in hooks:
        h.remove()
    groups = {g: [n for n in grads if any(f".{m}.lora_" in n for m in EXPECTED[g])] for g in EXPECTED}
    assert all(groups.values())  # every group is among the checked tensors
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, four_bit", [
    (["model.quant=fp4"], 14), (["model.quant=none"], 0),
    (["model.quantize_vision=true", "model.freeze_vision=false", "lora.targets=llm_attn,vision_attn,merger"], 14 + 10),
])
def test_quantization_modes_load_and_train_a_step(tiny_model_dir, image_batch, overrides, four_bit):
    model = tiny_lora_model(tiny_model_dir, *overrides)
    base = model.get_base_model()
    four = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four) == four_bit
    assert not any(".merger." in n for n in four) and base.lm_head.weight.dtype == torch.float32
    if "model.quant=fp4" in overrides:
        assert {m.weight.quant_type for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)} == {"fp4"}
    loss_model = SupervisedLoss(model)
    opt = build_optimizer(model, OptimArgs(lr=1e-2, warmup_steps=0), torch.device("cpu"))
    set_lr(opt, 1e-2)
    loss, _ = check_all_trainable_get_grads(loss_model, image_batch)
    loss_model(image_batch).backward()
    opt.step()
    assert loss_model(image_batch).item() < loss.item()


def test_bf16_compute_keeps_the_fully_trained_merger_in_fp32(tiny_model_dir, image_batch):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "lora.targets=llm_attn", "lora.train_merger_fully=true"])
    model = build_model(cfg, torch.device("cpu"), torch.bfloat16).train()
    merger = model.get_base_model().model.visual.merger
    assert merger.modules_to_save["default"].mlp[0].weight.dtype == torch.float32
    assert merger.original_module.mlp[0].weight.dtype == torch.bfloat16
    batch = dict(image_batch, pixel_values=image_batch["pixel_values"].bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SupervisedLoss(model)(batch)
    loss.backward()
    assert torch.count_nonzero(merger.modules_to_save["default"].mlp[0].weight.grad)
