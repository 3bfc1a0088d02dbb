"""`vlora export`: a trained adapter as a clean PEFT folder, or merged into the base's own weights; checked after.

Without --merge the folder holds adapter_config.json (naming the base), adapter_model.safetensors and the base's
processor files: `AutoProcessor.from_pretrained(out)` + `PeftModel.from_pretrained(base, out)` just work.

With --merge, LoRA (W + scale * B @ A, DoRA's magnitude applied per output row) and a fully trained merger
(peft's modules_to_save) go into the base's unquantized weights, shard by shard, under the base file's own tensor
names and shard names, so the folder loads like the base did and peak memory is about one shard. Tensors the adapter
does not touch (Qwen3.5's mtp.* layers, MoE experts) are copied as stored. A base that is itself pre-quantized is
refused: merging into 4-bit weights would bake their rounding into every adapted tensor. Every vlora family
(vlora.families) is exported; KEY_LAYOUTS says how each one's files name their tensors.

Every export is checked: what was written is loaded and run on a probe (one text-only prompt, one with an image),
and its logits are compared with the unquantized base + the source adapter (peft, unmerged) in the same dtype.
Above the tolerance the export fails (`cmd_export` exits 1). The default tolerance is relative to the largest
|logit| of the reference (at least 1): REL_TOLERANCE[dtype] x max(1, max|logit|), with fp32 1e-4, fp16 1e-2,
bf16 5e-2. In fp32 a merge only reorders rounding (the tiny test model: ~1e-6 of its logit scale). In fp16 / bf16
every merged weight is rounded once more, to 11 / 8 significant bits (up to 0.05 % / 0.4 % per weight); through a
deep model that shows as logit differences of order 1 % of the logit scale at the worst position and vocabulary
entry (the 2-layer test model in bf16: 1.6 %), so bf16 gets 5 % and fp16, 8x finer, 1 %. A real merge error (a
wrong scale, layer or transpose) typically moves logits far more. These bounds are estimates, not measured on a
full-size model; --tolerance sets an absolute bound instead. The difference from the 4-bit base + adapter (what
the run trained) is printed for information only: 4-bit rounding alone moves logits well beyond these bounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from vlora.config import looks_like_hub_id
from vlora.errors import VloraError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Default tolerance as a fraction of max(1, max |reference logit|); see the module docstring for why these values.
REL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."  # peft's prefix of every saved adapter tensor name
# A base folder's files that are not "processor files": weights in any format, their indexes, the model config
# (written separately), the model card (it describes the base, not this export) and hidden files (.gitattributes).
NOT_PROCESSOR = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx",
                 "*.index.json", "config.json", "README*", ".*")


class VerificationFailed(VloraError):
    """The exported folder's logits differ from base + adapter by more than the tolerance (`vlora export` exits 1)."""


# ---- tensor names: in-memory / peft module names -> the base file's tensor names, per model family ----

# transformers >= 4.52 names the Qwen-VL modules model.language_model.* and model.visual.* in memory (peft's adapter
# names follow; adapters from transformers < 4.52 use model.*, visual.*). What a base FILE calls them depends on the
# family: Qwen2-VL / Qwen2.5-VL files (the hub's, transformers 5's) keep the original model.*, visual.*, while
# transformers 4.52-4.57 saved the in-memory names; Qwen3-VL and Qwen3.5 (and their MoE variants) came after the
# rename, so their hub files and transformers 5 use the in-memory names. Each part's possible file prefixes: trying
# all of them lets any adapter naming meet any base naming.
_QWEN_VL_PREFIXES = {"llm": ("model.", "model.language_model."), "visual": ("visual.", "model.visual.")}
_INNER_PREFIXES = ("model.language_model.", "model.visual.")


def qwen_vl_file_key(name: str, file_keys: set[str] | dict) -> str | None:
    """The base file's name for parameter `name` (either naming), whichever layout the file uses; None if absent."""
    for prefix, part in (("model.language_model.", "llm"), ("model.visual.", "visual"), ("visual.", "visual"),
                         ("model.", "llm")):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return next((p + rest for p in _QWEN_VL_PREFIXES[part] if p + rest in file_keys), None)
    return name if name in file_keys else None  # lm_head.weight: the same in every layout


def qwen_vl_layout(file_keys) -> str:
    """Qwen2-VL / Qwen2.5-VL: which of the two names this family's files have had."""
    if any(k.startswith(_INNER_PREFIXES) for k in file_keys):
        return "in-memory names (model.language_model.*, model.visual.*: transformers 4.52-4.57)"
    return "hub names (model.*, visual.*)"


def qwen3_layout(file_keys) -> str:
    """Qwen3-VL / Qwen3.5 (+ MoE): the hub's names are the in-memory ones; the short ones were never written."""
    if any(k.startswith(_INNER_PREFIXES) for k in file_keys):
        return "hub names (model.language_model.*, model.visual.*, as in memory)"
    return "short names (model.*, visual.*; not how the hub or transformers write this family)"


class KeyLayout(NamedTuple):
    file_key: Callable[[str, set], str | None]
    describe: Callable[[set], str]


# By vlora family (vlora.families.NAMES): the family module says which model_types it covers (a MoE variant's files
# name their attention, vision tower and mergers as the dense model's do), this table only how its files are named.
# Tensors no adapter names (Qwen3.5's mtp.* layers, MoE experts and routers) need no name: they are copied as stored.
KEY_LAYOUTS = {"qwen2_vl": KeyLayout(qwen_vl_file_key, qwen_vl_layout),
               "qwen2_5_vl": KeyLayout(qwen_vl_file_key, qwen_vl_layout),
               "qwen3_vl": KeyLayout(qwen_vl_file_key, qwen3_layout),
               "qwen3_5": KeyLayout(qwen_vl_file_key, qwen3_layout)}


# ---- inputs ----


def resolve_base(base: str) -> Path:
    """A local folder, or a hub id already in the local hub cache: an export never downloads."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if looks_like_hub_id(base):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(base, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any cache miss reads the same to the user
            raise VloraError(f"base '{base}' is not a folder and not in the local hub cache "
                             f"({type(e).__name__}); download it first (hf download {base}) or pass --base DIR") from None
    raise VloraError(f"base '{base}' is not a folder; pass --base DIR")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VloraError(f"cannot read {path}: {e}") from None


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter's tensors; refuses what the merge does not implement."""
    from safetensors.torch import load_file

    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise VloraError(f"adapter folder '{adapter_dir}' needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                         "(a PEFT adapter saved with safetensors, e.g. runs/NAME/adapter)")
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise VloraError(f"adapter '{adapter_dir}' is peft_type {config.get('peft_type')}; only LORA is exported")
    # target_parameters: LoRA on raw parameters (peft's ParamWrapper, e.g. MoE experts), whose delta is per expert
    # and transposed in hub files; vlora never trains it, and a W + sBA merge would be wrong.
    for flag in ("fan_in_fan_out", "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters"):
        if config.get(flag):
            raise VloraError(f"adapter '{adapter_dir}' sets {flag}, which vlora export does not handle")
    return config, load_file(adapter_dir / ADAPTER_WEIGHTS)


def split_adapter(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """({module: {"A", "B", "m"}}, {parameter name: trained copy}) under the adapter's own (in-memory) names."""
    saved = [re.escape(m) for m in config.get("modules_to_save") or []]
    full_re = re.compile(rf"(.*\.)?({'|'.join(saved)})\.") if saved else None
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    kinds = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        kind = next((k for k in kinds if name.endswith(k)), None)
        if kind is not None:
            lora.setdefault(name[:-len(kind)], {})[kinds[kind]] = value
        elif full_re is not None and full_re.match(name):
            # peft saves modules_to_save copies under the original names; older versions kept the wrapper's path.
            full[name.replace(".modules_to_save.default.", ".")] = value
        else:
            raise VloraError(f"adapter tensor {key} is neither LoRA A/B/magnitude nor a modules_to_save weight; "
                             "vlora export cannot merge it")
    for module, parts in lora.items():
        if "A" not in parts or "B" not in parts:
            raise VloraError(f"adapter module {module} lacks lora_A or lora_B")
    return lora, full


def lora_scale(config: dict, module: str, rank: int) -> float:
    """peft's own scale for `module`: per-module r/alpha via its pattern lookup, alpha/sqrt(r) with rsLoRA."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config["lora_alpha"])
    if r != rank:
        raise VloraError(f"adapter module {module}: lora_A has rank {rank} but adapter_config.json gives r={r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# ---- the base folder ----


def base_shards(base_dir: Path) -> tuple[dict[str, str], dict | None]:
    """({tensor name: shard file}, the index or None) of a safetensors base, single-file or sharded."""
    from safetensors import safe_open

    if (base_dir / INDEX_FILE).is_file():
        index = read_json(base_dir / INDEX_FILE)
        return dict(index["weight_map"]), index
    if (base_dir / SINGLE_FILE).is_file():
        with safe_open(base_dir / SINGLE_FILE, "pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}, None
    raise VloraError(f"base '{base_dir}' has neither {INDEX_FILE} nor {SINGLE_FILE}; vlora export needs "
                     "safetensors weights")


def key_layout(base_config: dict) -> KeyLayout:
    """The base's tensor-name layout, found through its family (vlora.families knows every model_type)."""
    from vlora import families

    try:
        family = families.of_config(base_config)  # every model_type a family covers (MoE variants too)
    except VloraError as e:  # an unknown model_type: the message names the known families
        raise VloraError(f"base {e}") from None
    if family.name not in KEY_LAYOUTS:
        raise VloraError(f"model family '{family.name}' has no tensor-name layout in vlora.export.KEY_LAYOUTS "
                         f"(known: {', '.join(KEY_LAYOUTS)})")
    return KEY_LAYOUTS[family.name]


def config_dtype(base_config: dict) -> torch.dtype:
    """The dtype config.json declares (top level, else the text config's); float32 when it names none."""
    for cfg in (base_config, base_config.get("text_config") or {}):
        for field in ("dtype", "torch_dtype"):
            if isinstance(cfg.get(field), str) and hasattr(torch, cfg[field]):
                return getattr(torch, cfg[field])
    return torch.float32


def set_config_dtype(cfg: dict, dtype: torch.dtype) -> bool:
    """Every dtype / torch_dtype field (nested configs too) set to `dtype`; True if any changed or was added."""
    name = str(dtype).removeprefix("torch.")

    def visit(node: dict) -> tuple[bool, bool]:
        found = changed = False
        for key, value in node.items():
            if key in ("dtype", "torch_dtype") and isinstance(value, str):
                found, changed = True, changed or value != name
                node[key] = name
            elif isinstance(value, dict):
                f, c = visit(value)
                found, changed = found or f, changed or c
        return found, changed

    found, changed = visit(cfg)
    if not found:
        cfg["dtype"] = name
    return changed or not found


def processor_files(base_dir: Path) -> list[Path]:
    """Everything at the top of the base folder that is not weights, an index, config.json or the README."""
    return sorted(p for p in base_dir.iterdir()
                  if p.is_file() and not any(p.match(pattern) for pattern in NOT_PROCESSOR))


# ---- merging ----


class Op(NamedTuple):
    """What becomes of one base tensor: LoRA merged into it (A, B, scale, DoRA magnitude) or replaced (`full`)."""
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scale: float = 0.0
    magnitude: torch.Tensor | None = None
    full: torch.Tensor | None = None
    source: str = ""  # the adapter's name for it, for messages


def merge_plan(adapter_config: dict, tensors: dict, file_keys: dict, layout: KeyLayout) -> dict[str, Op]:
    """{base file tensor name: Op}; an adapter target the base does not hold is an error naming it."""
    lora, full = split_adapter(adapter_config, tensors)
    plan: dict[str, Op] = {}

    def target(name: str, adapter_key: str) -> str:
        key = layout.file_key(name, file_keys)
        if key is None:
            raise VloraError(f"adapter tensor {adapter_key} targets {name}, which the base's weights do not hold "
                             "(under any known layout); is --base the model this adapter was trained on?")
        if key in plan:
            raise VloraError(f"adapter adapts {name} twice (LoRA and modules_to_save)")
        return key

    for module, parts in sorted(lora.items()):
        op = Op(A=parts["A"], B=parts["B"], magnitude=parts.get("m"), source=module,
                scale=lora_scale(adapter_config, module, parts["A"].shape[0]))
        plan[target(module + ".weight", f"{PEFT_PREFIX}{module}.lora_A.weight")] = op
    for name, value in sorted(full.items()):
        plan[target(name, PEFT_PREFIX + name)] = Op(full=value, source=name)
    return plan


def merged_tensor(op: Op, weight: torch.Tensor, key: str) -> torch.Tensor:
    """The new fp32 value of base tensor `key`, as peft's own merge computes it."""
    if op.full is not None:
        if op.full.shape != weight.shape:
            raise VloraError(f"adapter's {op.source} has shape {tuple(op.full.shape)}, the base's {key} "
                             f"{tuple(weight.shape)}")
        return op.full.float()
    delta = op.scale * (op.B.float() @ op.A.float())
    if delta.shape != weight.shape:
        raise VloraError(f"adapter's {op.source} LoRA gives shape {tuple(delta.shape)}, the base's {key} has "
                         f"{tuple(weight.shape)}")
    merged = weight.float() + delta
    if op.magnitude is not None:
        # DoRA (peft's Linear.merge): rescale each output row of W + sBA to the trained magnitude; the row norm
        # is taken over the input features, of the updated weight.
        merged = merged * (op.magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
    return merged


def write_merged(base_dir: Path, out_dir: Path, plan: dict[str, Op], shard_of: dict[str, str],
                 index: dict | None, dtype: torch.dtype | None) -> list[str]:
    """The base's shards, one at a time, with the planned tensors merged; same names, shards and index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    total, written = 0, []
    for shard in sorted(set(shard_of.values())):
        out: dict[str, torch.Tensor] = {}
        with safe_open(base_dir / shard, "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                # `auto` keeps each tensor's own dtype; a chosen dtype applies to floating tensors only.
                to = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                if key in plan:
                    tensor = merged_tensor(plan[key], tensor, key)
                # Every other tensor (frozen weights, Qwen3.5's mtp.* layers that loading skips, MoE experts in
                # whatever layout the file has) is written as read: under `auto`, the same bytes.
                out[key] = tensor.to(to).contiguous()
        (out_dir / shard).parent.mkdir(parents=True, exist_ok=True)
        save_file(out, out_dir / shard, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in out.values())
        written.append(shard)
        del out  # the next shard's tensors replace this one's: peak memory is about one shard
    if index is not None:
        index = dict(index, metadata={**(index.get("metadata") or {}), "total_size": total})
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(INDEX_FILE)
    return written


def copy_processor_files(base_dir: Path, out_dir: Path) -> list[str]:
    names = []
    for path in processor_files(base_dir):
        shutil.copy2(path, out_dir / path.name)  # follows the hub cache's symlinks: the folder stands alone
        names.append(path.name)
    return names


def export_merged(base_dir: Path, out_dir: Path, adapter_config: dict, tensors: dict, base_config: dict,
                  dtype: torch.dtype | None) -> dict:
    """Write the merged folder; returns {"files", "layout", "merged", "replaced"}."""
    if base_config.get("quantization_config"):
        method = base_config["quantization_config"].get("quant_method", "quantized")
        raise VloraError(f"base '{base_dir}' is pre-quantized ({method}); merge into the unquantized model "
                         "(pass --base with its original weights) or export without --merge")
    layout = key_layout(base_config)
    shard_of, index = base_shards(base_dir)
    plan = merge_plan(adapter_config, tensors, shard_of, layout)  # every error before anything is written
    files = write_merged(base_dir, out_dir, plan, shard_of, index, dtype)
    config = json.loads(json.dumps(base_config))
    if dtype is not None:
        set_config_dtype(config, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files += ["config.json", *copy_processor_files(base_dir, out_dir)]
    return {"files": files, "layout": layout.describe(shard_of), "merged": sum(op.full is None for op in plan.values()),
            "replaced": sum(op.full is not None for op in plan.values())}


def export_adapter(base_dir: Path, base: str, out_dir: Path, adapter_config: dict, tensors: dict,
                   base_config: dict) -> dict:
    """Write the clean PEFT folder; the adapter's targets are checked against the base's weights first."""
    from safetensors.torch import save_file

    layout = key_layout(base_config)
    shard_of, _ = base_shards(base_dir)
    plan = merge_plan(adapter_config, tensors, shard_of, layout)
    config = dict(adapter_config, base_model_name_or_path=base, inference_mode=True)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, *copy_processor_files(base_dir, out_dir)]
    return {"files": files, "layout": layout.describe(shard_of), "merged": 0, "replaced": 0,
            "adapted": len(plan)}


# ---- the check ----


def probe_inputs(processor) -> list[dict]:
    """Two single-sample batches through the base's own processor: a text-only prompt and one with an image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (56, 56), (230, 230, 230))  # 56x56: 4 merged image tokens, Qwen-VL's minimum budget
    ImageDraw.Draw(image).rectangle([14, 14, 41, 41], fill=(200, 30, 30))
    probes = []
    for content, images in (([{"type": "text", "text": "Name three colours."}], None),
                            ([{"type": "image"}, {"type": "text", "text": "What colour is the square?"}], [image])):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        probes.append(dict(processor(text=[text], images=images, return_tensors="pt")))
    return probes


def load_model(path: Path, dtype: torch.dtype, device: str, quantization_config=None):
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map={"": device},
                                                       quantization_config=quantization_config)


def load_as_trained(path: Path, dtype: torch.dtype, device: str):
    """The 4-bit base in the weight layout training used (bitsandbytes' CPU inference repack would differ, and it
    refuses layers whose output size is not a multiple of 32)."""
    from vlora.model import four_bit_config, keep_training_layout

    model = load_model(path, dtype, device, four_bit_config("nf4", dtype))
    keep_training_layout(model)
    return model


def with_adapter(model, adapter_dir: Path):
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 for a renamed attribute; the deprecation notice is peft's to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter_dir))


@torch.no_grad()
def run_probe(load: Callable[[], torch.nn.Module], probes: list[dict], device: str) -> list[torch.Tensor]:
    """Load a model, return its fp32 logits on every probe, and free it before the caller loads the next one."""
    model = load().eval()
    try:
        return [model(**{k: v.to(device) for k, v in p.items()}, use_cache=False).logits.float().cpu()
                for p in probes]
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def verify(base_dir: Path, adapter_dir: Path, out_dir: Path, *, merged: bool, dtype: torch.dtype,
           tolerance: float | None, device: str, prequantized: bool) -> dict:
    """{max_diff, tolerance, max_diff_4bit}: the written folder's logits against base + source adapter."""
    from vlora.model import load_processor

    probes = probe_inputs(load_processor(str(base_dir)))
    reference = run_probe(lambda: with_adapter(load_model(base_dir, dtype, device), adapter_dir), probes, device)
    if merged:
        exported = run_probe(lambda: load_model(out_dir, dtype, device), probes, device)
    else:
        exported = run_probe(lambda: with_adapter(load_model(base_dir, dtype, device), out_dir), probes, device)
    if tolerance is None:
        tolerance = REL_TOLERANCE.get(dtype, 1e-4) * max(1.0, max(float(r.abs().max()) for r in reference))
    diff_4bit = None
    if not prequantized:
        try:  # information only: a machine without a usable bitsandbytes still exports
            trained = run_probe(lambda: with_adapter(load_as_trained(base_dir, dtype, device), adapter_dir), probes,
                                device)
            diff_4bit = max_abs_diff(exported, trained)
        except Exception as e:  # noqa: BLE001
            print(f"info: 4-bit comparison skipped: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
    return {"max_diff": max_abs_diff(reference, exported), "tolerance": tolerance, "max_diff_4bit": diff_4bit,
            "max_logit": max(float(r.abs().max()) for r in reference)}


# ---- entry points ----


def export(adapter_dir: str | Path, out_dir: str | Path, *, base: str | Path | None = None, merge: bool = False,
           dtype: str = "auto", tolerance: float | None = None, device: str = "cpu") -> dict:
    """Export (see the module docstring) and check; returns the figures, raises VerificationFailed above tolerance.

    Returns {out, mode, base, layout, dtype, files, merged, replaced, max_diff, tolerance, max_diff_4bit,
    max_logit}. `dtype` auto keeps every tensor's dtype (the check runs in config.json's); without `merge` it only
    chooses the check's dtype. `tolerance`: an absolute bound on the largest logit difference (default: relative,
    REL_TOLERANCE).
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise VloraError(f"--dtype must be auto or one of {', '.join(DTYPES)}; got {dtype}")
    if tolerance is not None and not tolerance >= 0:
        raise VloraError(f"--tolerance must be a non-negative number; got {tolerance}")
    adapter_config, tensors = read_adapter(adapter_dir)
    base = str(base) if base is not None else adapter_config.get("base_model_name_or_path")
    if not base:
        raise VloraError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path; pass --base DIR")
    base_dir = resolve_base(base)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise VloraError(f"--out '{out_dir}' exists and is not an empty folder; choose a new one")
    base_config = read_json(base_dir / "config.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge:
        result = export_merged(base_dir, out_dir, adapter_config, tensors, base_config, DTYPES.get(dtype))
    else:
        result = export_adapter(base_dir, base, out_dir, adapter_config, tensors, base_config)
    check_dtype = DTYPES.get(dtype) or config_dtype(base_config)
    result.update(out=str(out_dir), mode="merged" if merge else "adapter", base=str(base_dir),
                  dtype=str(check_dtype).removeprefix("torch."))
    del tensors  # the check loads three models one after the other; the adapter's tensors are not needed
    result.update(verify(base_dir, adapter_dir, out_dir, merged=merge, dtype=check_dtype, tolerance=tolerance,
                         device=device, prequantized=bool(base_config.get("quantization_config"))))
    print_summary(result)
    if not result["max_diff"] <= result["tolerance"]:  # a NaN difference fails too
        raise VerificationFailed(
            f"the exported folder '{out_dir}' differs from base + adapter by {result['max_diff']:.3g} in logits, "
            f"above the tolerance {result['tolerance']:.3g}; do not use it")
    return result


def print_summary(r: dict) -> None:
    what = "merged model" if r["mode"] == "merged" else "adapter"
    print(f"export: {what} written to {r['out']} ({len(r['files'])} files; base {r['base']})")
    print(f"export: base tensor names: {r['layout']}")
    if r["mode"] == "merged":
        print(f"export: {r['merged']} tensors merged with LoRA, {r['replaced']} replaced by trained copies, "
              f"dtype {r['dtype']}")
    print(f"check: max |logit diff| vs unquantized base + adapter ({r['dtype']}): {r['max_diff']:.3g} "
          f"(tolerance {r['tolerance']:.3g}, largest |logit| {r['max_logit']:.3g}): "
          f"{'ok' if r['max_diff'] <= r['tolerance'] else 'FAILED'}")
    if r["max_diff_4bit"] is not None:
        print(f"info: max |logit diff| vs 4-bit nf4 base + adapter (what the run trained): {r['max_diff_4bit']:.3g}")


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser("export", help="write a trained adapter as a clean PEFT folder or merged into the "
                                             "base, and check its logits against base + adapter")
    e.add_argument("--adapter", required=True, type=Path, help="the adapter folder (e.g. runs/NAME/adapter)")
    e.add_argument("--out", required=True, type=Path, help="a new folder to write")
    e.add_argument("--base", default=None,
                   help="base model folder or cached hub id (default: the adapter's base_model_name_or_path)")
    e.add_argument("--merge", action="store_true",
                   help="merge LoRA (and a fully trained merger) into the base's unquantized weights")
    e.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="merged weights' dtype (auto: each tensor keeps the base's); without --merge, the check's")
    e.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed logit difference (default: fp32 1e-4, fp16 1e-2, bf16 5e-2 "
                        "x max(1, largest |logit|))")
    e.add_argument("--device", default="cpu", help="where the check runs (cpu, cuda, cuda:1, ...)")
    e.set_defaults(func=cmd_export)
    return e


def cmd_export(args) -> int:
    """0 when the export passed its check, 1 when it did not; other errors (VloraError) are the caller's (exit 2)."""
    try:
        export(args.adapter, args.out, base=args.base, merge=args.merge, dtype=args.dtype,
               tolerance=args.tolerance, device=args.device)
    except VerificationFailed as e:
        print(f"vlora: error: {e}", file=sys.stderr)
        return 1
    return 0
