"""vlora.memory: parameter counts against real models (the tiny one built here, the published sizes), activations
against what autograd really saves, and ZeRO's division of the terms."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO
from vlora.config import load_config
from vlora.memory import GiB, ModelShape, estimate, param_counts, read_shape

HUB = REPO / "recipes" / "hub_configs"


@pytest.mark.parametrize("name, billions", [("3B", 3.75), ("7B", 8.29), ("32B", 33.45), ("72B", 73.41)])
def test_public_checkpoints_have_their_published_sizes(name, billions):
    """The published parameter counts (3.75B, 8.29B, 33.5B, 73.4B) from the architecture numbers alone."""
    counts = param_counts(read_shape(HUB / f"Qwen2.5-VL-{name}-Instruct.json"), load_config(None, []))
    assert round((counts["quantized"] + counts["unquantized"]) / 1e9, 2) == billions


def test_both_config_json_layouts_give_the_same_shape(tiny_model_dir):
    """transformers 5 writes the text fields under text_config; the published files have them at the top."""
    nested = json.loads((tiny_model_dir / "config.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "text_config"} | nested["text_config"]
    assert "text_config" in nested and ModelShape.from_config(flat) == ModelShape.from_config(nested)


@pytest.mark.parametrize("overrides", [
    [],
    ["model.freeze_vision=false", "lora.targets=llm_attn,merger,vision_attn,vision_mlp", "lora.group_r=vision_mlp=4",
     "lora.dora=true"],
    ["lora.targets=llm_mlp", "lora.train_merger_fully=true", "model.quantize_vision=true", "model.double_quant=false"],
], ids=["default", "vision-dora-group-r", "merger-fully-quantized-vision"])
def test_counts_are_the_tiny_models(tiny_model_dir, overrides):
    """What is stored in 4 bit, what in the compute dtype and what trains, counted in the built model."""
    import bitsandbytes as bnb

    from vlora.model import apply_lora, load_base_model

    cfg = load_config(None, [f"model.path={tiny_model_dir}", *overrides])
    base = load_base_model(cfg, torch.device("cpu"), torch.float32)
    quantized = sum(m.in_features * m.out_features for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    unquantized = sum(p.numel() for p in base.parameters() if not isinstance(p, bnb.nn.Params4bit))
    model = apply_lora(base, cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert param_counts(read_shape(tiny_model_dir), cfg) == {
        "quantized": quantized, "unquantized": unquantized, "trained": trained}


@pytest.mark.parametrize("dropout", ["0", "0.05"])
def test_activations_are_what_autograd_saves(tiny_model_dir, dropout):
    """The per-token, per-layer count against the bytes autograd keeps in a real forward of the tiny model (fp32):
    every tensor saved for backward, each storage once. The loss keeps 4 of the logits term's 12 bytes x V (the
    fp32 log-probabilities; the other 8 are backward's transients)."""
    from vlora.model import build_model

    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"lora.dropout={dropout}", "run.precision=fp32",
                             "optim.micro_batch=2", "data.max_length=256"])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"), torch.float32).train()
    hf = model.get_base_model()
    ids = torch.randint(0, hf.config.text_config.vocab_size - 30, (2, 256))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = hf.model(input_ids=ids, use_cache=False).last_hidden_state
        logits = hf.lm_head(hidden.reshape(-1, hidden.shape[-1]))
        F.cross_entropy(logits.float(), ids.reshape(-1), reduction="sum")
    est = estimate(read_shape(tiny_model_dir), cfg)
    assert sum(saved.values()) == pytest.approx(est.activations + est.logits / 3, rel=0.1)


def test_zero_divides_what_its_stage_partitions():
    shape = read_shape(HUB / "Qwen2.5-VL-7B-Instruct.json")
    cfg = load_config(None, ["run.precision=bf16", "model.gradient_checkpointing=true"])
    ddp = estimate(shape, cfg, world_size=8)
    zero2 = estimate(shape, cfg, world_size=8, zero_stage=2)
    zero3 = estimate(shape, cfg, world_size=8, zero_stage=3)
    offload = estimate(shape, cfg, world_size=8, zero_stage=3, offload_optimizer=True, offload_params=True)
    assert (zero2.base_4bit, zero2.unquantized) == (ddp.base_4bit, ddp.unquantized)  # ZeRO-2 keeps the base whole
    assert zero3.base_4bit == pytest.approx(ddp.base_4bit / 8, abs=1) and zero3.unquantized == pytest.approx(
        ddp.unquantized / 8, abs=1)
    assert ddp.trained == 16 * ddp.trained_params  # fp32 weight + gradient + two AdamW moments
    assert zero3.trained < zero2.trained < ddp.trained
    assert offload.base_4bit == offload.unquantized == 0 and offload.trained < zero3.trained
    assert zero3.working > zero2.working  # the gathered layers
    assert ddp.activations == zero3.activations and ddp.logits == zero3.logits  # per micro-batch, never divided


def test_checkpointing_and_micro_batch_move_the_activations():
    shape = read_shape(HUB / "Qwen2.5-VL-7B-Instruct.json")
    plain = estimate(shape, load_config(None, ["optim.micro_batch=1"]))
    ckpt = estimate(shape, load_config(None, ["optim.micro_batch=1", "model.gradient_checkpointing=true"]))
    double = estimate(shape, load_config(None, ["optim.micro_batch=2", "model.gradient_checkpointing=true"]))
    assert ckpt.activations < plain.activations / 10
    assert double.activations == 2 * ckpt.activations and double.logits == 2 * ckpt.logits
    assert plain.summary().startswith(f"{plain.total / GiB:.1f} GiB per GPU = base 4-bit ")
