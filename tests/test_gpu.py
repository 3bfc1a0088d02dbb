"""GPU path (skipped without CUDA): bf16 autocast over an nf4 base with bf16 compute, as on a real cluster."""

import pytest
import torch

from helpers import train_in_process

pytestmark = pytest.mark.gpu


def test_bf16_qlora_trains_on_gpu(tiny_model_dir, demo_shards, tmp_path, monkeypatch):
    result = train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **{
        "optim.max_steps": 30, "optim.global_batch": 8, "optim.micro_batch": 8})
    model = result.model
    assert result.world.device.type == "cuda"
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.is_cuda for p in lora)  # adapters train in fp32
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16  # frozen weights never up-cast
    assert result.val_losses[30] < result.val_losses[0] - 1.0
