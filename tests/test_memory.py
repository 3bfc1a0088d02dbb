"""vlora.memory: parameter counts against real models (the tiny model of every family built here, the tiny MoE
variants, transformers' own classes at full size, the published sizes), activations against what autograd really
saves, and ZeRO's division of the terms."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO
from vlora.config import load_config
from vlora.memory import GiB, ModelShape, estimate, param_counts, read_shape

HUB = REPO / "recipes" / "hub_configs"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory, tiny_model_dir):
    """family -> its tiny model folder (vlora.tiny), each built once for this module; qwen2_5_vl is the session's."""
    from vlora.tiny import build_tiny_model

    built = {"qwen2_5_vl": tiny_model_dir}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp("tiny") / f"tiny-{family}", family=family, seed=0)
        return built[family]

    return get


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """model_type -> a tiny MoE model folder (config.json and weights): the dense family's tiny config with 4 experts
    of width 32, top-2; Qwen3.5-MoE also gets a shared expert of width 32 and no dense MLP."""
    import transformers

    from vlora import families
    from vlora.tiny import build_config, build_tokenizer

    tokenizer = build_tokenizer()
    built = {}

    def get(model_type: str):
        if model_type not in built:
            dense = build_config(tokenizer, 10.0, families.get(model_type).name).to_dict()
            text = {k: v for k, v in dense.pop("text_config").items() if k != "model_type"} | MOE
            if model_type == "qwen3_5_moe":
                del text["intermediate_size"]
                text["shared_expert_intermediate_size"] = 32
            vision = {k: v for k, v in dense.pop("vision_config").items() if k != "model_type"}
            ids = {k: dense[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")}
            name = {"qwen3_vl_moe": "Qwen3VLMoe", "qwen3_5_moe": "Qwen3_5Moe"}[model_type]
            config = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision,
                                                            tie_word_embeddings=False, **ids)
            torch.manual_seed(0)
            model = getattr(transformers, f"{name}ForConditionalGeneration")(config).float()
            built[model_type] = tmp_path_factory.mktemp("moe") / model_type
            model.save_pretrained(built[model_type])
        return built[model_type]

    return get


# (hub config, published size in billions, as precise as published; sources in recipes/README.md): the hub pages'
# figures, and for Qwen3.5 the model cards' 27B and 35B (the hub files also hold a multi-token-prediction layer,
# mtp.*, which transformers does not load and vlora.memory does not count).
PUBLISHED = [("Qwen2.5-VL-3B-Instruct", 3.75), ("Qwen2.5-VL-7B-Instruct", 8.29), ("Qwen2.5-VL-32B-Instruct", 33.45),
             ("Qwen2.5-VL-72B-Instruct", 73.41), ("Qwen2-VL-7B-Instruct", 8.29), ("Qwen3-VL-8B-Instruct", 8.77),
             ("Qwen3-VL-32B-Instruct", 33.4), ("Qwen3-VL-30B-A3B-Instruct", 31.07), ("Qwen3.5-27B", 27),
             ("Qwen3.5-35B-A3B", 35)]


@pytest.mark.parametrize("name, billions", PUBLISHED, ids=[n for n, _ in PUBLISHED])
def test_public_checkpoints_have_their_published_sizes(name, billions):
    """The published parameter counts from the architecture numbers alone."""
    counts = param_counts(read_shape(HUB / f"{name}.json"), load_config(None, []))
    digits = len(str(billions).partition(".")[2])
    assert round((counts["quantized"] + counts["unquantized"]) / 1e9, digits) == billions


@pytest.mark.parametrize("name", [n for n, _ in PUBLISHED])
def test_counts_are_transformers_models_at_full_size(name):
    """Every parameter, and the LLM's nn.Linear weights (what bitsandbytes quantizes), of the published architecture
    built by transformers itself on the meta device (no memory): experts, DeepStack mergers, linear attention."""
    import transformers

    config = json.loads((HUB / f"{name}.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(config))
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if type(m) is torch.nn.Linear and ".language_model." in f".{n}.")
    counts = param_counts(read_shape(HUB / f"{name}.json"), load_config(None, []))
    assert (counts["quantized"], counts["quantized"] + counts["unquantized"]) == (
        linears, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_both_config_json_layouts_give_the_same_shape(family_model, family):
    """transformers 5 writes the text fields under text_config; the published Qwen2/2.5-VL files have them at the
    top."""
    nested = json.loads((family_model(family) / "config.json").read_text())
    flat = nested["text_config"] | {k: v for k, v in nested.items() if k != "text_config"}  # model_type: the top's
    assert "text_config" in nested and ModelShape.from_config(flat) == ModelShape.from_config(nested)


def real_counts(model_dir, cfg) -> dict:
    """What is stored in 4 bit, what in the compute dtype and what trains, counted in the model vlora builds."""
    import bitsandbytes as bnb

    from vlora.model import apply_lora, load_base_model

    base = load_base_model(cfg, torch.device("cpu"), torch.float32)
    quantized = sum(m.in_features * m.out_features for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    unquantized = sum(p.numel() for p in base.parameters() if not isinstance(p, bnb.nn.Params4bit))
    model = apply_lora(base, cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"quantized": quantized, "unquantized": unquantized, "trained": trained}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("overrides", [
    [],
    ["model.freeze_vision=false", "lora.targets=llm_attn,merger,vision_attn,vision_mlp", "lora.group_r=vision_mlp=4",
     "lora.dora=true"],
    ["lora.targets=llm_mlp", "lora.train_merger_fully=true", "model.quantize_vision=true", "model.double_quant=false"],
], ids=["default", "vision-dora-group-r", "merger-fully-quantized-vision"])
def test_counts_are_the_tiny_models(family_model, family, overrides):
    cfg = load_config(None, [f"model.path={family_model(family)}", *overrides])
    assert param_counts(read_shape(family_model(family)), cfg) == real_counts(family_model(family), cfg)


@pytest.mark.parametrize("model_type, overrides", [
    ("qwen3_vl_moe", ["lora.targets=llm_attn,merger"]),
    ("qwen3_vl_moe", ["lora.targets=llm_attn", "lora.train_merger_fully=true", "model.quantize_vision=true",
                      "model.freeze_vision=false"]),
    ("qwen3_5_moe", []),
    ("qwen3_5_moe", ["lora.targets=llm_mlp,vision_mlp", "model.freeze_vision=false", "lora.dora=true",
                     "model.double_quant=false"]),
], ids=["qwen3_vl_moe", "qwen3_vl_moe-merger-fully", "qwen3_5_moe", "qwen3_5_moe-shared-expert-dora"])
def test_moe_counts_are_the_tiny_moe_models(moe_model, model_type, overrides):
    """The routed experts (3-D parameters, no Linear) stay in the compute dtype and never train; llm_mlp adapts only
    Qwen3.5-MoE's shared expert."""
    cfg = load_config(None, [f"model.path={moe_model(model_type)}", *overrides])
    shape = read_shape(moe_model(model_type))
    assert (shape.moe_layers, shape.experts, shape.moe_intermediate) == (shape.layers, 4, 32)  # every layer MoE
    assert param_counts(shape, cfg) == real_counts(moe_model(model_type), cfg)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dropout", ["0", "0.05"])
def test_activations_are_what_autograd_saves(family_model, family, dropout):
    """The per-token, per-layer count against the bytes autograd keeps in a real forward of the tiny model (fp32):
    every tensor saved for backward, each storage once. The loss keeps 4 of the logits term's 12 bytes x V (the
    fp32 log-probabilities; the other 8 are backward's transients). Qwen3.5's Gated DeltaNet layers are fitted,
    not counted (vlora.memory._linear_attention_values)."""
    from vlora.model import build_model

    cfg = load_config(None, [f"model.path={family_model(family)}", f"lora.dropout={dropout}", "run.precision=fp32",
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
    est = estimate(read_shape(family_model(family)), cfg)
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


def test_moe_experts_stay_in_the_compute_dtype():
    """Qwen3-VL-30B-A3B: 4-bit reaches only attention (~0.9B weights); the 29B expert weights stay bf16 (~54 GiB),
    which is why its recipe needs an 80 GiB GPU."""
    shape = read_shape(HUB / "Qwen3-VL-30B-A3B-Instruct.json")
    est = estimate(shape, load_config(None, ["run.precision=bf16", "lora.targets=llm_attn,merger"]))
    assert (shape.moe_layers, shape.experts, shape.experts_per_token) == (48, 128, 8)
    assert est.unquantized > 55 * GiB > 1 * GiB > est.base_4bit


def test_checkpointing_and_micro_batch_move_the_activations():
    shape = read_shape(HUB / "Qwen2.5-VL-7B-Instruct.json")
    plain = estimate(shape, load_config(None, ["optim.micro_batch=1"]))
    ckpt = estimate(shape, load_config(None, ["optim.micro_batch=1", "model.gradient_checkpointing=true"]))
    double = estimate(shape, load_config(None, ["optim.micro_batch=2", "model.gradient_checkpointing=true"]))
    assert ckpt.activations < plain.activations / 10
    assert double.activations == 2 * ckpt.activations and double.logits == 2 * ckpt.logits
    assert plain.summary().startswith(f"{plain.total / GiB:.1f} GiB per GPU = base 4-bit ")
