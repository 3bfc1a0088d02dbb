"""The model: a Qwen-VL base of any family in vlora.families (4-bit LLM linears via bitsandbytes, or unquantized),
LoRA via peft, adapter I/O.

LoRA goes where `lora.targets` says, by component group (llm_attn, llm_mlp, merger, vision_attn, vision_mlp; each
family names the modules), with per-group rank and alpha; `model.freeze_*` (checked in config.validate) keep whole
components free of anything trainable; `lora.train_merger_fully` trains the projector's own weights (Qwen3-VL: its
DeepStack mergers too) through peft's modules_to_save.

Speed habits that live here: the vision tower and lm_head stay unquantized and frozen, no frozen module is up-cast
to fp32 (no `prepare_model_for_kbit_training`), a frozen vision tower records no autograd graph (also with
checkpointing), and the loss projects only the supervised positions through lm_head, so a 151k-token vocabulary
costs logits for the answer tokens, not for every image and prompt token.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlora import families
from vlora.config import Config, group_values, looks_like_hub_id
from vlora.errors import VloraError

# LoRA component groups (config.LORA_GROUPS) as regexes over module names relative to the transformers model, per
# family (vlora/families). peft full-matches a string `target_modules` against each module's name, and matches
# rank/alpha pattern keys as `(.*\.)?(KEY)$`, so one anchored regex per group serves both. TARGET_PATTERNS joins
# every family's, so that a tensor name alone tells its group (the families' module names do not collide).
TARGET_PATTERNS = families.all_targets()
# A projector module (the merger, Qwen3-VL's DeepStack mergers) inside a parameter name.
_MERGER_PARAM = re.compile(rf"\.visual\.(?:{families.all_mergers()})\.")
# Kept in the compute dtype: quantizing the vision tower saves little memory and costs accuracy and speed,
# and a 4-bit lm_head would quantize the one layer every logit goes through.
UNQUANTIZED_MODULES = ["model.visual", "lm_head"]


def target_regex(targets: list[str], family: families.Family) -> str:
    return "|".join(f"(?:{family.lora_targets[t]})" for t in targets)


def merger_modules(visual: nn.Module) -> list[str]:
    """The projector modules peft's modules_to_save trains whole (lora.train_merger_fully): the merger, and each of
    Qwen3-VL's DeepStack mergers (peft cannot wrap the ModuleList that holds them, only each one)."""
    deepstack = getattr(visual, "deepstack_merger_list", ())
    return ["visual.merger"] + [f"visual.deepstack_merger_list.{i}" for i in range(len(deepstack))]


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


def unquantized_modules(cfg: Config) -> list[str]:
    """Module-name prefixes bitsandbytes leaves alone: the vision tower (unless model.quantize_vision) and lm_head.

    The merger stays unquantized either way: it is small, and lora.train_merger_fully trains its weights.
    """
    if cfg.model.quantize_vision:
        return ["model.visual.merger", "model.visual.deepstack_merger_list", "lm_head"]
    return list(UNQUANTIZED_MODULES)


def quantization_config(cfg: Config, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    """bitsandbytes' 4-bit config; `quant_storage` is the dtype the packed weights are stored in (default uint8;
    ZeRO-3 wants the dtype of the other weights, see engine.DeepSpeedEngine.quant_storage)."""
    if cfg.model.quant == "none":
        return None
    return four_bit_config(cfg.model.quant, compute_dtype, double_quant=cfg.model.double_quant,
                           quant_storage=quant_storage, skip=unquantized_modules(cfg))


def four_bit_config(quant: str, compute_dtype: torch.dtype, *, double_quant: bool = True,
                    quant_storage: torch.dtype | None = None, skip=UNQUANTIZED_MODULES):
    """The one place a 4-bit BitsAndBytesConfig is built: training, and loading the base again after it
    (generate, eval, export's check) with training's defaults, so they see the weights the run trained on."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
        llm_int8_skip_modules=list(skip),
    )


def load_base_model(cfg: Config, device: torch.device, compute_dtype: torch.dtype,
                    quant_storage: torch.dtype | None = None) -> nn.Module:
    """The frozen base exactly as a user would load it with transformers, on this rank's device."""
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-weight loading bar on every rank drowns the log
    path = cfg.model.path
    families.of_model_path(path)  # a model_type vlora has no family for is refused here, in one line
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=compute_dtype,
            quantization_config=quantization_config(cfg, compute_dtype, quant_storage),
            # Under ZeRO-3 initialisation (engine.DeepSpeedEngine.model_init) DeepSpeed places each partition.
            device_map=None if is_deepspeed_zero3_enabled() else {"": device},
            attn_implementation=cfg.model.attn_implementation,
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    model.requires_grad_(False)
    model.config.use_cache = False
    keep_training_layout(model)
    if cfg.model.lean_vision:
        from vlora.kernels import lean_vision_tower

        lean_vision_tower(model)  # bit-identical vision outputs from far fewer operator calls (vlora/kernels.py)
    if cfg.model.matmul_patch_embed:
        from vlora.kernels import matmul_patch_embed

        matmul_patch_embed(model)
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


def lora_config(cfg: Config, family: families.Family, visual: nn.Module):
    """peft's LoraConfig for the configured groups of `family`'s modules (`visual`: the model's vision tower).

    One regex over all targeted groups; per-group rank and alpha through `rank_pattern` / `alpha_pattern`, keyed by
    the same group regexes (disjoint, so peft's first-match lookup cannot pick the wrong group). All of it lands in
    adapter_config.json, so plain `PeftModel.from_pretrained` rebuilds the same layers.
    """
    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    targets = list(dict.fromkeys(cfg.lora.targets))
    ranks = group_values("lora.group_r", cfg.lora.group_r)
    alphas = group_values("lora.group_alpha", cfg.lora.group_alpha)
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        # No LoRA group at all (a projector-only stage with lora.train_merger_fully): peft refuses a config that
        # adapts nothing, except under its own placeholder name, which plain peft also accepts on loading.
        target_modules=target_regex(targets, family) if targets else DUMMY_TARGET_MODULES,
        rank_pattern={family.lora_targets[g]: r for g, r in ranks.items()},
        alpha_pattern={family.lora_targets[g]: a for g, a in alphas.items()},
        use_rslora=cfg.lora.rslora,
        use_dora=cfg.lora.dora,
        modules_to_save=merger_modules(visual) if cfg.lora.train_merger_fully else None,
        bias="none",
    )


def apply_lora(base: nn.Module, cfg: Config) -> nn.Module:
    """Wrap the base in peft LoRA adapters at the configured component groups; what trains is kept in fp32."""
    from peft import get_peft_model

    family = families.of_config(base.config)
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 for a renamed attribute; the deprecation notice is peft's to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, lora_config(cfg, family, base.model.visual), autocast_adapter_dtype=True)
    check_groups_found(model, cfg, family)
    if cfg.lora.train_merger_fully:
        # peft trains a copy of the merger in the base dtype; with bf16 weights AdamW's small updates round away.
        # The copies are tiny, so they train in fp32 (transformers casts the image features to the text dtype).
        for name in merger_modules(base.model.visual):
            for copy in base.model.get_submodule(name).modules_to_save.values():
                copy.float()
    set_gradient_checkpointing(base, cfg.model.gradient_checkpointing)
    return model


def set_gradient_checkpointing(base: nn.Module, enabled: bool) -> None:
    """Non-reentrant activation checkpointing of every LLM decoder layer and every vision block, or none.

    transformers (like peft for an unquantized base) also hooks the token and patch embeddings so that their outputs
    require grad. Only reentrant checkpointing needs that, and the hook on the patch embedding would make a frozen
    vision tower record its whole autograd graph (activations kept for a backward that never reaches a weight). With
    non-reentrant checkpointing LoRA weights inside a checkpointed layer get their gradients without it, so the hooks
    are removed.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*", category=FutureWarning)
        if enabled:
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
    base.disable_input_require_grads()


def check_groups_found(peft_model: nn.Module, cfg: Config, family: families.Family) -> None:
    """Refuse, in one line, a LoRA group that found no module in this model (it would silently train nothing):
    a MoE model's llm_mlp, whose experts are 3-D parameters and no Linear modules."""
    from peft.tuners.lora import LoraLayer

    found = {module_group(n) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    for group in dict.fromkeys(cfg.lora.targets):
        if group not in found:
            moe = getattr(peft_model.get_base_model().config.get_text_config(), "num_experts", 0)
            why = (f"this {family.title} MoE model's experts are 3-D parameters, which neither LoRA nor 4-bit reach "
                   "(they stay frozen in the compute dtype)" if moe and group == "llm_mlp"
                   else f"no module of this {family.title} model matches {family.lora_targets[group]}")
            raise VloraError(f"lora.targets {group}: {why}; drop it from lora.targets")


def weight_group(name: str) -> str:
    """The LoRA group of a parameter name or saved adapter key; `merger_full` for lora.train_merger_fully weights."""
    if "lora_" not in name and _MERGER_PARAM.search(name):
        return "merger_full"
    for group, pattern in TARGET_PATTERNS.items():
        if re.match(rf"(?:{pattern})\.", name):
            return group
    return "other"


def module_group(name: str) -> str:
    """The LoRA group of a module name (LoRA layers are full matches of their group's regex)."""
    return next((group for group, pattern in TARGET_PATTERNS.items() if re.fullmatch(pattern, name)), "other")


def param_component(name: str) -> str:
    """llm | merger | vision: the component (freeze switch, learning-rate multiplier) a parameter belongs to."""
    if _MERGER_PARAM.search(name):
        return "merger"
    if ".visual." in name:
        return "vision"
    return "llm"


def describe_lora(peft_model: nn.Module) -> list[str]:
    """One log line per trained group (modules, rank, alpha, scale, DoRA) and one for a fully trained merger."""
    from peft.tuners.lora import LoraLayer

    groups: dict[str, list] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            a = module.active_adapters[0]
            groups.setdefault(module_group(name), []).append(
                (module.r[a], module.lora_alpha[a], module.scaling[a], module.use_dora.get(a, False)))
    lines = []
    for group in TARGET_PATTERNS:
        if group in groups:
            desc = ", ".join(f"r={r} alpha={a} scale={s:.4g}{' DoRA' if d else ''}"
                             for r, a, s, d in sorted(set(groups[group])))
            lines.append(f"lora {group}: {len(groups[group])} modules, {desc}")
    n_full = sum(p.numel() for n, p in peft_model.named_parameters()
                 if p.requires_grad and weight_group(n) == "merger_full")
    if n_full:
        lines.append(f"merger trains fully (modules_to_save): {n_full:,} parameters in fp32")
    return lines


def load_init_adapter(peft_model: nn.Module, path: str | Path) -> dict[str, dict[str, int]]:
    """Start from an earlier run's adapter: load every tensor this run also trains, leave new groups at their init.

    Returns {"loaded": {group: n tensors}, "new": {group: n tensors}}. Raises VloraError when a tensor has another
    shape here (another rank) or when the folder holds weights this run does not train: the new adapter would
    silently lose them (e.g. a merger trained fully in stage 1 needs lora.train_merger_fully in stage 2 too).
    A DoRA layer whose earlier adapter was plain LoRA gets its magnitude recomputed from the loaded A and B,
    so the model starts as the earlier adapter left it.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p for p in peft_model.parameters() if p.requires_grad).device
    saved = load_file(Path(path) / "adapter_model.safetensors", device=str(device))
    own = get_peft_model_state_dict(peft_model)
    unused = sorted(set(saved) - set(own))
    if unused:
        groups = sorted({weight_group(k) for k in unused})
        raise VloraError(
            f"lora.init_from '{path}' has {len(unused)} tensor(s) this run does not train ({', '.join(groups)}; "
            f"e.g. {unused[0]}); train those groups too (lora.targets, lora.train_merger_fully, lora.dora) or the "
            "new adapter would lose them")
    for key, value in saved.items():
        if value.shape != own[key].shape:
            raise VloraError(
                f"lora.init_from '{path}': {key} has shape {tuple(value.shape)}, this run's has "
                f"{tuple(own[key].shape)}; give {weight_group(key)} the rank it had (lora.r / lora.group_r)")
    set_peft_model_state_dict(peft_model, saved)
    for key in own:
        lora_a = key.replace("lora_magnitude_vector", "lora_A.weight")
        if key.endswith(".lora_magnitude_vector") and key not in saved and lora_a in saved:
            layer = peft_model.get_submodule(key.rsplit(".", 1)[0])
            adapter = layer.active_adapters[0]
            magnitude = layer.lora_magnitude_vector[adapter]
            dtype = magnitude.weight.dtype
            with torch.no_grad():
                magnitude.update_layer(base_layer=layer.get_base_layer(), lora_A=layer.lora_A[adapter].weight,
                                       lora_B=layer.lora_B[adapter].weight, scaling=layer.scaling[adapter])
            magnitude.weight.data = magnitude.weight.data.to(dtype)
    report: dict[str, dict[str, int]] = {"loaded": {}, "new": {}}
    for key in own:
        bucket = report["loaded" if key in saved else "new"]
        group = weight_group(key)
        bucket[group] = bucket.get(group, 0) + 1
    return report


def build_model(cfg: Config, device: torch.device, compute_dtype: torch.dtype,
                quant_storage: torch.dtype | None = None) -> nn.Module:
    """The base with LoRA placed, frozen where configured, optionally started from an earlier adapter, with Liger's
    kernels where model.liger asks; logs all."""
    from vlora.liger import apply_liger, liger_available
    from vlora.metrics import log

    if cfg.model.liger and (why := liger_available()):  # said before minutes of loading, not after
        raise VloraError(f"model.liger=true but Liger's kernels cannot run here: {why}; set model.liger=false")
    family = families.of_model_path(cfg.model.path)
    if cfg.model.liger and family.name != "qwen2_5_vl":
        raise VloraError(f"model.liger: vlora wires Liger's kernels for Qwen2.5-VL only, not {family.title}; "
                         "set model.liger=false")
    check_packing(cfg, family)
    model = apply_lora(load_base_model(cfg, device, compute_dtype, quant_storage), cfg)
    for line in describe_lora(model):
        log.info(line)
    if cfg.model.liger:
        for line in apply_liger(model):  # on the instances LoRA already wraps: SwiGLU calls the wrapped linears
            log.info(line)
    if cfg.lora.init_from:
        report = load_init_adapter(model, cfg.lora.init_from)
        fmt = lambda d: ", ".join(f"{g} ({n} tensors)" for g, n in d.items()) or "nothing"  # noqa: E731
        log.info("lora.init_from %s: loaded %s; new, at their init: %s", cfg.lora.init_from, fmt(report["loaded"]),
                 fmt(report["new"]))
    return model


# The modules transformers takes the fused linear-attention kernels from, and their distributions.
LINEAR_ATTENTION_KERNELS = {"fla.ops.gated_delta_rule": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}


def check_packing(cfg: Config, family: families.Family) -> None:
    """Refuse data.pack_length where packed samples would leak into each other: a linear-attention (Qwen3.5) model
    without the fused kernels. transformers' torch fallback runs the Gated DeltaNet recurrence and its causal
    convolution over the whole row and carries each sample's state into the next; only the kernels take the
    boundaries (cu_seq_lens_q, seq_idx), and they need a CUDA device. The modules are imported, as transformers
    does: one that is installed but fails to import leaves transformers on the fallback."""
    import importlib

    if not (family.linear_attention and cfg.data.pack_length > 0):
        return
    missing = []
    for module, package in LINEAR_ATTENTION_KERNELS.items():
        try:
            importlib.import_module(module)
        except Exception:  # ImportError, or a kernel package built for another torch / CUDA
            missing.append(package)
    if missing or not torch.cuda.is_available():
        why = f"{' and '.join(missing)} not installed" if missing else "no CUDA device"
        raise VloraError(f"data.pack_length: {family.title}'s linear-attention layers keep packed samples apart only "
                         f"with the fused kernels of flash-linear-attention and causal-conv1d ({why}); without them "
                         "state leaks from one sample into the next: set data.pack_length=0 or install them")


def check_all_trainable_get_grads(loss_model: nn.Module, batch: dict[str, torch.Tensor]):
    """One forward and backward; return (loss, {name: grad}) or raise VloraError naming the trainable parameters
    whose gradient is None or all zero.

    Use a batch with images when vision groups or the merger train (a text-only batch reaches them with zero
    gradients by design), and LoRA B weights that are not all zero (at peft's init B = 0, so A's gradient is 0).
    The gradients are cloned and the model's own .grad fields are cleared again.
    """
    model = loss_model.peft_model
    model.zero_grad(set_to_none=True)
    loss = loss_model(batch)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    missing = [n for n, g in grads.items() if g is None]
    zero = [n for n, g in grads.items() if g is not None and not torch.count_nonzero(g)]
    if missing or zero:
        raise VloraError(f"{len(missing)} trainable tensor(s) got no gradient and {len(zero)} an all-zero one, "
                         f"e.g. {(missing or zero)[0]}")
    return loss.detach(), grads


# A packed linear-attention batch's sample boundaries (Collator(boundaries=True)), for the fused kernels.
BOUNDARY_KEYS = ("cu_seq_lens_q", "seq_idx")


class SupervisedLoss(nn.Module):
    """Runs the VLM and returns the summed cross-entropy over the batch's supervised tokens.

    The sum (not the mean) is returned so the loop can divide by the step's global token count: then gradient
    accumulation and world size do not change the gradient. The peft model is the only registered child, so DDP
    sees exactly the parameters that peft made trainable. The collator supplies the supervised positions as
    flat indices (`loss_index`, `loss_targets`), so no boolean mask is resolved on the device (a host sync).

    `vision_lockstep` (ZeRO-3, whose forward gathers each module's weights with a collective): a batch without
    images still runs the vision tower, at the point where images would run, so every rank gathers the same
    weights in the same order.

    `fused_ce`: the supervised positions go through Liger's fused linear cross-entropy (vlora/liger.py) instead of
    lm_head + F.cross_entropy: the same sum without the (positions x vocabulary) logits in memory. None (the
    default): where build_model applied Liger (model.liger). Used only where it is exact, else the plain loss with
    one log line saying why: not under ZeRO-3 (lm_head's partitioned weight is gathered only by lm_head's own
    forward hooks, which the fused loss bypasses), not on a LoRA / modules_to_save / quantized lm_head, not on the
    CPU, not with fp16 logits (vlora.liger.fused_ce_blocker).
    """

    def __init__(self, peft_model: nn.Module, vision_lockstep: bool = False, fused_ce: bool | None = None):
        from vlora.liger import FUSED_CE_ATTR

        super().__init__()
        self.peft_model = peft_model
        hf = peft_model.get_base_model()
        visual = hf.model.visual
        # If anything in the vision tower or merger trains, every backward must reach it, also for a batch
        # without images: DDP (and ZeRO) expect the same parameters to receive gradients on every rank.
        self.vision_trains = any(p.requires_grad for p in visual.parameters())
        self.vision_lockstep = vision_lockstep
        self.fused_ce = bool(getattr(hf, FUSED_CE_ATTR, False)) if fused_ce is None else fused_ce
        if self.fused_ce and vision_lockstep:  # known now, also where ZeRO-3 partitions later (zero3_init=false)
            self._plain_ce("ZeRO-3 partitions lm_head's weight and only its own forward gathers it")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hf = self.peft_model.get_base_model()
        idle_hook = None
        if batch.get("pixel_values") is None and (self.vision_trains or self.vision_lockstep):
            # The model runs the token embedding, then the vision tower, whose features join the layers' input.
            # The idle pass runs right after the embedding too and joins the input weighted zero: the same modules
            # run forward and backward in the same order as for a batch with images.
            def add_idle_pass(module, args, embeds):
                return embeds + 0.0 * self.idle_vision_pass(hf, embeds).to(embeds.dtype)

            idle_hook = hf.model.get_input_embeddings().register_forward_hook(add_idle_pass)
        try:
            # A packed batch has no attention_mask and 4-row position_ids (text positions first): transformers then
            # keeps attention within each packed sample, but only without a cache, hence use_cache=False.
            hidden = hf.model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=batch["position_ids"],
                pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"),
                use_cache=False,
                **{k: batch[k] for k in BOUNDARY_KEYS if k in batch},
            ).last_hidden_state
        finally:
            if idle_hook is not None:
                idle_hook.remove()
        # Position t predicts token t+1; only the supervised positions go through lm_head. loss_index holds flat
        # indices r * L + c of the predicting positions in the whole (rows x L) grid: reshape is a view of a
        # contiguous hidden, so only the gathered rows are copied (hidden[:, :-1] would copy it all when B > 1).
        flat = hidden.reshape(-1, hidden.shape[-1])
        rows = flat.index_select(0, batch["loss_index"])
        if self.fused_ce and self._fused_ce_applies(hf.lm_head, rows):
            from vlora import liger

            return liger.fused_supervised_ce(rows, hf.lm_head, batch["loss_targets"])
        logits = hf.lm_head(rows)
        return F.cross_entropy(logits.float(), batch["loss_targets"], reduction="sum")

    def _fused_ce_applies(self, lm_head: nn.Module, rows: torch.Tensor) -> bool:
        """Checked on every forward (attribute reads only): ZeRO-3 without zero3_init partitions lm_head and hooks
        it after this module is built; the first forward that finds a reason falls back for good."""
        from vlora.liger import fused_ce_blocker

        why = fused_ce_blocker(lm_head, rows)
        if why:
            self._plain_ce(why)
        return why is None

    def _plain_ce(self, why: str) -> None:
        from vlora.metrics import log

        self.fused_ce = False
        log.info("loss: lm_head + cross_entropy, not Liger's fused linear cross-entropy: %s", why)

    @staticmethod
    def idle_vision_pass(hf: nn.Module, like: torch.Tensor) -> torch.Tensor:
        """The vision tower on one blank minimal image, summed: weighted zero, it gives its trainable weights a
        (zero) gradient on text-only batches, so every rank runs the same backward."""
        visual = hf.model.visual
        merge, patch = visual.spatial_merge_size, visual.config.patch_size
        channels, temporal = visual.config.in_channels, visual.config.temporal_patch_size
        grid = torch.tensor([[1, merge, merge]], device=like.device)
        pixels = torch.zeros(merge * merge, channels * temporal * patch * patch, device=like.device,
                             dtype=visual.dtype)
        out = visual(pixels, grid_thw=grid)
        # Qwen3-VL's DeepStack mergers run on features of inner blocks and leave the tower beside pooler_output.
        return sum((f.sum() for f in getattr(out, "deepstack_features", None) or ()), out.pooler_output.sum())


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


def save_adapter(peft_model: nn.Module, out: Path, state_dict: dict | None = None) -> None:
    """PEFT's own layout (adapter_config.json + adapter_model.safetensors): `PeftModel.from_pretrained` loads it.

    `state_dict`: the model's trained weights by parameter name, when the model's own are partitioned (ZeRO-3).
    """
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    peft_model.save_pretrained(str(out), safe_serialization=True, **kwargs)
