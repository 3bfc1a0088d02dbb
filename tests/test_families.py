"""The model-family matrix: what Qwen2.5-VL passes, every family's tiny model passes (vlora/families).

Cheap cases (in one process) run on all four families. The 2-rank runs (DDP, ZeRO-3 with one text-only rank; which
on which family: ENGINES below) and the exact resume run on the three families other than Qwen2.5-VL, which
tests/test_loop.py, tests/test_deepspeed.py and tests/test_elastic.py already cover.
"""

import io
import json

import pytest
import torch
from PIL import Image

from conftest import tiny_lora_model
from helpers import (
    REPO, adapter_weights, assert_same_run, plain_peft_logits, run_overrides, step_records, torchrun, train_in_process,
)
from vlora import families
from vlora.config import load_config
from vlora.errors import VloraError

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAMILIES = families.NAMES
OTHERS = [f for f in FAMILIES if f != families.DEFAULT]
ALL_GROUPS = "[llm_attn,llm_mlp,merger,vision_attn,vision_mlp]"


def image_sample(key: str, sizes, question="What colour is the circle?", answer="The circle is red.") -> dict:
    """A shard sample (as the stream yields it) with one image per size, each before the question."""
    sample = {"__key__": key}
    content = []
    for i, (w, h) in enumerate(sizes):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 20 + 40 * i, 10)).save(buf, "PNG")
        sample[f"{i}.png"] = buf.getvalue()
        content.append({"type": "image"})
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    sample["json"] = json.dumps({"messages": messages}).encode()
    return sample


SAMPLES = [image_sample("a", [(100, 70)]), image_sample("b", [(64, 130), (90, 90)], answer="Blue and green."),
           image_sample("c", [], question="What is two plus two?", answer="Four.")]


def collator(model_dir, **kwargs):
    from vlora.data.collate import Collator
    from vlora.model import load_processor

    return Collator(load_processor(str(model_dir)), min_pixels=3136, max_pixels=50_000, max_length=4096, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(tiny_models, family):
    return tiny_models(family)


def test_tiny_model_is_its_family_and_resizes_at_its_factor(model_dir, family):
    from transformers import AutoConfig

    from vlora.model import load_processor

    fam = families.of_model_path(model_dir)
    assert fam.name == family and AutoConfig.from_pretrained(model_dir).model_type == family
    processor = load_processor(str(model_dir))
    assert processor.image_processor.patch_size * processor.image_processor.merge_size == fam.resize_factor
    x = collator(model_dir).encode(image_sample("a", [(100, 70)]))
    factor = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32, "qwen3_5": 32}[family]
    h, w = round(70 / factor) * factor, round(100 / factor) * factor  # smart_resize, inside the pixel limits
    patch = factor // 2
    assert x["image_grid_thw"].tolist() == [[1, h // patch, w // patch]]
    assert x["pixel_values"].shape == (h * w // patch**2, 3 * 2 * patch * patch)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((x["input_ids"] == image_pad).sum()) == h * w // factor**2


def test_collate_positions_equal_the_familys_own_get_rope_index(model_dir):
    """vlora's per-sample positions, padded, equal the model's own get_rope_index on the padded batch."""
    from transformers import AutoModelForImageTextToText

    col = collator(model_dir)
    items = [col.encode(s) for s in SAMPLES]
    batch = col.collate(items)
    hf = AutoModelForImageTextToText.from_pretrained(model_dir)
    image_id = hf.config.image_token_id
    mm_types = (batch["input_ids"] == image_id).long()
    expected, _ = hf.model.get_rope_index(batch["input_ids"], mm_token_type_ids=mm_types,
                                          image_grid_thw=batch["image_grid_thw"],
                                          attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["position_ids"][:, mask], expected[:, mask])
    assert batch["image_grid_thw"].shape[0] == 3  # three images in two samples, one sample text-only


def test_pack_max_tokens_counts_exactly_what_the_collator_makes(model_dir, family, tmp_path):
    """`vlora pack --max-tokens --model` counts each sample's tokens at the family's resize factor: a sample of
    exactly the limit is kept, one token less rejects it."""
    from vlora.data.manifest import read_manifest
    from vlora.data.pack import pack

    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("wide", (300, 90)), ("odd", (517, 389))):
        Image.new("RGB", size, (30, 60, 90)).save(images / f"{name}.png")
    record = {"id": "r", "image": ["images/wide.png", "images/odd.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nCompare the two pictures."},
        # A box on the second image (517x389): written in its pixels, counted as the family will see it.
        {"from": "gpt", "value": "The first is wide, the second square <|box_start|>(60,30),(500,380)<|box_end|>."}]}
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps(record) + "\n")
    limits = {"min_pixels": 3136, "max_pixels": 50_000}
    pack(src, tmp_path / "probe", **limits)
    from webdataset import WebDataset

    sample = next(iter(WebDataset(str(next((tmp_path / "probe").glob("*.tar"))), shardshuffle=False)))
    n = collator(model_dir, boxes=families.get(family).boxes).encode(sample)["input_ids"].numel()
    kept = pack(src, tmp_path / "fits", max_tokens=n, model=model_dir, **limits)
    assert (kept.written, kept.rejected) == (1, 0)
    cut = pack(src, tmp_path / "over", max_tokens=n - 1, model=model_dir, **limits)
    assert (cut.written, cut.rejected, cut.rejects_by_reason) == (0, 1, {"too_many_tokens": 1})
    floors = read_manifest(tmp_path / "fits")["checks"]["max_pixels_floor"]
    assert set(floors) == {"28", "32"} and all(v > 0 for v in floors.values())


def test_packed_loss_equals_padded_or_packing_is_refused(model_dir, family, monkeypatch):
    """Packed rows give the padded batch's loss and gradients. Qwen3.5 on the CPU: its linear-attention layers
    would leak state between packed samples (shown), so data.pack_length is refused in one line."""
    from vlora.model import SupervisedLoss, build_model

    model = tiny_lora_model(model_dir)
    loss_model = SupervisedLoss(model)
    items = [collator(model_dir).encode(s) for s in SAMPLES]
    padded = collator(model_dir).collate(items)
    packed = collator(model_dir, pack_length=4096).collate(items)
    assert packed["input_ids"].shape[0] == 1
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = loss_model(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    if not families.get(family).linear_attention:
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-4)
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)
        return
    assert abs(losses[1] - losses[0]) > 1e-3  # the torch fallback carries the first sample's state into the next
    # Where the kernels exist, the samples share one row and the kernels get their boundaries.
    lengths = [x["input_ids"].numel() for x in items]
    bounded = collator(model_dir, pack_length=64, boundaries=True).collate(items)
    assert bounded["input_ids"].shape == (1, sum(lengths))
    assert bounded["cu_seq_lens_q"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert bounded["seq_idx"].tolist() == [[0] * lengths[0] + [1] * lengths[1] + [2] * lengths[2]]
    # The boundaries reach transformers' kernel wrappers, whose torch fallbacks refuse them (the kernels take them).
    with pytest.raises(ValueError, match="causal_conv1d_fn` can't keep packed sequences apart"):
        loss_model(bounded)
    with pytest.raises(ValueError, match="gated_delta_rule` can.t keep packed sequences apart"):
        loss_model({k: v for k, v in bounded.items() if k != "seq_idx"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # refused also where the kernels are installed
    cfg = load_config(None, [f"model.path={model_dir}", "data.pack_length=4096"])
    with pytest.raises(VloraError, match=r"^data.pack_length: Qwen3.5's linear-attention layers .* set "
                                         r"data.pack_length=0 or install them$"):
        build_model(cfg, torch.device("cpu"), torch.float32)


def test_boxes_reach_the_model_in_the_familys_convention(model_dir, family):
    """A box written in the image's pixels is what the model sees in its family's convention, computed here from
    the size the processor resized the image to; data.boxes=as_written (boxes=None) passes it untouched."""
    sample = image_sample("g", [(100, 70)], question="Where is the circle?",
                          answer="Here: <|box_start|>(10,20),(90,60)<|box_end|>")
    x = collator(model_dir, boxes=families.get(family).boxes).encode(sample)
    patch = families.get(family).patch_size
    _, h, w = (x["image_grid_thw"][0] * torch.tensor([1, patch, patch])).tolist()
    if family == "qwen2_5_vl":  # pixels of the resized image
        box = [round(10 * w / 100), round(20 * h / 70), round(90 * w / 100), round(60 * h / 70)]
    else:  # 0-1000 of the image
        box = [100, round(20 / 70 * 1000), 900, round(60 / 70 * 1000)]
    tok = collator(model_dir).tok
    answer = tok.decode(x["labels"][x["labels"] != -100])
    assert f"<|box_start|>({box[0]},{box[1]}),({box[2]},{box[3]})<|box_end|>" in answer, (answer, box)
    untouched = collator(model_dir).encode(sample)
    assert "<|box_start|>(10,20),(90,60)<|box_end|>" in tok.decode(untouched["labels"][untouched["labels"] != -100])


def test_pack_checks_boxes_and_size_keys_for_every_family(tmp_path, tiny_model_dir, demo_shards):
    """Without --model a pack serves every family: an image's own max_pixels must resize at 28 and 32 px per token;
    boxes must lie on their image unless packed --boxes as_written, which a data.boxes=original run then refuses."""
    from vlora.data.pack import pack
    from vlora.preflight import preflight

    Image.new("RGB", (60, 600)).save(tmp_path / "thin.png")
    Image.new("RGB", (100, 70)).save(tmp_path / "small.png")

    def record(image, text, **size):
        return json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "image": image, **size}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": text}]}]}) + "\n"

    # 60x600 under its own max_pixels 9000: 28 px wide at 28 px per token, zero wide at 32.
    (tmp_path / "a.jsonl").write_text(record("thin.png", "Here.", max_pixels=9000)
                                      + record("small.png", '[{"bbox_2d": [10, 20, 120, 60]}]'))
    summary = pack(tmp_path / "a.jsonl", tmp_path / "any")
    assert (summary.written, summary.rejects_by_reason) == (0, {"bad_aspect_ratio": 1, "bad_box": 1})
    kept = pack(tmp_path / "a.jsonl", tmp_path / "as_written", boxes="as_written", max_tokens=10_000,
                model=tiny_model_dir)  # Qwen2.5-VL's factor only; boxes not checked
    assert (kept.written, kept.rejected) == (2, 0)
    paths = [f"model.path={tiny_model_dir}", f"data.train={demo_shards / 'train'}",
             f"data.val={tmp_path / 'as_written'}", "data.num_workers=1", f"run.out_dir={tmp_path}"]
    with pytest.raises(VloraError, match=r"was packed with --boxes as_written .* set data.boxes=as_written"):
        preflight(load_config(None, paths))
    preflight(load_config(None, [*paths, "data.boxes=as_written"]))


@pytest.mark.gpu
def test_qwen3_5_packed_loss_equals_padded_with_the_fused_kernels(tiny_models):
    pytest.importorskip("fla")
    pytest.importorskip("causal_conv1d")
    model_dir = tiny_models("qwen3_5")
    from vlora.model import SupervisedLoss

    model = tiny_lora_model(model_dir).cuda()
    loss_model = SupervisedLoss(model)
    items = [collator(model_dir).encode(s) for s in SAMPLES]
    packed = collator(model_dir, pack_length=4096, boundaries=True).collate(items)
    batches = [collator(model_dir).collate(items), packed]
    losses = [loss_model({k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}) for b in batches]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-3)


def test_every_lora_group_finds_modules_and_trains(model_dir, family):
    """All five groups (vision unfrozen): each adapts modules of this family, and every LoRA tensor gets a non-zero
    gradient from a batch with images; a text-only batch still reaches every one (the idle vision pass)."""
    from vlora.model import SupervisedLoss, check_all_trainable_get_grads, describe_lora

    model = tiny_lora_model(model_dir, f"lora.targets={ALL_GROUPS}", "model.freeze_vision=false")
    counts = {line.split(":")[0].removeprefix("lora "): int(line.split(": ")[1].split()[0])
              for line in describe_lora(model)}
    # (llm_attn, llm_mlp, merger, vision_attn, vision_mlp) modules: 2 decoder layers (Qwen3-VL 3) and 2 vision blocks;
    # Qwen3.5's layer 0 is linear attention (5 projections), layer 1 full attention (4); Qwen3-VL has 3 mergers.
    expected = {"qwen2_vl": (8, 6, 2, 4, 4), "qwen2_5_vl": (8, 6, 2, 4, 6), "qwen3_vl": (12, 9, 6, 4, 4),
                "qwen3_5": (9, 6, 2, 4, 4)}[family]
    assert counts == dict(zip(ALL_GROUPS[1:-1].split(","), expected))
    col = collator(model_dir)
    _, grads = check_all_trainable_get_grads(SupervisedLoss(model), col.collate([col.encode(s) for s in SAMPLES]))
    mergers = {n.split(".visual.")[1].split(".linear_fc")[0].split(".mlp")[0] for n in grads if ".visual.merger" in n
               or "deepstack_merger_list" in n}
    assert mergers == ({"merger", "deepstack_merger_list.0", "deepstack_merger_list.1"} if family == "qwen3_vl"
                       else {"merger"})
    text_only = col.collate([col.encode(SAMPLES[2])])
    model.zero_grad(set_to_none=True)
    SupervisedLoss(model)(text_only).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_merger_trained_fully_and_the_adapter_loads_with_plain_peft(model_dir, tmp_path):
    """lora.train_merger_fully (Qwen3-VL: its DeepStack mergers too) trains, is saved, and plain
    PeftModel.from_pretrained gives the logits of vlora's own model."""
    from vlora.model import SupervisedLoss, full_logits, save_adapter

    model = tiny_lora_model(model_dir, "lora.targets=[llm_attn,llm_mlp]", "lora.train_merger_fully=true")
    col = collator(model_dir)
    batch = col.collate([col.encode(s) for s in SAMPLES[:2]])
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    SupervisedLoss(model)(batch).backward()
    optim.step()  # the merger copies move away from the base's merger
    save_adapter(model, tmp_path / "adapter")
    ours = full_logits(model.eval(), batch)
    base, loaded = plain_peft_logits(model_dir, tmp_path / "adapter", batch)
    torch.testing.assert_close(loaded, ours, rtol=1e-4, atol=1e-4)
    assert (loaded - base).abs().max() > 1e-2


def test_moe_llm_mlp_is_refused_in_one_line_and_attention_trains(tmp_path):
    """Qwen3-VL-MoE: the experts are 3-D parameters that LoRA and 4-bit cannot reach; llm_mlp is refused, the
    rest trains (4-bit attention, the mergers), and the experts stay in the compute dtype."""
    import bitsandbytes as bnb
    from transformers import Qwen3VLMoeConfig

    from vlora.model import SupervisedLoss, build_model, check_all_trainable_get_grads
    from vlora.tiny import _save, build_config, build_processor, init_model

    processor = build_processor(family="qwen3_vl")
    dense = build_config(processor.tokenizer, 1e6, "qwen3_vl").to_dict()
    dense["text_config"].update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(**{k: v for k, v in dense.items() if k not in ("model_type", "architectures")})
    _save(init_model(config, lm_head_std=0.1), processor, tmp_path / "moe", "# tiny MoE\n")
    cfg = load_config(None, [f"model.path={tmp_path / 'moe'}", "lora.dropout=0"])
    with pytest.raises(VloraError, match=r"^lora.targets llm_mlp: this Qwen3-VL MoE model's experts are 3-D "
                                         r"parameters.*; drop it from lora.targets$"):
        build_model(cfg, torch.device("cpu"), torch.float32)
    cfg = load_config(None, [f"model.path={tmp_path / 'moe'}", "lora.dropout=0", "lora.targets=[llm_attn,merger]"])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    hf = model.get_base_model()
    assert isinstance(hf.model.language_model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert hf.model.language_model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    col = collator(tmp_path / "moe")
    _, grads = check_all_trainable_get_grads(SupervisedLoss(model), col.collate([col.encode(s) for s in SAMPLES[:2]]))
    assert any("deepstack_merger_list" in n for n in grads) and not any("experts" in n for n in grads)


# ---- runs: 2 ranks (DDP, and ZeRO-3 with a text-only rank), exact resume ----------------------------------------

RUN = {"data.val": "", "run.log_every": 1, "optim.lr": 2e-3, "optim.warmup_steps": 1, "run.plot": "false",
       "optim.max_steps": 4, "optim.global_batch": 4, "optim.micro_batch": 2, "lora.targets": "[llm_attn,llm_mlp]",
       "lora.train_merger_fully": "true",
       "run.precision": "fp32"}


# Each family keeps one 2-rank run; ZeRO-3 (with a text-only rank) where the vision tower or decoder differs most from
# Qwen2.5-VL's: Qwen3-VL's DeepStack mergers, which the idle vision pass must gather in step, and Qwen3.5's hybrid
# decoder. Qwen2-VL's tower has Qwen2.5-VL's structure, and DDP is the same code for every family; the rest of the
# matrix would add a torchrun launch (~40 s here) per case.
ENGINES = {"qwen2_vl": ["ddp"], "qwen3_vl": ["ddp", "zero3"], "qwen3_5": ["zero3"]}


@pytest.mark.slow
@pytest.mark.parametrize("family", OTHERS)
def test_two_ranks_with_a_text_only_rank_equal_one_process(tiny_models, family, mixed_shards, demo_shards, tmp_path,
                                                          monkeypatch):
    """On the mixed set (rank 0 reads only text, rank 1 only images), 2-rank DDP / ZeRO-3 give the losses of one
    process with two readers, and its adapter (ZeRO-3 must run the idle vision pass in step)."""
    model_dir = tiny_models(family)
    data = {"data.train": mixed_shards}
    engines = {"ddp": {}, "zero3": {"run.engine": "deepspeed", "run.deepspeed_config": "ds_configs/zero3.json"}}
    for engine in ENGINES[family]:
        overrides = {**RUN, **data, **engines[engine], "run.name": engine}
        torchrun(run_overrides(model_dir, demo_shards, tmp_path, **overrides))
    train_in_process(monkeypatch, model_dir, demo_shards, tmp_path, **RUN, **data, **{
        "run.name": "one", "data.num_workers": 2})
    if "ddp" in ENGINES[family]:
        # An Adam step of an element whose gradient is near 0 can move by ~1e-5 with the summation order (seen: 2.5e-5
        # on 1 of 65,536 elements); the mean difference stays below 1e-7.
        assert_same_run(tmp_path / "ddp", tmp_path / "one", steps=4, rtol=1e-5, atol=1e-4)
    if "zero3" in ENGINES[family]:
        # ZeRO-3 sums the gradients in another order: an Adam step of an element whose gradient is near 0 may differ
        # by a fraction of the learning rate (2e-3); the mean difference stays tight.
        assert_same_run(tmp_path / "zero3", tmp_path / "one", steps=4, rtol=1e-4, atol=1e-3, mean_atol=1e-5)


@pytest.mark.parametrize("family", OTHERS)
def test_resume_repeats_the_uninterrupted_run_exactly(tiny_models, family, demo_shards, tmp_path, monkeypatch):
    """Resumed from its step-2 checkpoint, a run's steps 3-4 and its adapter equal the uninterrupted run's, bit for
    bit (LoRA dropout on, so the RNG state matters)."""
    model_dir = tiny_models(family)
    cfg = {**RUN, "lora.dropout": 0.1, "run.save_every": 2}
    train_in_process(monkeypatch, model_dir, demo_shards, tmp_path, **cfg, **{"run.name": "whole"})
    train_in_process(monkeypatch, model_dir, demo_shards, tmp_path, **cfg, **{
        "run.name": "resumed", "run.resume": tmp_path / "whole" / "step_00000002"})
    whole, resumed = step_records(tmp_path / "whole"), step_records(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s]["loss"] for s in (3, 4)] == [whole[s]["loss"] for s in (3, 4)]
    for k, w in adapter_weights(tmp_path / "whole").items():
        assert torch.equal(w, adapter_weights(tmp_path / "resumed")[k]), k


def test_family_facts_agree_with_transformers():
    """Each family's patch size is its config class's default for every model_type it covers, and the packer's
    resize factors are the families'."""
    from transformers import AutoConfig

    from vlora.data.pack import RESIZE_FACTORS

    for name in FAMILIES:
        fam = families.get(name)
        for model_type in fam.model_types:
            assert AutoConfig.for_model(model_type).vision_config.patch_size == fam.patch_size, model_type
            assert families.get(model_type) is fam
    assert sorted({families.get(n).resize_factor for n in FAMILIES}) == list(RESIZE_FACTORS)
    with pytest.raises(VloraError, match="^model_type 'llava' is not a family vlora knows"):
        families.get("llava")


HUB_CONFIGS = sorted((REPO / "recipes" / "hub_configs").glob("*.json"))


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=[p.stem for p in HUB_CONFIGS])
def test_lora_groups_cover_every_linear_of_the_published_checkpoints(path):
    """On each published architecture (built by transformers on the meta device), every nn.Linear but lm_head and a
    MoE gate is in one LoRA group, and each group holds what the config says: 4 projections per full-attention
    layer and 5 per Gated DeltaNet layer; 3 per dense MLP or shared expert (routed experts are 3-D parameters, no
    modules); 2 per vision block's attention, 2 or 3 per its MLP; 2 per merger, DeepStack's included."""
    import collections
    import re

    import transformers

    config = json.loads(path.read_text())
    family = families.of_config(config)
    cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(config))
    found, left = collections.Counter(), set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            groups = [g for g, pattern in family.lora_targets.items() if re.fullmatch(pattern, name)]
            assert len(groups) <= 1, (name, groups)
            found.update(groups) if groups else left.add(re.sub(r"\.\d+\.", ".N.", name))
    assert left <= {"lm_head", "model.language_model.layers.N.mlp.shared_expert_gate"}, left

    text, vision = config.get("text_config", config), config["vision_config"]
    layers = text["num_hidden_layers"]
    kinds = text.get("layer_types") or ["full_attention"] * layers
    if text.get("num_experts"):
        step, dense_only = text.get("decoder_sparse_step") or 1, set(text.get("mlp_only_layers") or [])
        dense = sum(i in dense_only or (i + 1) % step != 0 for i in range(layers))
        mlps = dense + (layers - dense if text.get("shared_expert_intermediate_size") else 0)
    else:
        mlps = layers
    expected = {
        "llm_attn": sum(5 if kind == "linear_attention" else 4 for kind in kinds),
        "llm_mlp": 3 * mlps,
        "vision_attn": 2 * vision["depth"],
        "vision_mlp": (3 if family.name == "qwen2_5_vl" else 2) * vision["depth"],  # SwiGLU / fc1, fc2
        "merger": 2 * (1 + len(vision.get("deepstack_visual_indexes") or [])),
    }
    assert dict(found) == {g: n for g, n in expected.items() if n}
