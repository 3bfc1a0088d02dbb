"""The 4-bit base + LoRA: where adapters go, what stays unquantized, and the supervised-token loss."""

import json

import bitsandbytes as bnb
import pytest
import torch

from conftest import tiny_lora_model
import torch.nn.functional as F

from vlora.data.collate import Collator
from vlora.model import SupervisedLoss, full_logits, load_processor


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    return tiny_lora_model(tiny_model_dir)


@pytest.fixture(scope="module")
def collator(tiny_model_dir):
    return Collator(load_processor(str(tiny_model_dir)), min_pixels=3136, max_pixels=12544, max_length=512)


def text_sample(key: str, answer: str) -> dict:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour is the sky?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"__key__": key, "json": json.dumps({"messages": messages}).encode()}


def test_lora_sits_on_llm_attention_mlp_and_merger_only(peft_model):
    wrapped = sorted(n.split("base_model.model.")[1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
                     and "lora_A" not in n.split(".")[-1])
    llm = [n for n in wrapped if ".language_model." in n]
    assert len(llm) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert [n for n in wrapped if n not in llm] == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
    assert not any(".visual.blocks." in n for n in wrapped)  # the vision tower's own MLPs are not targeted


def test_llm_linears_are_4bit_and_the_rest_stays_full_precision(peft_model):
    base = peft_model.get_base_model()
    four_bit = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14 and all(".language_model." in n for n in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.model.visual.modules())
    assert base.lm_head.weight.dtype == torch.float32 and not base.lm_head.weight.requires_grad
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_loss_sum_matches_cross_entropy_on_full_logits(peft_model, collator, demo_shards):
    import webdataset as wds

    from vlora.data.manifest import shard_paths

    samples = list(wds.WebDataset(shard_paths(demo_shards / "val"), shardshuffle=False, empty_check=False))[:3]
    batch = collator.collate([collator.encode(s) for s in samples])
    loss_sum = SupervisedLoss(peft_model)(batch)
    logits = full_logits(peft_model, batch)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    assert batch["loss_index"].numel() == int((batch["labels"][:, 1:] != -100).sum()) > 0
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)


def test_text_only_batch_still_reaches_every_trainable_weight(peft_model, collator):
    """A rank whose batch has no image must produce the same set of gradients as one that has (DDP, ZeRO)."""
    batch = collator.collate([collator.encode(text_sample("a", "Blue.")), collator.encode(text_sample("b", "Grey."))])
    assert "pixel_values" not in batch
    loss_model = SupervisedLoss(peft_model)
    assert loss_model.vision_trains
    peft_model.zero_grad(set_to_none=True)
    loss = loss_model(batch)
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    merger = [g for n, g in grads.items() if ".merger." in n]
    assert merger and all(torch.count_nonzero(g) == 0 for g in merger)  # reached, but the loss is unchanged
    assert any(torch.count_nonzero(g) > 0 for n, g in grads.items() if ".language_model." in n)
    loss_model.vision_trains = False
    assert loss_model(batch).item() == loss.item()
    peft_model.zero_grad(set_to_none=True)
