"""How much GPU memory one rank of a vlora run needs: a small estimate from the checkpoint's config.json.

No weight is read. The sizes come from the architecture numbers of the config.json of any vlora family
(vlora.families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and its MoE variant, Qwen3.5 and its MoE variant), gathered in
`ModelShape`: text hidden size h, layers L, MLP width I, attention heads, key-value heads and head width (explicit
`head_dim` in Qwen3-VL/3.5, else h / heads), vocabulary V, tied embeddings; Qwen3.5's Gated DeltaNet layers and
their widths; the MoE blocks (experts, their width, the shared expert); vision depth, width, MLP width, patch and
merge sizes, Qwen3-VL's DeepStack mergers and learned position table. `estimate` adds, in bytes per GPU:

    base_4bit    the LLM decoder layers' nn.Linear weights (attention or linear attention, dense MLP or shared
                 expert), which bitsandbytes stores in 4 bit: 0.5 byte per weight plus one absmax per block of 64
                 weights, fp32 (4/64 byte) or, with model.double_quant, 8 bit with an fp32 scale per 256 blocks
                 (1/64 + 4/16384 byte). With model.quantize_vision the vision blocks' linears count here too; with
                 model.quant=none nothing does.
    unquantized  everything left in the compute dtype (2 bytes for bf16/fp16, 4 for fp32): the token embedding,
                 lm_head (unless tied to it), norms, biases, the vision tower (patch embedding, blocks, mergers), and
                 in MoE models the routed experts and routers. The experts are 3-D parameters, not nn.Linear, so
                 bitsandbytes leaves them in the compute dtype: they are most of an MoE model's weights.
    trained      what trains: LoRA A and B (r x (in + out) per adapted linear, lora.group_r per group), DoRA
                 magnitudes (one per output feature), the mergers under lora.train_merger_fully. vlora keeps them in
                 fp32 under torch's AdamW, so with DDP each costs 4 (weight) + 4 (gradient) + 8 (two fp32 moments)
                 = 16 bytes. DeepSpeed in bf16/fp16 holds the module's copy in the compute dtype with its gradient
                 (2 + 2) and adds an fp32 master (4), an fp32 gradient (4) and the moments (8). llm_mlp adapts the
                 dense MLPs and Qwen3.5-MoE's shared expert, never the routed experts.
    activations  what autograd keeps for backward in one micro-batch of T = optim.micro_batch x S tokens, S being
                 data.pack_length if set, else data.max_length (the longest sample allowed, so a bound). Per token
                 and full-attention decoder layer: the two RMSNorms' fp32 inputs (2 x 4h bytes); in the compute dtype
                 the normalised inputs (2h), q, k and v at the query width A = heads x head width (3A: transformers
                 repeats GQA's keys and values for SDPA when there is a mask), the attention output before and
                 after o_proj's reshape (2A), the MLP's gate, up, SiLU(gate) and product (4I), and every adapted
                 linear's rank-r intermediate (r); with lora.dropout > 0 also every adapted linear's own dropped
                 copy of its input (compute dtype + a 1-byte mask). Qwen3's q/k norms add their fp32 inputs, Qwen3.5's
                 output gate its gate. A MoE block keeps, per routed copy of a token (top-k), its input and its
                 expert's 4 x moe width, plus the router's fp32 logits and probabilities. A Gated DeltaNet layer
                 is approximated (see _linear_attention_values). With model.gradient_checkpointing only each
                 layer's input (h) stays, plus the activations of the one layer being recomputed. The vision blocks
                 count the same way (with their own sizes) only when a vision LoRA group trains (a frozen tower
                 keeps nothing), over merge^2 patches per image token of one image of data.max_pixels per sample.
                 tests/test_memory.py holds this count against what autograd really saves in the tiny models.
    logits       the loss at every supervised position: fp32 log-probabilities kept for backward, their gradient and
                 the input gradient, 12 bytes x V per position. A bound again: every position of the micro-batch
                 counts as supervised (with replies-only supervision far fewer are).
    working      transients: the largest 4-bit weight dequantized to the compute dtype for its matmul, and under
                 ZeRO-3 the weights gathered for the module that runs (two decoder layers, experts included, or the
                 larger of the embedding and lm_head).
    reserve      a fixed 1 GiB: CUDA context, cuBLAS workspace, allocator fragmentation.

ZeRO divides over the world size what its stage partitions: stage 1 the optimizer state (moments, master), stage 2
also the gradients, stage 3 also every weight (base, unquantized, trained). offload_optimizer moves the optimizer
state and DeepSpeed's fp32 gradients to the CPU, offload_param the weights. DDP divides nothing. The terms are
summed although the logits' peak and the recompute of the first layer in backward do not coincide (a slight
overestimate). Left out: the image features and the merger's activations (small), the rotary tables and per-token
norm statistics (tiny), Qwen3.5's multi-token-prediction weights (`mtp.*` on the hub, which loading skips), and
everything the data loader holds (host memory).
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
LINEAR_ATTENTION_CHUNK = 64  # transformers' chunked Gated DeltaNet rule works on chunks of 64 tokens


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a checkpoint that its memory depends on (zeros where a family has no such part)."""

    hidden: int
    layers: int
    intermediate: int  # the dense MLP's width (layers without a MoE block)
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
    family: str = "qwen2_5_vl"  # vlora.families name: which modules exist beyond these numbers
    head_dim: int = 0  # 0: hidden // heads (Qwen2/2.5-VL); Qwen3-VL and Qwen3.5 set it explicitly
    linear_layers: int = 0  # Qwen3.5's Gated DeltaNet (linear attention) layers; the others are full attention
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv_kernel: int = 0
    moe_layers: int = 0  # layers whose MLP is a sparse MoE block
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0  # Qwen3.5-MoE's always-on expert (0: none)
    deepstack: int = 0  # Qwen3-VL's extra mergers (one per deepstack_visual_indexes entry)
    position_embeddings: int = 0  # rows of Qwen3-VL/3.5's learned vision position table

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a config.json's content: the text fields at the top (as Qwen2/2.5-VL publish them) or under
        text_config (as transformers >= 5 writes them, and the Qwen3 families publish them), the vision ones under
        vision_config. The family comes from model_type (vlora.families)."""
        from vlora import families

        family = families.of_config(config)
        text = {**config, **config.get("text_config", {})}
        vision = config.get("vision_config", {})
        try:
            return cls(**_text_fields(text, config, family), **_vision_fields(vision, text, family))
        except (KeyError, TypeError, ValueError) as e:
            raise VloraError(f"config.json lacks a {family.title} architecture field or has a bad one: {e}") from None

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def attn_width(self) -> int:
        """Width of the queries and of the attention output (heads x head width)."""
        return self.heads * self.head_width

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_width

    @property
    def full_layers(self) -> int:
        return self.layers - self.linear_layers

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def linear_value_width(self) -> int:
        return self.linear_value_heads * self.linear_value_dim

    @property
    def conv_width(self) -> int:
        """Gated DeltaNet's mixed q, k, v projection (in_proj_qkv's output, the causal conv's channels)."""
        return 2 * self.linear_key_heads * self.linear_key_dim + self.linear_value_width

    @property
    def merger_width(self) -> int:
        return self.vision_hidden * self.spatial_merge**2

    @property
    def mergers(self) -> int:
        return 1 + self.deepstack

    @property
    def qwen3(self) -> bool:
        """Qwen3-VL and Qwen3.5: q/k norms, no attention biases; LayerNorm towers with a biased patch embedding, a
        learned position table and linear_fc1/linear_fc2 MLPs."""
        return self.family in ("qwen3_vl", "qwen3_5")


def _text_fields(text: dict, config: dict, family) -> dict:
    """ModelShape's LLM fields from the (merged) text config."""
    layers = int(text["num_hidden_layers"])
    linear = 0
    if family.linear_attention:  # Qwen3.5: layer_types, else every full_attention_interval-th layer is full
        interval = int(text.get("full_attention_interval", 4))
        types = text.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                            for i in range(layers)]
        linear = sum(t == "linear_attention" for t in types)
    # The hub files say num_experts; transformers 5 writes Qwen3-VL-MoE's as num_local_experts (its attribute_map).
    experts = int(text.get("num_experts") or text.get("num_local_experts") or 0)
    moe_layers = 0
    if experts:  # qwen3_5_moe: every layer; qwen3_vl_moe: every decoder_sparse_step-th outside mlp_only_layers
        step, dense = int(text.get("decoder_sparse_step", 1)), set(text.get("mlp_only_layers") or [])
        moe_layers = sum(i not in dense and (i + 1) % step == 0 for i in range(layers))
    return dict(
        hidden=int(text["hidden_size"]), layers=layers, intermediate=int(text.get("intermediate_size") or 0),
        heads=int(text["num_attention_heads"]),
        kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
        head_dim=int(text.get("head_dim") or 0), vocab=int(text["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        family=family.name, linear_layers=linear,
        linear_key_heads=int(text.get("linear_num_key_heads", 0)) if linear else 0,
        linear_value_heads=int(text.get("linear_num_value_heads", 0)) if linear else 0,
        linear_key_dim=int(text.get("linear_key_head_dim", 0)) if linear else 0,
        linear_value_dim=int(text.get("linear_value_head_dim", 0)) if linear else 0,
        linear_conv_kernel=int(text.get("linear_conv_kernel_dim", 4)) if linear else 0,
        moe_layers=moe_layers, experts=experts if moe_layers else 0,
        experts_per_token=int(text.get("num_experts_per_tok", 0)) if moe_layers else 0,
        moe_intermediate=int(text.get("moe_intermediate_size", 0)) if moe_layers else 0,
        shared_expert_intermediate=int(text.get("shared_expert_intermediate_size") or 0) if moe_layers else 0,
    )  # fmt: skip


def _vision_fields(vision: dict, text: dict, family) -> dict:
    """ModelShape's vision fields. Qwen2-VL names the tower's width embed_dim and its MLP embed_dim x mlp_ratio; its
    hidden_size is the merger's output. The others name the width hidden_size, the merger's output out_hidden_size."""
    if family.name == "qwen2_vl":
        width = int(vision["embed_dim"])
        mlp, out = int(width * float(vision.get("mlp_ratio", 4))), int(vision.get("hidden_size", text["hidden_size"]))
    else:
        width, mlp = int(vision["hidden_size"]), int(vision["intermediate_size"])
        out = int(vision.get("out_hidden_size", text["hidden_size"]))
    qwen3 = family.name in ("qwen3_vl", "qwen3_5")
    # transformers' defaults where a Qwen3-VL config leaves them out; Qwen3.5's tower has no DeepStack at all
    deepstack = len(vision.get("deepstack_visual_indexes", (8, 16, 24))) if family.name == "qwen3_vl" else 0
    return dict(
        vision_depth=int(vision["depth"]), vision_hidden=width, vision_intermediate=mlp, vision_out=out,
        spatial_merge=int(vision.get("spatial_merge_size", 2)), patch=int(vision.get("patch_size", family.patch_size)),
        temporal_patch=int(vision.get("temporal_patch_size", 2)),
        in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))), deepstack=deepstack,
        position_embeddings=int(vision.get("num_position_embeddings", 2304)) if qwen3 else 0,
    )  # fmt: skip


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


def _linears(s: ModelShape) -> dict[str, list[tuple[int, int, int]]]:
    """(in, out, how many in the model) of the nn.Linear modules of each LoRA group, and of the LLM's one Linear no
    group adapts (llm_other: Qwen3.5-MoE's shared-expert gate, which bitsandbytes still quantizes)."""
    h, a, kv, n = s.hidden, s.attn_width, s.kv_width, s.full_layers
    q_out = 2 * a if s.family == "qwen3_5" else a  # Qwen3.5's q_proj also yields the attention's output gate
    attn = [(h, q_out, n), (h, kv, n), (h, kv, n), (a, h, n)]
    if s.linear_layers:  # Gated DeltaNet: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj
        m, vw, vh = s.linear_layers, s.linear_value_width, s.linear_value_heads
        attn += [(h, s.conv_width, m), (h, vw, m), (h, vh, m), (h, vh, m), (vw, h, m)]
    i, d, si, e = s.intermediate, s.dense_layers, s.shared_expert_intermediate, s.moe_layers
    # The routed experts are 3-D parameters, not Linear modules: no LoRA, no 4-bit. Dense layers keep their MLP.
    mlp = [(h, i, d), (h, i, d), (i, h, d)] + ([(h, si, e), (h, si, e), (si, h, e)] if si else [])
    vh, vi, mw, depth = s.vision_hidden, s.vision_intermediate, s.merger_width, s.vision_depth
    gated = s.family == "qwen2_5_vl"  # SwiGLU gate/up/down; the others fc1/fc2 (linear_fc1/linear_fc2)
    vision_mlp = [(vh, vi, depth)] * (2 if gated else 1) + [(vi, vh, depth)]
    return {
        "llm_attn": [x for x in attn if x[2]],
        "llm_mlp": [x for x in mlp if x[2]],
        "merger": [(mw, mw, s.mergers), (mw, s.vision_out, s.mergers)],
        "vision_attn": [(vh, 3 * vh, depth), (vh, vh, depth)],
        "vision_mlp": vision_mlp,
        "llm_other": [(h, 1, e)] if si else [],
    }


def _weights(group: list[tuple[int, int, int]]) -> int:
    return sum(a * b * n for a, b, n in group)


def _llm_other_params(s: ModelShape) -> int:
    """The LLM's parameters outside its Linear weights, all in the compute dtype: embeddings, norms, biases, and
    the MoE experts and routers."""
    h, hd = s.hidden, s.head_width
    total = s.layers * 2 * h + h  # input and post-attention RMSNorms, the final norm
    total += s.vocab * h * (1 if s.tied_embeddings else 2)  # embed_tokens (+ lm_head)
    if s.qwen3:
        total += s.full_layers * 2 * hd  # q_norm, k_norm (over one head)
    else:
        total += s.full_layers * (s.attn_width + 2 * s.kv_width)  # q/k/v biases
    if s.linear_layers:  # the depthwise causal conv, the gated RMSNorm over a value head, dt_bias and A_log
        total += s.linear_layers * (s.conv_width * s.linear_conv_kernel + s.linear_value_dim
                                    + 2 * s.linear_value_heads)
    # Routed experts: gate_up_proj (E, 2 x moe width, h) and down_proj (E, h, moe width); the router's (E, h).
    total += s.moe_layers * s.experts * (3 * s.moe_intermediate * h + h)
    return total


def _vision_other_params(s: ModelShape) -> int:
    """The vision blocks' parameters outside their Linear weights, and the patch and position embeddings."""
    vh, vi = s.vision_hidden, s.vision_intermediate
    norms = 2 * (2 * vh if s.family != "qwen2_5_vl" else vh)  # LayerNorm (weight, bias) or RMSNorm, twice
    biases = 3 * vh + vh + (2 * vi if s.family == "qwen2_5_vl" else vi) + vh  # qkv, proj, the MLP's
    patch = s.in_channels * s.temporal_patch * s.patch**2 * vh + (vh if s.qwen3 else 0)  # Conv3d (+ its bias)
    return s.vision_depth * (norms + biases) + patch + s.position_embeddings * vh


def _merger_params(s: ModelShape) -> int:
    """Every merger whole: the main one (norm over the tower's width) and Qwen3-VL's DeepStack ones (norm over the
    merged width), each two biased linears."""
    vh, mw, out = s.vision_hidden, s.merger_width, s.vision_out
    norm = vh if s.family == "qwen2_5_vl" else 2 * vh  # RMSNorm, or LayerNorm's weight and bias
    linears = mw * mw + mw + mw * out + out
    return norm + linears + s.deepstack * (2 * mw + linears)


def param_counts(s: ModelShape, cfg: Config) -> dict[str, int]:
    """Parameters by how they are stored: 'quantized' (4-bit weights), 'unquantized' (the compute dtype, the rest of
    the base) and 'trained' (LoRA, DoRA magnitudes, fully trained mergers)."""
    lin = _linears(s)
    llm = _weights(lin["llm_attn"]) + _weights(lin["llm_mlp"]) + _weights(lin["llm_other"])
    vision_blocks = _weights(lin["vision_attn"]) + _weights(lin["vision_mlp"])
    base = llm + _llm_other_params(s) + vision_blocks + _vision_other_params(s) + _merger_params(s)
    quantized = 0
    if cfg.model.quant != "none":
        quantized += llm
        if cfg.model.quantize_vision:
            quantized += vision_blocks
    ranks = group_values("lora.group_r", cfg.lora.group_r)
    trained = 0
    for group in dict.fromkeys(cfg.lora.targets):
        r = ranks.get(group, cfg.lora.r)
        trained += sum(n * (r * (a + b) + (b if cfg.lora.dora else 0)) for a, b, n in lin[group])
    if cfg.lora.train_merger_fully:
        trained += _merger_params(s)
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


def _per_layer(group: list[tuple[int, int, int]], layers: int, what) -> float:
    """Per-token values of `what(in, out)` summed over a group's linears, averaged over `layers` layers: a model
    whose layers differ (Qwen3.5's hybrid, MoE's dense layers) is counted as that many average layers."""
    return sum(n * what(a, b) for a, b, n in group) / max(1, layers)


def _linear_attention_values(s: ModelShape) -> tuple[int, int]:
    """(compute-dtype values, fp32 values) a Gated DeltaNet layer keeps per token, roughly, in transformers' torch
    fallback (no flash-linear-attention, whose fused kernels keep far less: there this is an upper bound). In the
    compute dtype: the q/k/v mix before and after the causal conv, z, the output before and after its gated norm.
    The chunked rule runs in fp32: about 17 value-width tensors (q, k, v, beta, decays, per-chunk products, with
    the key heads repeated to the value heads) and 5 chunk-wide rows of the intra-chunk matrices per value head.
    Fitted to what autograd saves in the tiny Qwen3.5 (tests/test_memory.py), not a count."""
    vw = s.linear_value_width
    return 2 * s.conv_width + 4 * vw, 17 * vw + 5 * s.linear_value_heads * LINEAR_ATTENTION_CHUNK


def _llm_layer_bytes(s: ModelShape, b: int, ranks: dict, dropped: set) -> float:
    """Bytes autograd keeps per token in the average decoder layer (see the module docstring)."""
    lin, h, a = _linears(s), s.hidden, s.attn_width
    full, linear, moe = s.full_layers / s.layers, s.linear_layers / s.layers, s.moe_layers / s.layers
    fp32 = 2 * h  # the two RMSNorms' inputs
    values = 2 * h  # their normalised outputs
    # Full attention: q, k, v (GQA repeated) and the output before and after the reshape. Qwen3's q/k norms keep
    # their fp32 inputs; Qwen3.5's output gate keeps the gate and the gated output.
    values += full * (5 * a + (2 * a if s.family == "qwen3_5" else 0))
    fp32 += full * (a + s.kv_width) if s.qwen3 else 0
    if s.linear_layers:
        compute, single = _linear_attention_values(s)
        values, fp32 = values + linear * compute, fp32 + linear * single
    values += 4 * s.intermediate * s.dense_layers / s.layers  # gate, up, SiLU(gate), product
    if s.moe_layers:  # per routed copy of a token its input and its expert's four; the router's fp32 softmax
        values += moe * (s.experts_per_token * (h + 4 * s.moe_intermediate) + 4 * s.shared_expert_intermediate)
        fp32 += moe * 2 * s.experts
    for group in ("llm_attn", "llm_mlp"):
        if group in ranks:  # each adapted linear's rank-r intermediate; with dropout its own dropped input + mask
            values += _per_layer(lin[group], s.layers, lambda i, o, r=ranks[group]: r)
            if group in dropped:
                values += (b + 1) / b * _per_layer(lin[group], s.layers, lambda i, o: i)
    return 4 * fp32 + b * values


def _vision_block_bytes(s: ModelShape, b: int, ranks: dict, dropped: set) -> float:
    """Bytes autograd keeps per patch in one vision block (the full-attention layer's count at the tower's sizes)."""
    lin, vh = _linears(s), s.vision_hidden
    values = 7 * vh + (4 if s.family == "qwen2_5_vl" else 2) * s.vision_intermediate  # SwiGLU or GELU MLP
    for group in ("vision_attn", "vision_mlp"):
        if group in ranks:
            values += _per_layer(lin[group], s.vision_depth, lambda i, o, r=ranks[group]: r)
            if group in dropped:
                values += (b + 1) / b * _per_layer(lin[group], s.vision_depth, lambda i, o: i)
    return 2 * 4 * vh + b * values


def activation_bytes(s: ModelShape, cfg: Config) -> float:
    """The activations term: what autograd keeps for one micro-batch (see the module docstring)."""
    b = compute_bytes(cfg)
    seq = cfg.data.pack_length or cfg.data.max_length
    tokens = cfg.optim.micro_batch * seq
    groups = group_values("lora.group_r", cfg.lora.group_r)
    ranks = {g: groups.get(g, cfg.lora.r) for g in cfg.lora.targets}
    dropped = set(cfg.lora.targets) if cfg.lora.dropout > 0 else set()
    layer = _llm_layer_bytes(s, b, ranks, dropped)
    ckpt = cfg.model.gradient_checkpointing
    activations = tokens * ((s.layers * s.hidden * b + layer) if ckpt else s.layers * layer)
    if {"vision_attn", "vision_mlp"} & set(cfg.lora.targets):
        image_tokens = min(seq, cfg.data.max_pixels // (s.patch * s.spatial_merge) ** 2)
        patches = cfg.optim.micro_batch * image_tokens * s.spatial_merge**2
        block = _vision_block_bytes(s, b, ranks, dropped)
        depth, vh = s.vision_depth, s.vision_hidden
        activations += patches * ((depth * vh * b + block) if ckpt else depth * block)
    return activations


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

    tokens = cfg.optim.micro_batch * (cfg.data.pack_length or cfg.data.max_length)
    logits = tokens * s.vocab * 12
    working = _working_bytes(s, cfg, b, per_weight, stage)
    return MemoryEstimate(
        base_4bit=round(base_4bit / weights_div), unquantized=round(unquantized / weights_div), trained=round(trained),
        activations=round(activation_bytes(s, cfg)), logits=round(logits), working=round(working), reserve=RESERVE,
        trained_params=t)


def _working_bytes(s: ModelShape, cfg: Config, b: int, per_weight: float, stage: int) -> float:
    """Transients: the largest 4-bit weight dequantized for its matmul; under ZeRO-3 also two gathered decoder layers
    (the average layer, its experts and norms included) or the larger of the embedding and lm_head."""
    lin = _linears(s)
    llm = lin["llm_attn"] + lin["llm_mlp"]
    working = max(a * o for a, o, _ in llm) * b if cfg.model.quant != "none" else 0
    if stage >= 3:
        quantized = sum(_weights(lin[g]) for g in ("llm_attn", "llm_mlp", "llm_other"))
        other = _llm_other_params(s) - s.vocab * s.hidden * (1 if s.tied_embeddings else 2)
        layer = (quantized * (per_weight if cfg.model.quant != "none" else b) + other * b) / s.layers
        working += max(2 * layer, s.vocab * s.hidden * b)
    return working
