"""`vlora export`: merged folders match unquantized base + adapter on every model family, keep the base's tensor
names in either layout and its untouched tensors as stored, cast on request, refuse what they cannot merge, and a
plain adapter export round-trips through peft."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_lora_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlora import families
from vlora.errors import VloraError
from vlora.export import REL_TOLERANCE

# peft 0.21 asks transformers 5 for a renamed attribute when it loads an adapter; the notice is peft's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ALL_GROUPS = ["lora.targets=[llm_attn,llm_mlp,merger,vision_attn,vision_mlp]", "model.freeze_vision=false"]
RSLORA = ["lora.rslora=true", "lora.group_r=[merger=4]"]
# name -> (family of the tiny base, config overrides); each case's LoRA B, DoRA magnitudes and fully trained
# mergers get random values. "<family>-all" adapts every LoRA group the family has (Qwen2.5-VL's, with rsLoRA and a
# per-group rank, also stands for the merger-only and vision-only cases); "qwen3_vl-merger_full" trains the merger
# and both DeepStack mergers whole.
CASES = {
    "llm": ("qwen2_5_vl", ["lora.targets=[llm_attn,llm_mlp]", "lora.group_r=[llm_mlp=4]",
                           "lora.group_alpha=[llm_attn=8]"]),
    "dora": ("qwen2_5_vl", ["lora.targets=[llm_attn,vision_mlp]", "lora.dora=true", "model.freeze_vision=false"]),
    "merger_full": ("qwen2_5_vl", ["lora.targets=[llm_mlp]", "lora.train_merger_fully=true"]),
    **{f"{name}-all": (name, ALL_GROUPS + (RSLORA if name == "qwen2_5_vl" else [])) for name in families.NAMES},
    "qwen3_vl-merger_full": ("qwen3_vl", ["lora.targets=[llm_attn]", "lora.train_merger_fully=true"]),
}
# What a case must have changed in the merged file, beyond "every tensor the adapter names": for "-all", every group.
EXPECT = {"llm": "mlp.down_proj", "dora": "visual.blocks", "merger_full": "merger.ln_q",
          "qwen3_vl-merger_full": "deepstack_merger_list.1.norm"}
MERGER_TENSOR = re.compile(rf"\.?visual\.({families.all_mergers()})\.")  # a projector's tensor, in any layout


def tensor_specs(folder: Path) -> dict[str, tuple[str, tuple, str]]:
    """{tensor name: (shard file, shape, dtype)} of a safetensors model folder."""
    specs = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                specs[k] = (shard.name, tuple(s.get_shape()), s.get_dtype())
    return specs


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def in_memory(key: str) -> str:
    """A file tensor name as transformers 5 names the parameter in memory (Qwen2/2.5-VL files use the short one)."""
    return re.sub(r"^(model\.(?!language_model\.|visual\.)|visual\.)",
                  lambda m: "model.language_model." if m[1] == "model." else "model.visual.", key)


def groups_reached(family: str, keys) -> set[str]:
    """The LoRA groups of `family` whose modules own one of the file tensors `keys`."""
    names = {in_memory(k).removesuffix(".weight") for k in keys}
    return {g for g, rx in families.get(family).lora_targets.items() if any(re.fullmatch(rx, n) for n in names)}


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    """family -> its tiny model (seed 0, the session model's lm_head scale and rope_theta), built on first use;
    Qwen2.5-VL's is the session's own."""
    from vlora.tiny import build_tiny_model

    root, built = tmp_path_factory.mktemp("families"), {"qwen2_5_vl": tiny_model_dir}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(root / family, family=family, seed=0, lm_head_std=0.1, rope_theta=1e6)
        return built[family]

    return get


def perturbed_lora_model(model_dir: Path, *overrides: str):
    """tiny_lora_model, with DoRA magnitudes and modules_to_save copies moved off their init (W's row norms and W)."""
    model = tiny_lora_model(model_dir, *overrides)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in n:  # biases start at zero: add, not scale
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    """name -> a saved adapter folder, built on first use and shared by the module's tests."""
    root, built = tmp_path_factory.mktemp("adapters"), {}

    def get(name: str) -> Path:
        if name not in built:
            family, overrides = CASES[name]
            perturbed_lora_model(model_dirs(family), *overrides).save_pretrained(root / name)
            built[name] = root / name
        return built[name]

    return get


@pytest.fixture(scope="module")
def merged(adapters, tmp_path_factory):
    """name -> (merged folder, export's result) for the case's tiny base, exported once per module."""
    from vlora.export import export

    root, done = tmp_path_factory.mktemp("merged"), {}

    def get(name: str):
        if name not in done:
            done[name] = (root / name, export(adapters(name), root / name, merge=True))
        return done[name]

    return get


@pytest.fixture(scope="module")
def probes(model_dirs):
    """family -> (the export check's probe batches through that family's processor, the plain base's logits)."""
    from vlora.export import probe_inputs, run_probe
    from vlora.model import load_processor

    done = {}

    def get(family: str) -> tuple[list[dict], list[torch.Tensor]]:
        if family not in done:
            batches = probe_inputs(load_processor(str(model_dirs(family))))
            done[family] = batches, run_probe(lambda: load_plain(model_dirs(family)), batches, "cpu")
        return done[family]

    return get


def load_plain(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder)


@pytest.fixture(scope="module")
def other_layout_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny base as transformers 4.52-4.57 saved it (model.language_model.*, model.visual.*), in two shards
    with an index, so the merge's sharded path is exercised too."""
    out = tmp_path_factory.mktemp("other") / "tiny-other-layout"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    renamed = {}
    for k, v in load_file(tiny_model_dir / "model.safetensors").items():
        k = "model." + k if k.startswith("visual.") else "model.language_model." + k[6:] if k.startswith("model.") else k
        renamed[k] = v
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in renamed.items() if ".language_model." in k},
              "model-00002-of-00002.safetensors": {k: v for k, v in renamed.items() if ".language_model." not in k}}
    for name, part in shards.items():
        save_file(part, out / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in renamed.values())},
             "weight_map": {k: name for name, part in shards.items() for k in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_merged_matches_unquantized_base_plus_adapter(case, merged, adapters, model_dirs, probes):
    family, _ = CASES[case]
    base_dir = model_dirs(family)
    out, result = merged(case)
    assert result["tolerance"] == pytest.approx(REL_TOLERANCE[torch.float32] * max(1.0, result["max_logit"]))
    assert result["max_diff"] <= result["tolerance"], result  # export's own check: logits vs base + adapter
    assert result["max_diff_4bit"] is not None  # the 4-bit comparison ran (information only)
    assert result["layout"].startswith("hub")  # transformers 5 saves every family under the hub's names
    base, new = all_tensors(base_dir), all_tensors(out)
    assert base.keys() == new.keys()
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert len(changed) == result["merged"] + result["replaced"] > 0
    if case.endswith("-all"):
        assert groups_reached(family, changed) == set(families.get(family).lora_targets), sorted(changed)
    else:
        assert any(EXPECT[case] in k for k in changed), sorted(changed)
    if case.endswith("merger_full"):  # every projector (Qwen3-VL: merger and DeepStack mergers) replaced whole
        assert result["replaced"] == sum(bool(MERGER_TENSOR.search(k)) for k in base) > 0
    assert min((base[k] - new[k]).abs().max() for k in changed) > 1e-4
    # peft's own merge_and_unload on the unquantized base gives the same weights (DoRA's norm convention too).
    from peft import PeftModel

    from vlora.export import run_probe

    peft_merged = PeftModel.from_pretrained(load_plain(base_dir), str(adapters(case))).merge_and_unload().state_dict()
    model = load_plain(out)
    mine = model.state_dict()
    assert peft_merged.keys() == mine.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], peft_merged[k], rtol=1e-5, atol=1e-6, msg=k)
    del peft_merged, mine
    # The merge matters at the logits too, far beyond the tolerance: the check above could fail.
    batches, plain = probes(family)
    new_logits = run_probe(lambda: model, batches, "cpu")
    assert max(float((a - b).abs().max()) for a, b in zip(plain, new_logits)) > 100 * result["tolerance"]


def test_every_family_and_model_type_has_a_layout_and_the_rest_are_refused(adapters, tmp_path):
    from vlora.export import KEY_LAYOUTS, export, key_layout, qwen3_layout

    for name in families.NAMES:  # MoE model_types share their dense family's names (vlora.families says which)
        for model_type in families.get(name).model_types:
            assert key_layout({"model_type": model_type}) is KEY_LAYOUTS[name]
    assert {"qwen3_vl_moe", "qwen3_5_moe"} <= {t for n in families.NAMES for t in families.get(n).model_types}
    assert qwen3_layout({"model.norm.weight", "visual.merger.norm.weight"}).startswith("short")
    with pytest.raises(VloraError, match="base model_type 'llava' is not a family vlora knows") as err:
        key_layout({"model_type": "llava"})
    assert "\n" not in str(err.value)
    # LoRA on raw parameters (peft target_parameters, MoE experts) is refused, not merged as W + sBA.
    params = tmp_path / "params"
    shutil.copytree(adapters("llm"), params)
    config = json.loads((params / "adapter_config.json").read_text())
    (params / "adapter_config.json").write_text(json.dumps(dict(config, target_parameters=["mlp.experts.down_proj"])))
    with pytest.raises(VloraError, match="target_parameters"):
        export(params, tmp_path / "out", merge=True)


@pytest.fixture(scope="module")
def mtp_dir(model_dirs, tmp_path_factory) -> Path:
    """The tiny Qwen3.5 with multi-token-prediction weights (mtp.*, which loading skips) in a second bf16 shard,
    as hub Qwen3.5 checkpoints carry them, with an index."""
    out = tmp_path_factory.mktemp("mtp") / "tiny-qwen3.5-mtp"
    shutil.copytree(model_dirs("qwen3_5"), out)
    (out / "model.safetensors").rename(out / "model-00001-of-00002.safetensors")
    g = torch.Generator().manual_seed(3)
    mtp = {name: torch.randn(shape, generator=g).to(torch.bfloat16)
           for name, shape in (("mtp.fc.weight", (64, 128)), ("mtp.layers.0.self_attn.q_proj.weight", (128, 64)),
                               ("mtp.layers.0.mlp.down_proj.weight", (64, 128)), ("mtp.norm.weight", (64,)))}
    save_file(mtp, out / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    shards = {k: "model-00001-of-00002.safetensors" for k in tensor_specs(model_dirs("qwen3_5"))}
    index = {"metadata": {}, "weight_map": {**shards, **{k: "model-00002-of-00002.safetensors" for k in mtp}}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def test_qwen3_5_mtp_tensors_are_copied_byte_identical(mtp_dir, merged, adapters, tmp_path):
    from vlora.export import export

    out = tmp_path / "merged"
    result = export(adapters("qwen3_5-all"), out, base=mtp_dir, merge=True)
    assert result["max_diff"] <= result["tolerance"], result  # the folder loads (mtp.* skipped) and matches
    assert tensor_specs(out) == tensor_specs(mtp_dir)  # same names, shards, shapes and dtypes (bf16 stays bf16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((mtp_dir / "model.safetensors.index.json").read_text())["weight_map"]
    base, new = all_tensors(mtp_dir), all_tensors(out)
    mtp = [k for k in base if k.startswith("mtp.")]
    assert len(mtp) == 4
    for k in mtp:
        assert torch.equal(base[k].view(torch.uint8), new[k].view(torch.uint8)), k
    # the rest is exactly the merge without mtp.*: the extra shard changed nothing else
    plain, _ = merged("qwen3_5-all")
    assert all(torch.equal(v, new[k]) for k, v in all_tensors(plain).items())


# MoE model_type -> (its dense family, the text config's MoE fields at toy scale, the adapter's groups). Qwen3-VL-MoE
# files hold each layer's experts as two 3-D tensors, Qwen3.5-MoE's one 2-D tensor per expert and projection; no
# LoRA group reaches them (Qwen3.5-MoE's llm_mlp adapts the shared expert only).
MOE = {"qwen3_vl_moe": ("qwen3_vl", {}, "lora.targets=[llm_attn,merger,vision_attn]"),
       "qwen3_5_moe": ("qwen3_5", {"shared_expert_intermediate_size": 32}, "lora.targets=[llm_attn,llm_mlp,merger]")}


def tiny_moe_model(dense_dir: Path, out: Path, model_type: str, moe_fields: dict) -> Path:
    """The dense tiny model's config made MoE (4 experts, 2 per token), random weights, the dense processor."""
    from transformers import AutoConfig

    from vlora.tiny import init_model

    cfg = json.loads((dense_dir / "config.json").read_text())
    text = dict(cfg["text_config"], model_type=f"{model_type}_text", num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=24, **moe_fields)
    config = AutoConfig.for_model(**dict(cfg, model_type=model_type, text_config=text))
    shutil.copytree(dense_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    init_model(config, seed=0, lm_head_std=0.1).save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", list(MOE))
def test_moe_experts_are_copied_untouched(model_type, model_dirs, tmp_path):
    from vlora.export import export

    dense, moe_fields, targets = MOE[model_type]
    base_dir = tiny_moe_model(model_dirs(dense), tmp_path / "base", model_type, moe_fields)
    adapter = tmp_path / "adapter"
    perturbed_lora_model(base_dir, targets, "model.freeze_vision=false").save_pretrained(adapter)
    result = export(adapter, tmp_path / "out", merge=True)
    assert result["max_diff"] <= result["tolerance"], result  # the merged MoE loads and matches base + adapter
    assert result["layout"].startswith("hub")
    base, new = all_tensors(base_dir), all_tensors(tmp_path / "out")
    experts = [k for k in base if ".mlp.experts." in k or ".mlp.gate.weight" in k]  # experts and routers
    assert {base[k].dim() for k in experts if ".experts." in k} == {3 if model_type == "qwen3_vl_moe" else 2}
    assert experts and all(torch.equal(base[k].view(torch.uint8), new[k].view(torch.uint8)) for k in experts)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert len(changed) == result["merged"] > 0
    assert any(".shared_expert." in k for k in changed) == (model_type == "qwen3_5_moe")


def test_other_layout_keeps_names_shards_and_generates_like_base_plus_adapter(
        merged, adapters, other_layout_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vlora.export import export, probe_inputs

    # transformers 5 loads the other layout to the same weights
    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(other_layout_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    del a, b
    out_hub, res_hub = merged("llm")
    out_other = tmp_path / "other"
    res_other = export(adapters("llm"), out_other, base=other_layout_dir, merge=True)
    assert res_hub["layout"].startswith("hub") and res_other["layout"].startswith("in-memory")
    assert tensor_specs(out_hub) == tensor_specs(tiny_model_dir)
    assert tensor_specs(out_other) == tensor_specs(other_layout_dir)
    assert len({s for s, _, _ in tensor_specs(out_other).values()}) == 2
    index = json.loads((out_other / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((other_layout_dir / "model.safetensors.index.json").read_text())[
        "weight_map"]
    assert res_other["max_diff"] <= res_other["tolerance"]
    # Both merges hold the same values, under their own names.
    hub, other = all_tensors(out_hub), all_tensors(out_other)
    assert all(torch.equal(v, other["model.language_model." + k[6:] if k.startswith("model.") else
                                    "model." + k if k.startswith("visual.") else k]) for k, v in hub.items())
    # A user's greedy generation with an image: merged folder (plain transformers) == base + adapter (peft).
    processor = AutoProcessor.from_pretrained(out_other)
    inputs = probe_inputs(processor)[1]
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out_other).eval()
    mine = model.generate(**inputs, **gen)
    del model
    ref_model = PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir),
                                          str(adapters("llm"))).eval()
    ref = ref_model.generate(**inputs, **gen)
    assert mine.shape[1] == inputs["input_ids"].shape[1] + 8
    assert torch.equal(mine, ref)


def test_bf16_merge_casts_tensors_and_config_and_passes(merged, adapters, tmp_path):
    from vlora.export import REL_TOLERANCE, export

    out = tmp_path / "bf16"
    result = export(adapters("dora"), out, merge=True, dtype="bf16")
    assert result["dtype"] == "bfloat16"
    assert result["tolerance"] == pytest.approx(REL_TOLERANCE[torch.bfloat16] * max(1.0, result["max_logit"]))
    assert 0 < result["max_diff"] <= result["tolerance"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    fp32_out, _ = merged("dora")
    fp32, bf16 = all_tensors(fp32_out), all_tensors(out)
    assert fp32.keys() == bf16.keys()
    # merged in fp32, then rounded once: exactly the fp32 merge cast to bf16
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, fp32[k].to(torch.bfloat16)) for k, v in bf16.items())


def test_refuses_prequantized_base_and_adapter_keys_the_base_lacks(adapters, tiny_model_dir, tmp_path):
    from vlora.export import export

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(VloraError, match="not in the local hub cache"):  # a hub id is never downloaded
        export(adapters("llm"), tmp_path / "out0", base="nobody-here/no-such-model", merge=True)
    with pytest.raises(VloraError, match="pre-quantized \\(bitsandbytes\\)") as err:
        export(adapters("llm"), tmp_path / "out1", base=quantized, merge=True)
    assert "\n" not in str(err.value)

    stray = tmp_path / "stray"
    shutil.copytree(adapters("llm"), stray)
    tensors = load_file(stray / "adapter_model.safetensors")
    good = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    bad = "base_model.model.model.language_model.layers.7.self_attn.q_proj"
    for part in ("lora_A.weight", "lora_B.weight"):
        tensors[f"{bad}.{part}"] = tensors.pop(f"{good}.{part}")
    save_file(tensors, stray / "adapter_model.safetensors")
    for merge in (True, False):
        out = tmp_path / f"out-{merge}"
        with pytest.raises(VloraError, match=f"{bad}.lora_A.weight".replace(".", "\\.")) as err:
            export(stray, out, merge=merge)
        assert "\n" not in str(err.value)
        assert not any(out.iterdir())  # refused before anything was written


def test_cli_exits_1_when_the_check_fails(adapters, tmp_path, monkeypatch, capsys):
    import vlora.export as ex

    real = ex.merged_tensor

    def corrupt(op, weight, key):  # a merge bug in one tensor the probe reaches
        out = real(op, weight, key)
        return out + 0.05 if key == "model.layers.1.self_attn.o_proj.weight" else out

    monkeypatch.setattr(ex, "merged_tensor", corrupt)
    parser = argparse.ArgumentParser(prog="vlora")
    ex.add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", "--adapter", str(adapters("llm")), "--out", str(tmp_path / "out"), "--merge"])
    assert args.func(args) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("vlora: error:")]
    assert len(errors) == 1 and "above the tolerance" in errors[0], captured.err
    assert "FAILED" in captured.out


def test_adapter_export_is_a_clean_peft_folder(adapters, model_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor

    from vlora.export import export, processor_files

    # Qwen3-VL with its three projectors trained whole: the most modules_to_save a family has (Qwen2.5-VL's one
    # merger and LoRA names go through the same checks in every merged case)
    base_dir = model_dirs("qwen3_vl")
    src, out = adapters("qwen3_vl-merger_full"), tmp_path / "adapter"
    result = export(src, out, base=str(base_dir))
    assert result["max_diff"] == 0 and result["mode"] == "adapter"
    names = {p.name for p in processor_files(base_dir)}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
            "generation_config.json"} <= names
    assert {p.name for p in out.iterdir()} == names | {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    a, b = load_file(src / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert {m[0] for k in b if (m := MERGER_TENSOR.search(k))} == {
        ".visual.merger.", ".visual.deepstack_merger_list.0.", ".visual.deepstack_merger_list.1."}
    AutoProcessor.from_pretrained(out)
    model = PeftModel.from_pretrained(load_plain(base_dir), str(out))
    assert isinstance(model, PeftModel) and model.peft_config["default"].modules_to_save
