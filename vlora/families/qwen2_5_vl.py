"""Qwen2.5-VL (3B, 7B, 32B, 72B): 14 px patches, a windowed-attention vision tower with SwiGLU MLPs, grounding
boxes in absolute pixels of the resized image."""

from vlora.families import Family, LLM_ATTN, LLM_MLP, TinySpec, VISION, VISION_ATTN, text_config, top_config


def tiny_config(spec: TinySpec):
    from transformers import Qwen2_5_VLConfig

    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width), like Qwen's [16, 24, 24]
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": [2, 3, 3]}
    text = text_config(spec, use_sliding_window=False, max_window_layers=2, rope_parameters=rope)
    # Vision widths are multiples of 64: bitsandbytes' CPU 4-bit kernel needs in_features >= its blocksize
    # (64), so a 32-wide tower crashes on the CPU if it is quantized (the real 1280-wide one does not).
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="silu", in_channels=3,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
        window_size=112, fullatt_block_indexes=[1], out_hidden_size=64, initializer_range=spec.init_range,
    )  # fmt: skip
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top_config(spec))


FAMILY = Family(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    patch_size=14,
    lora_targets={
        "llm_attn": LLM_ATTN,
        "llm_mlp": LLM_MLP,
        "merger": VISION + r"merger\.mlp\.(0|2)",
        "vision_attn": VISION_ATTN,
        "vision_mlp": VISION + r"blocks\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    },
    mergers=r"merger",
    boxes="absolute",
    processor_class="Qwen2_5_VLProcessor",
    tiny_config=tiny_config,
)
