"""Model families: everything that differs between Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 for a trainer.

The rest of vlora (pack, stream, loop, engines, checkpoints, export) is family-free and asks this module: a run's
family is read from the model folder's config.json (`model_type`), never configured by hand, so a checkpoint
cannot be trained under another family's rules. One module per family holds its facts and its tiny test model.

What a family says:
- `patch_size`: the vision patch (14 or 16 px); with the 2x2 merge one LLM token covers `resize_factor` px square
  (28 or 32). Image loading (qwen_vl_utils.fetch_image), the packer's token count and the pixel floor use it.
- `lora_targets`: the LoRA groups (config.LORA_GROUPS) as regexes over module names relative to the transformers
  model, and `mergers`: the projector module(s), for lora.train_merger_fully and the merger's learning rate.
- `boxes`: how grounding coordinates are written for the model (vlora.data.grounding).
- `linear_attention`: Gated DeltaNet layers, whose packed rows need fused kernels that know the sample boundaries.
- `tiny_config` / `processor_class`: the tiny random model `vlora tiny-model --family` builds.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlora.errors import VloraError

MERGE = 2  # every family merges 2x2 patches into one LLM token
NAMES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
DEFAULT = "qwen2_5_vl"
# How boxes are written in a data set or a request (data.boxes, --boxes): "original" = in the image's own pixels,
# converted to each family's convention as the image is resized; "as_written" = already in it, passed untouched.
BOX_MODES = ("original", "as_written")

# Decoder-layer and vision-block prefixes, shared by every family's group regexes: peft full-matches
# target_modules against names relative to the transformers model (with or without peft's prefix, hence `.*\.`).
LLM = r".*\.language_model\.layers\.\d+\."
VISION = r".*\.visual\."
# The groups every family names alike (the vision blocks have gate/up/down_proj too in Qwen2.5-VL: the LLM patterns
# are anchored on language_model, the vision ones on visual.blocks).
LLM_ATTN = LLM + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)"
LLM_MLP = LLM + r"mlp\.(gate_proj|up_proj|down_proj)"
VISION_ATTN = VISION + r"blocks\.\d+\.attn\.(qkv|proj)"


@dataclass(frozen=True)
class Family:
    name: str  # the --family name: the main config.json model_type
    title: str  # as users write it, for messages
    model_types: tuple[str, ...]  # config.json model_types it covers (the MoE variant beside the dense one)
    patch_size: int
    lora_targets: dict[str, str]
    mergers: str  # regex over module names (relative to visual.) of the projector(s): merger, DeepStack mergers
    boxes: str  # "absolute": pixels of the resized image (Qwen2.5-VL); "relative": 0-1000 of the image
    processor_class: str
    tiny_config: Callable  # (TinySpec) -> a transformers config at toy scale (vlora.tiny builds the spec)
    linear_attention: bool = False
    image_mean: tuple[float, ...] | None = None  # None: the image processor's (CLIP) default
    pretokenize_regex: str | None = None  # the tokenizer class's own split regex, where it is not Qwen2's

    @property
    def dashed(self) -> str:
        """The name as folders and hub ids write it: qwen2.5-vl, qwen3-vl, qwen3.5."""
        return self.name.replace("_5", ".5").replace("_", "-")

    def box_convention(self, mode: str) -> str | None:
        """The convention boxes written as `mode` (BOX_MODES: data.boxes, --boxes) are converted to for this
        family; None: passed untouched."""
        return self.boxes if mode == "original" else None

    @property
    def resize_factor(self) -> int:
        """Pixels per LLM token along each side: patch x merge (28 for Qwen2/2.5-VL, 32 for Qwen3-VL/3.5)."""
        return self.patch_size * MERGE


def _load(name: str) -> Family:
    return importlib.import_module(f"vlora.families.{name}").FAMILY


def get(name: str) -> Family:
    """The family called `name` (a --family value or any model_type it covers)."""
    for fam in map(_load, NAMES):
        if name == fam.name or name in fam.model_types:
            return fam
    raise VloraError(f"model_type '{name}' is not a family vlora knows ({', '.join(NAMES)})")


def of_config(config) -> Family:
    """The family of a transformers config (or a config.json dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return get(str(model_type))


def of_model_path(path: str | Path) -> Family:
    """The family of a model folder (its config.json) or hub id (transformers' cached config)."""
    local = Path(path) / "config.json"
    if local.is_file():
        try:
            return of_config(json.loads(local.read_text()))
        except json.JSONDecodeError as e:
            raise VloraError(f"{local}: not JSON ({e})") from None
    from transformers import AutoConfig

    try:
        return of_config(AutoConfig.from_pretrained(str(path)))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VloraError(f"cannot read the config of model '{path}': {first}") from None


def all_targets() -> dict[str, str]:
    """Each LoRA group's regex over every family: names alone say a tensor's group whatever the model."""
    fams = [_load(n) for n in NAMES]
    return {g: "|".join(dict.fromkeys(f"(?:{f.lora_targets[g]})" for f in fams)) for g in fams[0].lora_targets}


def all_mergers() -> str:
    return "|".join(dict.fromkeys(_load(n).mergers for n in NAMES))


@dataclass(frozen=True)
class TinySpec:
    """What a family's tiny_config needs from vlora.tiny: the toy tokenizer's special-token ids, its vocabulary
    size (padded), the RoPE base and the init scale."""

    ids: dict  # special-token string -> id
    vocab_size: int
    rope_theta: float
    init_range: float


def text_config(spec: TinySpec, **extra) -> dict:
    """The LLM half of every tiny config: width 64, two layers, 4 heads over 2 kv heads (head_dim 16)."""
    ids = spec.ids
    return dict(
        vocab_size=spec.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, attention_dropout=0.0,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        initializer_range=spec.init_range, **extra,
    )  # fmt: skip


def top_config(spec: TinySpec) -> dict:
    """The top-level config's fields: token ids looked up by the strings every Qwen-VL processor uses, untied
    embeddings, float32."""
    ids = spec.ids
    return dict(tie_word_embeddings=False, initializer_range=spec.init_range, dtype="float32",
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
