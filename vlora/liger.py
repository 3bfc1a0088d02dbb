"""Liger's fused Triton kernels on Qwen2.5-VL (`model.liger=true`, the `gpu` extra): opt-in until measured on a GPU.

What `apply_liger(model)` changes, on the module instances of this model (as vlora/kernels.py does):
- RMSNorm: the LLM's input / post-attention / final norms and the vision blocks' norm1 / norm2 run Liger's RMSNorm
  kernel in its "llama" casting mode (fp32 statistics, the normalised input cast back before the weight: what
  transformers' Qwen2_5_VLRMSNorm computes).
- SwiGLU: each LLM MLP runs `down_proj(liger_swiglu(gate_proj(x), up_proj(x)))`. It still calls its own
  gate/up/down_proj modules, so bitsandbytes' Linear4bit and peft's LoRA layers inside them run as before.
- RoPE: transformers 5 composes the mRoPE sections (temporal, height, width) inside the rotary embedding, and the
  LLM attention then calls the module function `apply_rotary_pos_emb` on ordinary (batch, seq, head_dim) cos/sin,
  which Liger's RoPE kernel computes. That function is the modeling module's, shared by every Qwen2.5-VL in the
  process, so it is wrapped once and takes the kernel only for the cos/sin this model's rotary embedding marked
  (`ROPE_MARK`): a second, plain model in the same process (a bench's baseline) keeps transformers' RoPE.
- Each replaced forward keeps transformers' code for tensors that are not on a CUDA device. The vision tower's and
  its attention layers' forwards (vlora/kernels.py), the merger and lm_head are not touched.
- The loss: `fused_supervised_ce`, Liger's fused linear cross-entropy on the supervised positions (no logits
  materialised), used by model.SupervisedLoss only where it computes what `F.cross_entropy(lm_head(h).float(), t,
  reduction="sum")` does (`fused_ce_blocker` says why not elsewhere).

Why not liger-kernel's own `apply_liger_kernel_to_qwen2_5_vl`: in liger-kernel 0.8.5 with transformers 5.24 it
raises ImportError (it always imports its Qwen2.5-VL loss forward, built on Qwen2_5_VLCausalLMOutputWithPast, which
transformers 5.24 no longer has), and its `rope=True` replaces `apply_multimodal_rotary_pos_emb`, which
transformers 5 no longer calls. It would also rebind the modeling module's RMSNorm and MLP classes for every model
built later. vlora binds the same kernels (liger_kernel.transformers.functional) on the same modules itself.
Each kernel is applied only where transformers' code has the structure it replaces (checked against the source);
otherwise it stays stock and the returned lines say why.

Not bit-identical to stock: the kernels round differently (tests/test_liger.py checks loss and LoRA gradients
against the plain path on a GPU, within fp32 and bf16 tolerances).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

from vlora.errors import VloraError

MIN_VERSION = "0.8.5"
# Set on the transformers model by apply_liger: model.SupervisedLoss then uses the fused cross-entropy where it may.
FUSED_CE_ATTR = "vlora_fused_ce"
# Set on the cos tensor a Liger model's rotary embedding returns: apply_rotary_pos_emb takes Liger's kernel for it.
ROPE_MARK = "vlora_liger_rope"
# What transformers' code must contain for each kernel to replace it exactly (transformers 5.23 to 5.24).
NEEDS = {
    "rms_norm": ("hidden_states.to(torch.float32)", "torch.rsqrt(variance + self.variance_epsilon)",
                 "self.weight * hidden_states.to(input_dtype)"),
    "swiglu": ("self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",),
    "rope attention": ("apply_rotary_pos_emb(query_states, key_states, cos, sin)",),
    "rope function": ("cos.unsqueeze(unsqueeze_dim)", "(q * cos) + (rotate_half(q) * sin)",
                      "(k * cos) + (rotate_half(k) * sin)"),
    "rope sections": ("self.recomposition_frequencies(cos)",),
}


def liger_available() -> str | None:
    """None when Liger's kernels can run here, else why not, in one line."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is false); Liger's kernels are Triton kernels for the GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e '.[gpu]')"
    from packaging.version import Version

    have = importlib.metadata.version("liger-kernel")
    if Version(have) < Version(MIN_VERSION):
        return f"liger-kernel {have} is older than {MIN_VERSION} (pip install -e '.[gpu]')"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it comes with torch's CUDA wheels on Linux)"
    return None


def _missing(code, fragments) -> str | None:
    """The first source fragment `code` lacks (its transformers version changed it), or None."""
    try:
        source = inspect.getsource(code)
    except (OSError, TypeError):
        return f"the source of {getattr(code, '__qualname__', code)} cannot be read"
    for fragment in fragments:
        if fragment not in source:
            return f"{code.__qualname__} no longer contains `{fragment}`"
    return None


def _targets(hf: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules each instance kernel replaces the forward of (the ones liger-kernel's own patch picks)."""
    text, blocks = hf.model.language_model, hf.model.visual.blocks
    return {
        "rms_norm": [text.norm, *(n for layer in text.layers for n in (layer.input_layernorm,
                                                                          layer.post_attention_layernorm)),
                     *(n for block in blocks for n in (block.norm1, block.norm2))],
        "swiglu": [layer.mlp for layer in text.layers],
        "rope": [text.rotary_emb],
    }


def _plan(hf: nn.Module, mod, targets: dict[str, list[nn.Module]]) -> dict[str, str | None]:
    """{kernel: None (applies) or why it stays stock} for this model and the installed transformers."""
    why = {kind: next(filter(None, (_missing(cls.forward, NEEDS[kind])
                                    for cls in dict.fromkeys(type(m) for m in modules))), None)
           for kind, modules in targets.items() if kind != "rope"}
    acts = {getattr(getattr(mlp, "config", None), "hidden_act", None) for mlp in targets["swiglu"]}
    if not acts <= {"silu", "swish"}:
        why["swiglu"] = f"the MLP's activation is {sorted(map(str, acts))}, not silu"
    rope_fn = getattr(mod.apply_rotary_pos_emb, "vlora_stock", mod.apply_rotary_pos_emb)
    layer = hf.model.language_model.layers[0]
    why["rope"] = (_missing(type(layer.self_attn).forward, NEEDS["rope attention"])
                   or _missing(rope_fn, NEEDS["rope function"])
                   or _missing(type(hf.model.language_model.rotary_emb).forward, NEEDS["rope sections"]))
    return why


def apply_liger(model: nn.Module) -> list[str]:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on this Qwen2.5-VL (a transformers model or a peft model around one),
    and the mark that lets SupervisedLoss use the fused cross-entropy; returns one log line per kernel."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if model_type != "qwen2_5_vl":
        raise VloraError(f"model.liger: vlora wires Liger's kernels for Qwen2.5-VL only, not model_type {model_type!r}")
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mod

    _functional()  # liger-kernel's import errors now, not at the first forward
    targets = _targets(hf)
    why = _plan(hf, mod, targets)
    forwards = {"rms_norm": _rms_norm_forward, "swiglu": _swiglu_forward, "rope": _marked_rotary_forward}
    done = {}
    for kind, modules in targets.items():
        # A forward already replaced on the instance (accelerate's hooks, a second call) is left as it is.
        todo = [m for m in modules if "forward" not in vars(m)] if why[kind] is None else []
        for module in todo:
            module.forward = types.MethodType(forwards[kind], module)
        done[kind] = len(todo)
    if done["rope"]:
        mod.apply_rotary_pos_emb = _cuda_rope(mod.apply_rotary_pos_emb)
    setattr(hf, FUSED_CE_ATTR, True)
    layers = hf.model.language_model.layers
    return [
        f"liger rms_norm: {done['rms_norm']} norms (LLM and vision blocks)" if why["rms_norm"] is None
        else f"liger rms_norm: stock, {why['rms_norm']}",
        f"liger swiglu: {done['swiglu']} LLM MLPs" if why["swiglu"] is None
        else f"liger swiglu: stock, {why['swiglu']}",
        f"liger rope: {len(layers)} LLM attention layers (cos/sin already carry the mRoPE sections)"
        if done["rope"] else f"liger rope: stock, {why['rope'] or 'the rotary embedding has its own forward'}",
        "liger fused linear cross-entropy: on the supervised positions, where lm_head is a plain Linear outside "
        "ZeRO-3 (else the plain loss, with a log line)",
    ]


@functools.cache
def _functional():
    """liger-kernel's functional API (imported once: the forwards below run per layer, per step)."""
    from liger_kernel.transformers import functional

    return functional


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm's forward through Liger's kernel; in_place (dY's buffer takes dX) as liger-kernel's own
    Qwen2.5-VL patch: the norm's output feeds one block, so nothing else reads that gradient."""
    if not hidden_states.is_cuda:
        return type(self).forward(self, hidden_states)
    return _functional().liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=0.0,
                                        casting_mode="llama", in_place=True)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Qwen2MLP's forward with silu(gate) * up as one kernel; the projections are the module's own (4-bit, LoRA)."""
    if not x.is_cuda:
        return type(self).forward(self, x)
    return self.down_proj(_functional().liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def _marked_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
    """The rotary embedding's own forward; its cos is marked for the Liger RoPE (the attention layers of this model
    get exactly these tensors, through checkpointing too)."""
    cos, sin = type(self).forward(self, x, position_ids)
    setattr(cos, ROPE_MARK, True)
    return cos, sin


def _cuda_rope(stock):
    """transformers' apply_rotary_pos_emb, with Liger's kernel for a marked cos on CUDA (the same signature and
    result); unmarked (other models) or on the CPU: transformers' own function."""
    if getattr(stock, "vlora_stock", None) is not None:  # already installed by an earlier model: keep one layer
        return stock

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if getattr(cos, ROPE_MARK, False) and q.is_cuda and unsqueeze_dim == 1 and cos.dim() == 3:
            return _functional().liger_rope(q, k, cos, sin)
        return stock(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.vlora_stock = stock
    return apply_rotary_pos_emb


def fused_ce_blocker(lm_head: nn.Module, hidden: torch.Tensor) -> str | None:
    """Why the fused cross-entropy would not compute what `lm_head(hidden)` + cross-entropy does here, or None.

    It reads lm_head's weight (and bias) directly instead of calling the module, so anything that runs in or around
    that call must be absent: a LoRA / modules_to_save / quantized wrapper (their own forward), forward hooks (e.g.
    DeepSpeed ZeRO-3's, which gather the partitioned weight: bypassed, it is an empty tensor), an instance forward.
    """
    if type(lm_head) is not nn.Linear:
        return f"lm_head is a {type(lm_head).__name__} (LoRA, modules_to_save or quantized), not a plain Linear"
    if hasattr(lm_head.weight, "ds_id"):
        return "lm_head's weight is partitioned by DeepSpeed ZeRO-3 (only its own forward gathers it)"
    if lm_head._forward_hooks or lm_head._forward_pre_hooks or "forward" in vars(lm_head):
        return "lm_head has forward hooks or a replaced forward, which the fused loss would bypass"
    if not hidden.is_cuda:
        return "the hidden states are not on a CUDA device"
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    if dtype == torch.float16:
        # Liger computes the logits' gradient in the forward, in the logits' dtype, before the loss scale reaches
        # it: in fp16 the small probabilities of a large vocabulary would underflow.
        return "fp16 logits (their gradient is computed before the loss scale and would underflow)"
    return None


@functools.cache
def _fused_loss() -> nn.Module:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def fused_supervised_ce(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of cross_entropy(lm_head(hidden[i]), targets[i]), without materialising the (rows x vocab)
    logits: Liger projects and reduces in chunks and computes the gradients on the way. Ambient autocast applies
    to its matmuls as to lm_head's. Call only where `fused_ce_blocker` says None."""
    if not hidden.shape[0]:  # no supervised position: the plain path's empty sum, without a zero-row kernel launch
        return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")
    return _fused_loss()(lm_head.weight, hidden, targets, lm_head.bias)
