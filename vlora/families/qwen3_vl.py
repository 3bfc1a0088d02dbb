"""Qwen3-VL (2B-32B dense; 30B-A3B and 235B-A22B MoE): 16 px patches (32 px per LLM token), a learned position
embedding, DeepStack (features of some vision blocks go through their own mergers and are added to the first
decoder layers' hidden states at the image positions), interleaved mRoPE; grounding boxes relative, 0-1000.

MoE (`qwen3_vl_moe`): each layer's experts are 3-D parameters, not Linear modules, so neither bitsandbytes' 4-bit
layers nor LoRA's reach them: they stay frozen in the compute dtype (about 58 GB of bf16 for the 30B-A3B), and
lora.targets llm_mlp, which would find no module to adapt, is refused. Attention, the mergers and the vision tower
train as in the dense models.
"""

from vlora.families import Family, LLM_ATTN, LLM_MLP, TinySpec, VISION, VISION_ATTN, text_config, top_config


def vision_config(spec: TinySpec, **extra) -> dict:
    """Qwen3-VL's and Qwen3.5's tiny vision tower (the same class in both)."""
    return dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="gelu_pytorch_tanh",
                in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                num_position_embeddings=64, initializer_range=spec.init_range, **extra)  # 64: an 8x8 grid


def tiny_config(spec: TinySpec):
    from transformers import Qwen3VLConfig

    # 8 rotary frequencies, interleaved over (temporal, height, width) like the real [24, 20, 20] of 64
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": [4, 2, 2],
            "mrope_interleaved": True}
    # DeepStack from both vision blocks into the first two of three decoder layers (the real models: blocks 8, 16,
    # 24 into layers 0-2 of 36). Not into the last layer: there it would reach only the image positions' outputs,
    # which no loss reads, and its merger's LoRA would get an all-zero gradient by construction.
    text = text_config(spec, head_dim=16, rope_parameters=rope)
    text["num_hidden_layers"] = 3
    vision = vision_config(spec, deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **top_config(spec))


FAMILY = Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    model_types=("qwen3_vl", "qwen3_vl_moe"),
    patch_size=16,
    lora_targets={
        "llm_attn": LLM_ATTN,
        "llm_mlp": LLM_MLP,  # dense models only: MoE experts are no modules
        "merger": VISION + r"(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2)",
        "vision_attn": VISION_ATTN,
        "vision_mlp": VISION + r"blocks\.\d+\.mlp\.(linear_fc1|linear_fc2)",
    },
    mergers=r"merger|deepstack_merger_list\.\d+",
    boxes="relative",
    processor_class="Qwen3VLProcessor",
    tiny_config=tiny_config,
    image_mean=(0.5, 0.5, 0.5),
)
