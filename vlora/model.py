"""The model: a Qwen2.5-VL base (4-bit LLM linears via bitsandbytes, or unquantized), LoRA via peft, adapter I/O.

Speed habits that live here: the vision tower and lm_head stay unquantized and frozen, no module is up-cast to
fp32 (no `prepare_model_for_kbit_training`), and the loss projects only the supervised positions through lm_head,
so a 151k-token vocabulary costs logits for the answer tokens, not for every image and prompt token.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlora.config import Config, looks_like_hub_id
from vlora.errors import VloraError

# peft matches a string target against each module's full name. The vision blocks also have
# gate/up/down_proj, so the LLM patterns are anchored on `language_model`.
TARGET_PATTERNS = {
    "llm_attn": r".*\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "llm_mlp": r".*\.language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    "merger": r".*\.visual\.merger\.mlp\.(0|2)",
}
# Kept in the compute dtype: quantizing the vision tower saves little memory and costs accuracy and speed,
# and a 4-bit lm_head would quantize the one layer every logit goes through.
UNQUANTIZED_MODULES = ["model.visual", "lm_head"]


def target_regex(targets: list[str]) -> str:
    return "|".join(f"(?:{TARGET_PATTERNS[t]})" for t in targets)


def _load_error(path: str, err: Exception) -> VloraError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    where = "hub id" if looks_like_hub_id(path) else "folder"
    return VloraError(f"cannot load model.path '{path}' ({where}): {first}")


def load_processor(path: str):
    """The checkpoint's own processor (tokenizer, image processor, chat template), from a folder or a hub id."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None


def quantization_config(cfg: Config, compute_dtype: torch.dtype):
    if cfg.model.quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.model.quant,
        bnb_4bit_use_double_quant=cfg.model.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=UNQUANTIZED_MODULES,
    )


def load_base_model(cfg: Config, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """The frozen base exactly as a user would load it with transformers, on this rank's device."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-weight loading bar on every rank drowns the log
    path = cfg.model.path
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path,
            dtype=compute_dtype,
            quantization_config=quantization_config(cfg, compute_dtype),
            device_map={"": device},
            attn_implementation=cfg.model.attn_implementation,
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    model.requires_grad_(False)
    model.config.use_cache = False
    keep_training_layout(model)
    return model


def keep_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference the first time a layer runs in eval mode.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit's weight to an inference-only layout in
    eval mode and never converts it back, so the next training step fails inside matmul_4bit. Held-out
    evaluation runs in eval mode between training steps, so the layout must stay the training one.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_lora(base: nn.Module, cfg: Config) -> nn.Module:
    """Wrap the base in peft LoRA adapters at the configured component groups; adapters train in fp32."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target_regex(cfg.lora.targets),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 for a renamed attribute; the deprecation notice is peft's to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, lora, autocast_adapter_dtype=True)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing propagates gradients to LoRA weights without forcing the inputs to
        # require grad, so the frozen vision tower does not start recording a graph.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_model(cfg: Config, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    return apply_lora(load_base_model(cfg, device, compute_dtype), cfg)


class SupervisedLoss(nn.Module):
    """Runs the VLM and returns the summed cross-entropy over the batch's supervised tokens.

    The sum (not the mean) is returned so the loop can divide by the step's global token count: then gradient
    accumulation and world size do not change the gradient. The peft model is the only registered child, so DDP
    sees exactly the parameters that peft made trainable. The collator supplies the supervised positions as
    flat indices (`loss_index`, `loss_targets`), so no boolean mask is resolved on the device (a host sync).
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model
        visual = peft_model.get_base_model().model.visual
        # If anything in the vision tower or merger trains, every backward must reach it, also for a batch
        # without images: DDP (and ZeRO) expect the same parameters to receive gradients on every rank.
        self.vision_trains = any(p.requires_grad for p in visual.parameters())

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hf = self.peft_model.get_base_model()
        # A packed batch has no attention_mask and 4-row position_ids (text positions first): transformers then
        # keeps attention within each packed sample, but only without a cache, hence use_cache=False.
        hidden = hf.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            use_cache=False,
        ).last_hidden_state
        # Position t predicts token t+1; only the supervised positions go through lm_head.
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        logits = hf.lm_head(flat.index_select(0, batch["loss_index"]))
        loss_sum = F.cross_entropy(logits.float(), batch["loss_targets"], reduction="sum")
        if self.vision_trains and batch.get("pixel_values") is None:
            loss_sum = loss_sum + 0.0 * self.idle_vision_pass(hf, hidden)
        return loss_sum

    @staticmethod
    def idle_vision_pass(hf: nn.Module, like: torch.Tensor) -> torch.Tensor:
        """The vision tower on one blank minimal image: a zero-weighted term that gives its trainable weights a
        (zero) gradient on text-only batches, so every rank runs the same backward."""
        visual = hf.model.visual
        merge, patch = visual.spatial_merge_size, visual.config.patch_size
        channels, temporal = visual.config.in_channels, visual.config.temporal_patch_size
        grid = torch.tensor([[1, merge, merge]], device=like.device)
        pixels = torch.zeros(merge * merge, channels * temporal * patch * patch, device=like.device,
                             dtype=visual.dtype)
        return visual(pixels, grid_thw=grid).pooler_output.sum()


@torch.no_grad()
def full_logits(peft_model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at every position, through the model's own forward: what a user of the saved adapter would get."""
    out = peft_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),  # None for a packed batch (see SupervisedLoss)
        position_ids=batch.get("position_ids"),
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        use_cache=False,
    )
    return out.logits


def save_adapter(peft_model: nn.Module, out: Path) -> None:
    """PEFT's own layout (adapter_config.json + adapter_model.safetensors): `PeftModel.from_pretrained` loads it."""
    peft_model.save_pretrained(str(out), safe_serialization=True)
