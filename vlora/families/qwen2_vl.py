"""Qwen2-VL (2B, 7B, 72B): Qwen2.5-VL's predecessor. 14 px patches, full attention in every vision block, a
LayerNorm + GELU MLP (`fc1`/`fc2`) in the blocks, the same merger; grounding boxes relative, 0-1000."""

from vlora.families import Family, LLM_ATTN, LLM_MLP, TinySpec, VISION, VISION_ATTN, text_config, top_config


def tiny_config(spec: TinySpec):
    from transformers import Qwen2VLConfig

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": [2, 3, 3]}
    text = text_config(spec, use_sliding_window=False, max_window_layers=2, rope_parameters=rope)
    # Qwen2-VL's vision config names its width embed_dim; its hidden_size is the merger's output (the LLM width).
    vision = dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=spec.init_range)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **top_config(spec))


FAMILY = Family(
    name="qwen2_vl",
    title="Qwen2-VL",
    model_types=("qwen2_vl",),
    patch_size=14,
    lora_targets={
        "llm_attn": LLM_ATTN,
        "llm_mlp": LLM_MLP,
        "merger": VISION + r"merger\.mlp\.(0|2)",
        "vision_attn": VISION_ATTN,
        "vision_mlp": VISION + r"blocks\.\d+\.mlp\.(fc1|fc2)",
    },
    mergers=r"merger",
    boxes="relative",
    processor_class="Qwen2VLProcessor",
    tiny_config=tiny_config,
)
