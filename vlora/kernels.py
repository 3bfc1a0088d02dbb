"""A lean forward for the frozen Qwen2.5-VL (and Qwen2-VL) vision tower: the same numbers, far fewer operator calls.

What transformers' tower does on every forward (5.17 to 5.24 with sdpa attention): it rebuilds from grid_thw the
rotary position ids, the rotary cos/sin, the window index and two cu_seqlens (Python loops of small tensor ops per
image, and host syncs on a GPU), and every attention layer splits q, k and v at cu_seqlens and runs one SDPA call
per window (windowed layers: 16 windows per 448x448 image) or per image / video frame (full-attention layers). On a
GPU that is launch overhead: for 4 images the 3B tower makes ~1,800 SDPA calls per forward.

What `lean_vision_tower(model)` changes, on the module instances only (no class is patched; `stock_vision_tower`
deletes the instance attributes again):
- the tower's forward computes what depends only on grid_thw (with the config and device) once per distinct grid
  and keeps it in a small LRU on the instance: rotary cos/sin already in window order, the window index and its
  inverse, cu_seqlens and max_seqlen, and each layer kind's attention plan;
- each attention layer rotates q and k in one go, q*cos + roll(q)*sin' (sin' = sin with its first half negated),
  and runs ONE SDPA call per distinct window length: equal-length windows are stacked as the batch dimension (as
  views when they are contiguous in the sequence, else gathered and the outputs put back in order). No padding.

Why the outputs are bit-identical to stock (torch.equal; tests/test_kernels.py checks outputs and gradients):
- the grid-derived tensors come from transformers' own helpers and its own rotary module, on the same device;
  computing them once instead of every call changes no value;
- rotate_half(x) * sin = cat(-x2, x1) * sin and roll(x) * sin' = cat(x2, x1) * cat(-s1, s2) are equal element by
  element, as (-a) * b == a * (-b) exactly in IEEE arithmetic; the separate mul, mul, add are stock's (no fused
  multiply-add), also the float32 up-cast and the cast back;
- SDPA computes every (batch, head) pair on its own, with the same kernel and blocking for the same length, so a
  window's output does not depend on the windows stacked beside it. Linear layers and norms see the same rows in
  the same order as stock; nothing else is touched.
Autograd goes through all of it, so LoRA inside the vision tower still trains, with stock's gradients.

Left to transformers, each with a log line saying why: a tower whose transformers code is not the structure this
was written for (checked against its source at install), a forward already replaced on the instance (e.g. by
accelerate's hooks), calls that pass precomputed position ids / cu_seqlens, tracing and torch.compile. Attention
other than transformers' own sdpa (flash_attention_2 is one varlen call already; eager; custom) keeps its forward
and only gets the cached cu_seqlens and max_seqlen, which spares flash attention's host syncs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("vlora")

PLAN_CACHE = 8  # distinct grid_thw batches whose plan a tower keeps (each a few MB on the 3B tower)
SEGMENTS = "vlora_segments"  # the kwarg that carries a layer's attention plan from the tower, through the block
# What a caller may hand transformers' tower precomputed (transformers pops these kwargs): then stock runs.
PRECOMPUTED = {"position_ids", "cu_seqlens", "max_seqlen", "window_index", "cu_window_seqlens", "max_window_seqlen"}
# The names the lean forward takes from the tower's modeling module (all present in transformers 5.17 to 5.24).
HELPERS = ("get_vision_position_ids", "get_vision_attention_seqlens", "get_max_seqlen", "capture_outputs",
           "merge_with_config_defaults", "BaseModelOutputWithPooling", "apply_rotary_pos_emb_vision", "rotate_half")
# Fragments of transformers' source that the lean forward re-implements: if one is missing the code changed, and
# the tower stays stock rather than silently computing something else.
NEEDS = {
    "tower": ("get_vision_position_ids(", "get_vision_attention_seqlens(", "self.patch_embed(hidden_states)",
              "self.rotary_pos_emb(hidden_states, position_ids)",
              "position_embeddings=position_embeddings", "self.merger(hidden_states)"),
    "windowed tower": ("get_vision_window_index(", "permute_input_for_window_attn(", "torch.argsort(window_index)",
                       "in self.fullatt_block_indexes", "merged_hidden_states[reverse_indices, :]"),
    "block": ("self.attn(", "position_embeddings=position_embeddings", "**kwargs"),
    "attention": ("reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)",
                  "apply_rotary_pos_emb_vision(query_states, key_states, cos, sin)", "torch.split(",
                  "scaling=self.scaling", "self.proj(attn_output)"),
    "rotate_half": ("torch.cat((-x2, x1), dim=-1)",),
    "rotary": ("q.float()", "cos.unsqueeze(-2).float()", "(q * cos) + (rotate_half(q) * sin)",
               "(k * cos) + (rotate_half(k) * sin)"),
}


@dataclass(eq=False)
class Segments:
    """How one kind of attention layer's sequence splits into batches of equal-length windows (or images)."""
    parts: list  # (rows, count, length): rows None (all), a slice, or an index tensor of the sequence's rows
    inverse: torch.Tensor | None  # puts the concatenated parts' rows back in sequence order (None: already are)
    # (cos, sin') in float32, sin' being sin with its first half negated: shaped (count, 1, length, head_dim) for
    # one batch that covers the sequence, else (n, 1, 1, head_dim)
    rope: tuple


@dataclass(eq=False)
class Plan:
    """All that a tower forward needs and that depends only on grid_thw (and the config and device)."""
    rope: tuple  # stock (cos, sin), (n, head_dim), in window order
    window_index: torch.Tensor | None  # None for Qwen2-VL (no windows)
    reverse: torch.Tensor | None
    cu_seqlens: torch.Tensor
    max_seqlen: int | None
    cu_window: torch.Tensor | None
    max_window: int | None
    full: Segments | None  # None where attention stays transformers'
    windows: Segments | None


def lean_vision_tower(model: nn.Module) -> int:
    """Install the lean forward on every Qwen2-VL / Qwen2.5-VL vision tower in `model` and on its attention
    layers; returns how many modules changed (0 for a tower already lean or left stock, with a log line why)."""
    changed = 0
    for tower in _towers(model):
        if vars(tower).get("_vlora_lean"):
            continue
        why = _unsupported(tower)
        if why:
            log.info("vlora.kernels: %s keeps transformers' forward: %s", type(tower).__name__, why)
            continue
        mod = sys.modules[type(tower).__module__]
        # The same decorators as transformers' forward: return_dict, output_hidden_states hooks, config defaults.
        body = mod.merge_with_config_defaults(mod.capture_outputs(_lean_tower_body))
        tower._vlora_body = types.MethodType(body, tower)
        tower._vlora_plans = OrderedDict()
        tower.forward = types.MethodType(_lean_tower_forward, tower)
        tower._vlora_lean = True
        for block in tower.blocks:
            block.attn.forward = types.MethodType(_lean_attention_forward, block.attn)
            block.attn._vlora_lean = True
        changed += 1 + len(tower.blocks)
        log.info("vlora.kernels: %s runs the lean forward (cached grid plans, one SDPA call per window length)",
                 type(tower).__name__)
        if not _stacked_attention_applies(tower.config):
            log.info("vlora.kernels: %s attention stays transformers' (attn_implementation=%s); only the grid "
                     "computations are cached", type(tower).__name__, tower.config._attn_implementation)
    return changed


def stock_vision_tower(model: nn.Module) -> int:
    """Undo `lean_vision_tower`: transformers' class forwards run again. Returns how many modules changed back."""
    changed = 0
    for module in model.modules():
        if vars(module).pop("_vlora_lean", False):
            for name in ("forward", "_vlora_body", "_vlora_plans"):
                vars(module).pop(name, None)
            changed += 1
    return changed


def matmul_patch_embed(model: nn.Module) -> int:
    """Run each Qwen2-VL / Qwen2.5-VL tower's patch embedding as one matmul; returns how many changed.

    The embedding is a Conv3d whose kernel equals its stride and its input (one patch of C x T x P x P values per
    row), so each output is one dot product of a patch with a filter: x.view(n, C*T*P*P) @ W.view(E, -1).T.
    oneDNN and cuDNN run that shape as a general 3-D convolution, 5x slower than the matmul on the CPU (13 vs
    2.5 ms for 1,024 patches, width 64; 316 vs 55 ms at the 3B's width 1280). Not bit-identical: the sum runs in
    another order (measured 2e-6 relative in fp32), so it is its own switch, `model.matmul_patch_embed`.
    The Conv3d instance's forward is replaced, not the patch embedding's, so ZeRO-3's hooks on it still gather
    its weight; `stock_vision_tower` undoes it. A LoRA-wrapped or differently shaped convolution is left alone.
    """
    changed = 0
    for tower in _towers(model):
        proj = getattr(getattr(tower, "patch_embed", None), "proj", None)
        if type(proj) is not nn.Conv3d or "forward" in vars(proj):
            continue
        if (tuple(proj.kernel_size) != tuple(proj.stride) or proj.padding not in ((0, 0, 0), "valid")
                or proj.groups != 1 or tuple(proj.dilation) != (1, 1, 1)):
            log.info("vlora.kernels: %s keeps its convolution (kernel %s, stride %s, padding %s)",
                     type(tower).__name__, proj.kernel_size, proj.stride, proj.padding)
            continue
        proj.forward = types.MethodType(_patch_matmul_forward, proj)
        proj._vlora_lean = True
        changed += 1
    return changed


def _patch_matmul_forward(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if tuple(x.shape[2:]) != tuple(self.kernel_size):  # more than one patch per row: a real convolution
        return type(self).forward(self, x)
    out = F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
    return out.view(*out.shape, 1, 1, 1)  # the convolution's (n, E, 1, 1, 1)


@contextlib.contextmanager
def stock_vision(model: nn.Module):
    """A block in which the vision tower runs transformers' own code: what `lean_vision_tower` and
    `matmul_patch_embed` installed is undone, then installed again after (`vlora bench --check`)."""
    lean = [m for m in model.modules() if vars(m).get("_vlora_lean")]
    stock_vision_tower(model)
    try:
        yield
    finally:
        if any(not isinstance(m, nn.Conv3d) for m in lean):
            lean_vision_tower(model)
        if any(isinstance(m, nn.Conv3d) for m in lean):
            matmul_patch_embed(model)


def _towers(model: nn.Module) -> list[nn.Module]:
    """The Qwen2-VL / Qwen2.5-VL vision towers in `model` (a peft model, the HF model, or a tower itself)."""
    return [m for m in model.modules() if type(m).__name__.endswith("VisionTransformerPretrainedModel")
            and type(m).__module__.rsplit(".", 1)[-1] in ("modeling_qwen2_vl", "modeling_qwen2_5_vl")]


def _unsupported(tower: nn.Module) -> str | None:
    """Why this tower cannot take the lean forward, or None: the transformers code it runs must have the structure
    (names, attributes, source) that the lean forward re-implements, else it stays stock."""
    mod = sys.modules[type(tower).__module__]
    windowed = hasattr(tower, "fullatt_block_indexes")
    helpers = HELPERS + (("get_vision_window_index",) if windowed else ())
    missing = [name for name in helpers if not hasattr(mod, name)]
    if missing:
        return f"{mod.__name__} has no {', '.join(missing)} (a transformers version this was not written for)"
    attrs = ("patch_embed", "rotary_pos_emb", "blocks", "merger", "spatial_merge_size", "config")
    attrs += ("window_size", "patch_size", "permute_input_for_window_attn") if windowed else ()
    missing = [name for name in attrs if not hasattr(tower, name)]
    if missing or not len(tower.blocks):
        return f"the tower has no {', '.join(missing) or 'blocks'}"
    attns = [getattr(block, "attn", None) for block in tower.blocks]
    if any(not all(hasattr(a, n) for n in ("qkv", "proj", "num_heads", "scaling", "attention_dropout", "config"))
           for a in attns):
        return "an attention layer lacks qkv, proj, num_heads, scaling, attention_dropout or config"
    if any(a.config is not tower.config or type(a) is not type(attns[0]) for a in attns):
        return "the attention layers do not share the tower's config and class"
    if not isinstance(getattr(tower.rotary_pos_emb, "inv_freq", None), torch.Tensor):
        return "the rotary embedding has no inv_freq buffer"
    replaced = [m for m in [tower, *attns] if "forward" in vars(m)]
    if replaced:
        return f"{type(replaced[0]).__name__}.forward is already replaced on the instance (e.g. accelerate hooks)"
    code = {"tower": type(tower).forward, "block": type(tower.blocks[0]).forward,
            "attention": type(attns[0]).forward, "rotary": mod.apply_rotary_pos_emb_vision,
            "rotate_half": mod.rotate_half}
    if windowed:
        code["windowed tower"] = type(tower).forward
    try:
        sources = {kind: inspect.getsource(fn) for kind, fn in code.items()}
    except (OSError, TypeError) as e:
        return f"transformers' source cannot be read to check its structure ({e})"
    for kind, source in sources.items():
        absent = [piece for piece in NEEDS[kind] if piece not in source]
        if absent:
            return f"transformers' {kind} code changed: {absent[0]!r} not found"
    return None


def _lean_tower_forward(self, *args, **kwargs):
    """The tower's forward: the lean body, or transformers' own where the lean one does not apply to this call."""
    if PRECOMPUTED & kwargs.keys() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        # The caller precomputed the grid tensors itself, or a graph is being captured (the plan cache is Python
        # state that a graph would freeze): transformers' forward, unchanged.
        return type(self).forward(self, *args, **kwargs)
    return self._vlora_body(*args, **kwargs)


def _lean_tower_body(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
    """transformers' tower forward (5.17 to 5.24) with every grid computation taken from the cached plan."""
    hidden_states = self.patch_embed(hidden_states)
    plan = _plan(self, grid_thw, hidden_states.device)  # stock's rotary runs on the embeddings' device
    if plan.window_index is not None:
        hidden_states = self.permute_input_for_window_attn(hidden_states, plan.window_index,
                                                           seq_len=hidden_states.shape[0])
    full_layers = getattr(self, "fullatt_block_indexes", None)
    for i, block in enumerate(self.blocks):
        if full_layers is None or i in full_layers:
            cu_seqlens, max_seqlen, segments = plan.cu_seqlens, plan.max_seqlen, plan.full
        else:
            cu_seqlens, max_seqlen, segments = plan.cu_window, plan.max_window, plan.windows
        # The block hands **kwargs to its attention: the segments reach it there (stock attention without them).
        extra = {SEGMENTS: segments} if segments is not None else {}
        hidden_states = block(hidden_states, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                              position_embeddings=plan.rope, **extra, **kwargs)
    merged = self.merger(hidden_states)
    if plan.reverse is not None:
        merged = merged[plan.reverse, :]
    output_class = sys.modules[type(self).__module__].BaseModelOutputWithPooling
    return output_class(last_hidden_state=hidden_states, pooler_output=merged)


def _stacked_attention_applies(config) -> bool:
    """Stacked SDPA replaces the per-window SDPA calls only where transformers' own sdpa function would run."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return config._attn_implementation == "sdpa" and ALL_ATTENTION_FUNCTIONS.get("sdpa") is sdpa_attention_forward


def _plan(tower: nn.Module, grid_thw: torch.Tensor, device: torch.device) -> Plan:
    """The tower's plan for this grid, from the LRU or built (one host copy of grid_thw per forward: the key)."""
    stacked = _stacked_attention_applies(tower.config)
    inv_freq = tower.rotary_pos_emb.inv_freq
    grid = tuple(tuple(int(x) for x in row) for row in grid_thw.tolist())
    # Everything the plan's values depend on: the grid, the device, the rotary buffer (a dtype cast or an in-place
    # change makes a new plan), the attention implementation.
    key = (grid, device, inv_freq.dtype, inv_freq._version, tower.config._attn_implementation, stacked)
    plans = tower._vlora_plans
    plan = plans.get(key)
    if plan is not None:
        plans.move_to_end(key)
        return plan
    with torch.no_grad():
        plan = _build_plan(tower, torch.tensor(grid, dtype=grid_thw.dtype), device, stacked)
    plans[key] = plan
    while len(plans) > PLAN_CACHE:
        plans.popitem(last=False)
    return plan


def _build_plan(tower: nn.Module, grid: torch.Tensor, device: torch.device, stacked: bool) -> Plan:
    """transformers' own helpers, run on the host copy of the grid (their per-image loops then launch nothing on a
    GPU; integer results, equal wherever computed), and its rotary module on `device`, like stock."""
    mod = sys.modules[type(tower).__module__]
    position_ids = mod.get_vision_position_ids(grid, tower.spatial_merge_size).to(device)
    cu_seqlens, max_seqlen = mod.get_vision_attention_seqlens(grid, tower.config)
    # Its forward, not its __call__: the module runs only when a grid is new, and module hooks must see the same
    # modules on every forward (ZeRO-3 checks that every rank runs the same ones in the same order). It holds no
    # parameter, only its inv_freq buffer, so no hook has anything to gather for it.
    cos, sin = tower.rotary_pos_emb.forward(torch.empty(0, device=device), position_ids)
    window_index = reverse = cu_window = max_window = None
    if hasattr(tower, "fullatt_block_indexes"):
        window_index, cu_window = mod.get_vision_window_index(
            grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size,
            patch_size=tower.patch_size)
        max_window = mod.get_max_seqlen(cu_window, tower.config)
        reverse = torch.argsort(window_index).to(device)
        window_index = window_index.to(device)
        cos, sin = (tower.permute_input_for_window_attn(f, window_index, seq_len=f.shape[0]) for f in (cos, sin))
    full = windows = None
    if stacked:
        n, dim = cos.shape
        signed_sin = torch.cat([-sin[:, : dim // 2], sin[:, dim // 2:]], dim=-1)
        full = _segments(cu_seqlens.tolist(), (cos, signed_sin), device)
        windows = _segments(cu_window.tolist(), (cos, signed_sin), device) if cu_window is not None else None
    return Plan(rope=(cos, sin), window_index=window_index, reverse=reverse, cu_seqlens=cu_seqlens.to(device),
                max_seqlen=max_seqlen, cu_window=None if cu_window is None else cu_window.to(device),
                max_window=max_window, full=full, windows=windows)


def _segments(cu: list[int], rope: tuple, device: torch.device) -> Segments:
    """One SDPA batch per distinct segment length: a view of the sequence where that length's segments form one
    contiguous run (uniform images: the whole sequence), else a gather of their rows, in sequence order. `rope` is
    (cos, sin'), each (n, head_dim)."""
    spans = [(start, end - start) for start, end in zip(cu, cu[1:]) if end > start]
    runs: list[list[int]] = []  # [start, count, length] of consecutive equal-length segments
    for start, length in spans:
        if runs and runs[-1][2] == length:
            runs[-1][1] += 1
        else:
            runs.append([start, 1, length])
    lengths = list(dict.fromkeys(length for _, length in spans))  # distinct, in order of first appearance
    if len(runs) == 1:  # rope broadcast over (q and k, count, heads, length, head_dim)
        _, count, length = runs[0]
        return Segments([(None, count, length)], None, tuple(f.view(count, 1, length, -1) for f in rope))
    rope = tuple(f.view(f.shape[0], 1, 1, -1) for f in rope)  # broadcast over (n, q and k, heads, head_dim)
    if len(runs) == len(lengths):
        return Segments([(slice(s, s + c * n), c, n) for s, c, n in runs], None, rope)
    length_of_row = torch.cat([torch.full((n,), n) for _, n in spans])
    parts, order = [], []
    for length in lengths:
        rows = (length_of_row == length).nonzero().squeeze(1)
        parts.append((rows.to(device), rows.numel() // length, length))
        order.append(rows)
    return Segments(parts, torch.argsort(torch.cat(order)).to(device), rope)


def _lean_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                            position_embeddings: tuple | None = None, max_seqlen: int | None = None, **kwargs):
    """transformers' vision attention with the rotation done for q and k at once and one SDPA call per distinct
    window length; without segments from the lean tower (not sdpa, or a direct call), transformers' forward."""
    segments = kwargs.pop(SEGMENTS, None)
    if segments is None:
        return type(self).forward(self, hidden_states, cu_seqlens=cu_seqlens,
                                  position_embeddings=position_embeddings, max_seqlen=max_seqlen, **kwargs)
    seq_len = hidden_states.shape[0]
    (rows, count, length), heads = segments.parts[0], self.num_heads
    if len(segments.parts) == 1 and rows is None:
        # One batch of equal-length segments covering the sequence (uniform images): q, k, v are views.
        qkv = self.qkv(hidden_states).reshape(count, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key = _rotate(qkv[:2], segments.rope).unbind(0)  # each (count, heads, length, head_dim)
        out = F.scaled_dot_product_attention(query, key, qkv[2], dropout_p=_dropout(self), scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq_len, -1))
    qk, value = self.qkv(hidden_states).reshape(seq_len, 3, heads, -1).split([2, 1], dim=1)
    return self.proj(_stacked_sdpa(self, _rotate(qk, segments.rope), value, segments))


def _rotate(qk: torch.Tensor, rope: tuple) -> torch.Tensor:
    """Stock's q.float() * cos + rotate_half(q.float()) * sin, cast back, for q and k at once: the same values, as
    rotate_half(x) * sin == roll(x) * sin' element by element (sin' has the first half of sin negated)."""
    cos, signed_sin = rope
    x = qk.float()
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(qk.dtype)


def _dropout(attn: nn.Module) -> float:
    return attn.attention_dropout if attn.training else 0.0  # as transformers passes it


def _stacked_sdpa(attn: nn.Module, qk: torch.Tensor, value: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Attention within each segment, equal-length segments stacked as the batch of one SDPA call. qk is
    (seq, 2, heads, head_dim) (rotated q and k), value (seq, 1, heads, head_dim); returns (seq, heads * head_dim),
    rows in sequence order."""
    heads, dim = qk.shape[2], qk.shape[3]
    outputs = []
    for rows, count, length in segments.parts:
        if isinstance(rows, torch.Tensor):
            qk_rows, value_rows = qk.index_select(0, rows), value.index_select(0, rows)
        else:
            qk_rows, value_rows = qk[rows], value[rows]  # a slice: views
        # (count, length, 2, heads, dim) -> q and k as (count, heads, length, dim): views, no copy.
        query, key = qk_rows.view(count, length, 2, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        value_rows = value_rows.view(count, length, heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value_rows, dropout_p=_dropout(attn), scale=attn.scaling)
        outputs.append(out.transpose(1, 2).reshape(count * length, heads * dim))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out if segments.inverse is None else out.index_select(0, segments.inverse)
