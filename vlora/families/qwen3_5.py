"""Qwen3.5 (natively multimodal; dense and MoE): Qwen3-VL's vision tower without DeepStack, and a hybrid decoder
where Gated DeltaNet (linear attention, `linear_attn.*`) layers sit beside gated full attention; a 248k vocabulary;
grounding boxes relative, 0-1000 (as Qwen3-VL).

Packing (data.pack_length) needs the fused kernels of flash-linear-attention and causal-conv1d: transformers' torch
fallback for the linear-attention layers runs over a whole packed row and carries state from one sample into the
next. vlora.model.check_packing refuses it without them.

MoE (`qwen3_5_moe`): the routed experts are 3-D parameters (frozen, unquantized, no LoRA); the shared expert's
projections are Linear modules, which llm_mlp adapts.
"""

from vlora.families import Family, LLM, TinySpec, VISION, VISION_ATTN, text_config, top_config
from vlora.families.qwen3_vl import vision_config

# transformers loads every qwen3_5 tokenizer as Qwen3_5Tokenizer, whose split regex adds combining marks to
# letters; the tiny model's BPE is trained with it so that its ids survive a reload on any text.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"""
                     r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def tiny_config(spec: TinySpec):
    from transformers import Qwen3_5Config

    # rotary dim = head_dim x partial_rotary_factor = 8 -> 4 frequencies (the real 256 x 0.25 -> [11, 11, 10])
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True, "partial_rotary_factor": 0.5}
    text = text_config(spec, head_dim=16, rope_parameters=rope, layer_types=["linear_attention", "full_attention"],
                       linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                       linear_num_key_heads=2, linear_num_value_heads=4)
    return Qwen3_5Config(text_config=text, vision_config=vision_config(spec), **top_config(spec))


FAMILY = Family(
    name="qwen3_5",
    title="Qwen3.5",
    model_types=("qwen3_5", "qwen3_5_moe"),
    patch_size=16,
    lora_targets={
        "llm_attn": LLM + r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                          r"|linear_attn\.(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj))",
        "llm_mlp": LLM + r"mlp\.(shared_expert\.)?(gate_proj|up_proj|down_proj)",
        "merger": VISION + r"merger\.(linear_fc1|linear_fc2)",
        "vision_attn": VISION_ATTN,
        "vision_mlp": VISION + r"blocks\.\d+\.mlp\.(linear_fc1|linear_fc2)",
    },
    mergers=r"merger",
    boxes="relative",
    processor_class="Qwen3VLProcessor",
    tiny_config=tiny_config,
    linear_attention=True,
    image_mean=(0.5, 0.5, 0.5),
    pretokenize_regex=PRETOKENIZE_REGEX,
)
