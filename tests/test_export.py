"""`vlora export`: merged folders match unquantized base + adapter, keep the base's tensor names in either layout,
cast on request, refuse what they cannot merge, and a plain adapter export round-trips through peft."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_lora_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlora.errors import VloraError
from vlora.export import REL_TOLERANCE

# peft 0.21 asks transformers 5 for a renamed attribute when it loads an adapter; the notice is peft's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# name -> config overrides; each case's LoRA B, DoRA magnitudes and fully trained merger get random values.
CASES = {
    "llm": ["lora.targets=[llm_attn,llm_mlp]", "lora.group_r=[llm_mlp=4]", "lora.group_alpha=[llm_attn=8]"],
    "merger": ["lora.targets=[merger]"],
    "vision": ["lora.targets=[vision_attn,vision_mlp]", "model.freeze_vision=false"],
    "rslora": ["lora.targets=[llm_attn,merger]", "lora.rslora=true", "lora.group_r=[merger=4]"],
    "dora": ["lora.targets=[llm_attn,vision_mlp]", "lora.dora=true", "model.freeze_vision=false"],
    "merger_full": ["lora.targets=[llm_mlp]", "lora.train_merger_fully=true"],
}


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


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """name -> a saved adapter folder, built on first use and shared by the module's tests."""
    root, built = tmp_path_factory.mktemp("adapters"), {}

    def get(name: str) -> Path:
        if name not in built:
            model = tiny_lora_model(tiny_model_dir, *CASES[name])
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # at init the magnitudes are W's row norms and the merger copy is W: move both
                for n, p in model.named_parameters():
                    if "lora_magnitude_vector" in n:
                        p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
                    elif "modules_to_save" in n:  # biases start at zero: add, not scale
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
            model.save_pretrained(root / name)
            built[name] = root / name
        return built[name]

    return get


@pytest.fixture(scope="module")
def merged(adapters, tmp_path_factory):
    """name -> (merged folder, export's result) for the tiny base, exported once per module."""
    from vlora.export import export

    root, done = tmp_path_factory.mktemp("merged"), {}

    def get(name: str):
        if name not in done:
            done[name] = (root / name, export(adapters(name), root / name, merge=True))
        return done[name]

    return get


@pytest.fixture(scope="module")
def probes(tiny_model_dir):
    from vlora.export import probe_inputs
    from vlora.model import load_processor

    return probe_inputs(load_processor(str(tiny_model_dir)))


def logits_of(folder: Path, probes) -> list[torch.Tensor]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlora.export import run_probe

    return run_probe(lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(folder), probes, "cpu")


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
def test_merged_matches_unquantized_base_plus_adapter(case, merged, adapters, tiny_model_dir, probes):
    out, result = merged(case)
    assert result["tolerance"] == pytest.approx(REL_TOLERANCE[torch.float32] * max(1.0, result["max_logit"]))
    assert result["max_diff"] <= result["tolerance"], result
    assert result["max_diff_4bit"] is not None  # the 4-bit comparison ran (information only)
    base, new = all_tensors(tiny_model_dir), all_tensors(out)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert len(changed) == result["merged"] + result["replaced"] > 0
    expect = {"llm": "mlp.down_proj", "merger": "merger.mlp", "vision": "visual.blocks", "rslora": "self_attn",
              "dora": "visual.blocks", "merger_full": "merger.ln_q"}[case]
    assert any(expect in k for k in changed), sorted(changed)
    assert min((base[k] - new[k]).abs().max() for k in changed) > 1e-4
    # peft's own merge_and_unload on the unquantized base gives the same weights (DoRA's norm convention too).
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    peft_merged = PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir),
                                            str(adapters(case))).merge_and_unload().state_dict()
    mine = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).state_dict()
    assert peft_merged.keys() == mine.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], peft_merged[k], rtol=1e-5, atol=1e-6, msg=k)
    del peft_merged, mine
    # The merge matters at the logits too, far beyond the tolerance: the check above could fail.
    plain, new_logits = logits_of(tiny_model_dir, probes), logits_of(out, probes)
    assert max(float((a - b).abs().max()) for a, b in zip(plain, new_logits)) > 100 * result["tolerance"]


def test_other_layout_keeps_names_shards_and_generates_like_base_plus_adapter(
        merged, adapters, other_layout_dir, tiny_model_dir, tmp_path, probes):
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


def test_adapter_export_is_a_clean_peft_folder(adapters, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vlora.export import export, processor_files

    src, out = adapters("merger_full"), tmp_path / "adapter"
    result = export(src, out, base=str(tiny_model_dir))
    assert result["max_diff"] == 0 and result["mode"] == "adapter"
    names = {p.name for p in processor_files(tiny_model_dir)}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
            "generation_config.json"} <= names
    assert {p.name for p in out.iterdir()} == names | {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    a, b = load_file(src / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert any(".visual.merger.mlp.0.weight" in k for k in b)
    AutoProcessor.from_pretrained(out)
    model = PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir), str(out))
    assert isinstance(model, PeftModel) and model.peft_config["default"].modules_to_save
