"""How much GPU memory one rank of a vlora run needs: a small estimate from the checkpoint's config.json.

No weight is read. The sizes come from the architecture numbers of a Qwen2.5-VL config.json (`ModelShape`): text
hidden size h, layers L, intermediate size I, attention heads and key-value heads (kv width = kv heads x h / heads),
vocabulary V, tied embeddings; vision depth, hidden size, intermediate size, patch and merge sizes. `estimate`
adds, in bytes per GPU:

    base_4bit    the LLM decoder layers' linears (q/k/v/o_proj, gate/up/down_proj), which bitsandbytes stores in
                 4 bit: 0.5 byte per weight plus one absmax per block of 64 weights, fp32 (4/64 byte) or, with
                 model.double_quant, 8 bit with an fp32 scale per 256 blocks (1/64 + 4/16384 byte). With
                 model.quantize_vision the vision blocks' linears count here too; with model.quant=none nothing does.
    unquantized  everything left in the compute dtype (2 bytes for bf16/fp16, 4 for fp32): the token embedding,
                 lm_head (unless tied to it), norms, biases, the vision tower (patch embedding, blocks, merger).
    trained      what trains: LoRA A and B (r x (in + out) per adapted linear, lora.group_r per group), DoRA
                 magnitudes (one per output feature), the merger under lora.train_merger_fully. vlora keeps them in
                 fp32 under torch's AdamW, so with DDP each costs 4 (weight) + 4 (gradient) + 8 (two fp32 moments)
                 = 16 bytes. DeepSpeed in bf16/fp16 holds the module's copy in the compute dtype with its gradient
                 (2 + 2) and adds an fp32 master (4), an fp32 gradient (4) and the moments (8).
    activations  what autograd keeps for backward in one micro-batch of T = optim.micro_batch x S tokens, S being
                 data.pack_length if set, else data.max_length (the longest sample allowed, so a bound). Per token
                 and decoder layer: the two RMSNorms' fp32 inputs (2 x 4h bytes); in the compute dtype the
                 normalised inputs (2h), q, k and v at full width (3h: transformers repeats GQA's keys and values
                 for SDPA when there is a mask), the attention output before and after o_proj's reshape (2h), the
                 MLP's gate, up, SiLU(gate) and product (4I), and every adapted linear's rank-r intermediate (r);
                 with lora.dropout > 0 also every adapted linear's own dropped copy of its input (compute dtype + a
                 1-byte mask). With model.gradient_checkpointing only each layer's input (h) stays, plus the
                 activations of the one layer being recomputed. The vision blocks count the same way (with their
                 own sizes) only when a vision LoRA group trains (a frozen tower keeps nothing), over merge^2
                 patches per image token of one image of data.max_pixels per sample. tests/test_memory.py holds
                 this count against what autograd really saves in the tiny model.
    logits       the loss at every supervised position: fp32 log-probabilities kept for backward, their gradient and
                 the input gradient, 12 bytes x V per position. A bound again: every position of the micro-batch
                 counts as supervised (with replies-only supervision far fewer are).
    working      transients: the largest 4-bit weight dequantized to the compute dtype for its matmul, and under
                 ZeRO-3 the weights gathered for the module that runs (two decoder layers, or the larger of the
                 embedding and lm_head).
    reserve      a fixed 1 GiB: CUDA context, cuBLAS workspace, allocator fragmentation.

ZeRO divides over the world size what its stage partitions: stage 1 the optimizer state (moments, master), stage 2
also the gradients, stage 3 also every weight (base, unquantized, trained). offload_optimizer moves the optimizer
state and DeepSpeed's fp32 gradients to the CPU, offload_param the weights. DDP divides nothing. The terms are
summed although the logits' peak and the recompute of the first layer in backward do not coincide (a slight
overestimate). Left out: the image features and the merger's activations (small), the rotary tables and per-token
norm statistics (tiny), and everything the data loader holds (host memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from vlora.config import Config, group_values
from vlora.errors import VloraError

GiB = 2**30
RESERVE = 1 * GiB
QUANT_BLOCK = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights
DOUBLE_QUANT_BLOCK = 256  # with double quant, the 8-bit absmaxes get one fp32 scale per 256 blocks
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a Qwen2.5-VL checkpoint that its memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_out: int  # the merger's output width (the LLM's hidden size)
    spatial_merge: int = 2
    patch: int = 14
    temporal_patch: int = 2
    in_channels: int = 3

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a config.json's content: the text fields at the top (as published) or under text_config (as
        transformers >= 5 writes them), the vision ones under vision_config."""
        text = {**config, **config.get("text_config", {})}
        vision = config.get("vision_config", {})
        try:
            return cls(
                hidden=int(text["hidden_size"]), layers=int(text["num_hidden_layers"]),
                intermediate=int(text["intermediate_size"]), heads=int(text["num_attention_heads"]),
                kv_heads=int(text.get("num_key_value_heads", text["num_attention_heads"])),
                vocab=int(text["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                vision_depth=int(vision["depth"]), vision_hidden=int(vision["hidden_size"]),
                vision_intermediate=int(vision["intermediate_size"]),
                vision_out=int(vision.get("out_hidden_size", text["hidden_size"])),
                spatial_merge=int(vision.get("spatial_merge_size", 2)), patch=int(vision.get("patch_size", 14)),
                temporal_patch=int(vision.get("temporal_patch_size", 2)),
                in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise VloraError(f"config.json lacks a Qwen2.5-VL architecture field or has a bad one: {e}") from None

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def merger_width(self) -> int:
        return self.vision_hidden * self.spatial_merge**2


def read_shape(path: str | Path) -> ModelShape:
    """The shape in a checkpoint folder's config.json (or in that file, given directly); no weight is opened."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VloraError(f"cannot read the model's config.json at {file}: {e}") from None
    if not isinstance(config, dict):
        raise VloraError(f"{file} must hold a JSON object")
    return ModelShape.from_config(config)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts


def _linears(s: ModelShape) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of the linears of each LoRA group: per decoder layer (llm_*), per vision block (vision_*), once
    (merger)."""
    h, kv, i, vh, vi, m = s.hidden, s.kv_width, s.intermediate, s.vision_hidden, s.vision_intermediate, s.merger_width
    return {
        "llm_attn": [(h, h), (h, kv), (h, kv), (h, h)],
        "llm_mlp": [(h, i), (h, i), (i, h)],
        "merger": [(m, m), (m, s.vision_out)],
        "vision_attn": [(vh, 3 * vh), (vh, vh)],
        "vision_mlp": [(vh, vi), (vh, vi), (vi, vh)],
    }


def _repeats(s: ModelShape) -> dict[str, int]:
    return {"llm_attn": s.layers, "llm_mlp": s.layers, "merger": 1, "vision_attn": s.vision_depth,
            "vision_mlp": s.vision_depth}


def _weights(group: list[tuple[int, int]]) -> int:
    return sum(a * b for a, b in group)


def param_counts(s: ModelShape, cfg: Config) -> dict[str, int]:
    """Parameters by how they are stored: 'quantized' (4-bit weights), 'unquantized' (the compute dtype, the rest of
    the base) and 'trained' (LoRA, DoRA magnitudes, a fully trained merger)."""
    lin, rep = _linears(s), _repeats(s)
    h, vh, vi, m = s.hidden, s.vision_hidden, s.vision_intermediate, s.merger_width
    llm = s.layers * (_weights(lin["llm_attn"]) + _weights(lin["llm_mlp"]))
    vision_blocks = s.vision_depth * (_weights(lin["vision_attn"]) + _weights(lin["vision_mlp"]))
    merger = vh + _weights(lin["merger"]) + m + s.vision_out  # ln_q, mlp.0 and mlp.2 with their biases
    small = (s.layers * (2 * h + h + 2 * s.kv_width) + h  # norms, q/k/v biases, the final norm
             + s.vision_depth * (2 * vh + 3 * vh + vh + 2 * vi + vh)  # norms, qkv/proj/gate/up/down biases
             + s.in_channels * s.temporal_patch * s.patch**2 * vh)  # the patch embedding
    embeddings = s.vocab * h * (1 if s.tied_embeddings else 2)  # embed_tokens (+ lm_head)
    quantized = 0
    if cfg.model.quant != "none":
        quantized += llm
        if cfg.model.quantize_vision:
            quantized += vision_blocks
    base = llm + vision_blocks + merger + small + embeddings
    ranks = group_values("lora.group_r", cfg.lora.group_r)
    trained = 0
    for group in dict.fromkeys(cfg.lora.targets):
        r = ranks.get(group, cfg.lora.r)
        per = sum(r * (a + b) + (b if cfg.lora.dora else 0) for a, b in lin[group])
        trained += rep[group] * per
    if cfg.lora.train_merger_fully:
        trained += merger
    return {"quantized": quantized, "unquantized": base - quantized, "trained": trained}


# ---------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by term (see the module docstring)."""

    base_4bit: int
    unquantized: int
    trained: int
    activations: int
    logits: int
    working: int
    reserve: int
    trained_params: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "trained_params")

    def summary(self) -> str:
        """One line: the total and every term in GiB; what a recipe's `# memory:` comment holds."""
        g = lambda n: f"{n / GiB:.1f}"  # noqa: E731
        return (f"{g(self.total)} GiB per GPU = base 4-bit {g(self.base_4bit)} + unquantized {g(self.unquantized)}"
                f" + trained {g(self.trained)} + activations {g(self.activations)} + logits {g(self.logits)}"
                f" + working {g(self.working)} + reserve {g(self.reserve)} GiB"
                f" ({self.trained_params / 1e6:.1f}M trained parameters)")


def compute_bytes(cfg: Config) -> int:
    """Bytes per value of the compute dtype: model.compute_dtype, else run.precision, else bf16 (auto on a GPU)."""
    for name in (cfg.model.compute_dtype, cfg.run.precision):
        if name in DTYPE_BYTES:
            return DTYPE_BYTES[name]
    return 2


def _layer_bytes(hidden: int, intermediate: int, b: int, dropout_values: int, lora_values: int) -> int:
    """Bytes autograd keeps per token in one decoder layer or vision block (see the module docstring)."""
    return 2 * 4 * hidden + b * (7 * hidden + 4 * intermediate + lora_values) + (b + 1) * dropout_values


def estimate(shape: ModelShape, cfg: Config, *, world_size: int = 1, zero_stage: int | None = None,
             offload_optimizer: bool = False, offload_params: bool = False) -> MemoryEstimate:
    """The memory one GPU needs for `cfg` on a model of `shape` in a world of `world_size` ranks.

    `zero_stage` None is plain DDP (run.engine=ddp); 0-3 is DeepSpeed at that ZeRO stage, with the JSON's
    offload_optimizer / offload_param (device other than none) as `offload_optimizer` / `offload_params`.
    """
    s, b = shape, compute_bytes(cfg)
    n = max(1, world_size)
    counts = param_counts(s, cfg)
    stage = -1 if zero_stage is None else zero_stage
    weights_div = n if stage >= 3 else 1
    per_weight = 0.5 + (1 / QUANT_BLOCK + 4 / (QUANT_BLOCK * DOUBLE_QUANT_BLOCK) if cfg.model.double_quant
                        else 4 / QUANT_BLOCK)
    base_4bit = counts["quantized"] * per_weight
    unquantized = counts["unquantized"] * b
    if offload_params and stage >= 3:
        base_4bit = unquantized = 0.0

    t = counts["trained"]
    if zero_stage is None or b == 4:  # fp32 weights and gradients, AdamW's two moments; no separate master copy
        weights, grads, state = 4 * t, 4 * t, 8 * t
    else:  # DeepSpeed bf16/fp16: the module's copy and its gradient, an fp32 master, fp32 gradient and moments
        weights, grads, state = b * t, (b + 4) * t, 12 * t
    if offload_optimizer and stage >= 1:
        state, grads = 0, b * t
    trained = (weights / weights_div + grads / (n if stage >= 2 else 1) + state / (n if stage >= 1 else 1))
    if offload_params and stage >= 3:
        trained -= weights / weights_div

    seq = cfg.data.pack_length or cfg.data.max_length
    tokens = cfg.optim.micro_batch * seq
    dropped = set(cfg.lora.targets) if cfg.lora.dropout > 0 else set()
    ranks = group_values("lora.group_r", cfg.lora.group_r)
    # Each adapted linear keeps its rank-r intermediate (A's output, B's input).
    lora = {g: ranks.get(g, cfg.lora.r) * len(_linears(s)[g]) if g in cfg.lora.targets else 0 for g in _linears(s)}
    h, i = s.hidden, s.intermediate
    llm_drop = (4 * h if "llm_attn" in dropped else 0) + (2 * h + i if "llm_mlp" in dropped else 0)
    layer = _layer_bytes(h, i, b, llm_drop, lora["llm_attn"] + lora["llm_mlp"])
    if cfg.model.gradient_checkpointing:
        activations = tokens * (s.layers * h * b + layer)
    else:
        activations = tokens * s.layers * layer
    if {"vision_attn", "vision_mlp"} & set(cfg.lora.targets):
        vh, vi = s.vision_hidden, s.vision_intermediate
        image_tokens = min(seq, cfg.data.max_pixels // (s.patch * s.spatial_merge) ** 2)
        patches = cfg.optim.micro_batch * image_tokens * s.spatial_merge**2
        vision_drop = (2 * vh if "vision_attn" in dropped else 0) + (2 * vh + vi if "vision_mlp" in dropped else 0)
        block = _layer_bytes(vh, vi, b, vision_drop, lora["vision_attn"] + lora["vision_mlp"])
        depth = s.vision_depth
        activations += patches * ((depth * vh * b + block) if cfg.model.gradient_checkpointing else depth * block)
    logits = tokens * s.vocab * 12

    largest = max(h * i, h * h) if counts["quantized"] else 0
    working = largest * b
    if stage >= 3:
        layer_stored = (_weights(_linears(s)["llm_attn"]) + _weights(_linears(s)["llm_mlp"])) * (
            per_weight if cfg.model.quant != "none" else b)
        working += max(2 * layer_stored, s.vocab * h * b)
    return MemoryEstimate(
        base_4bit=round(base_4bit / weights_div), unquantized=round(unquantized / weights_div), trained=round(trained),
        activations=round(activations), logits=round(logits), working=round(working), reserve=RESERVE,
        trained_params=t)
