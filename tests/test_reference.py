"""The seeds' reference recipe (vlora.reference) runs HF's own Trainer loop, with the step hooks around each step."""

import math
import threading

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def toy_batches(tiny_model_dir):
    """Two ready batches of 4 rows for the toy model, as a processor gives them (mm_token_type_ids included)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batches = []
    for colour in ((200, 30, 30), (30, 30, 200)):
        texts = [processor.apply_chat_template([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The circle is red." * (1 + i % 2)}]},
        ], tokenize=False) for i in range(4)]  # fmt: skip
        images = [Image.new("RGB", (56, 56), colour)] * 4
        batch = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


def test_two_steps_of_hf_trainer_with_hooks_around_each_step(tiny_model_dir, toy_batches):
    from vlora.reference import run_reference

    events, seen = [], {}
    thread = threading.get_ident()

    def on_model(model):
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        seen["before"] = {n: p.detach().clone() for n, p in lora.items()}
        seen["lora"] = lora
        model.register_forward_hook(lambda *_: events.append("forward"))

    def begin(step):
        assert threading.get_ident() == thread  # the training thread: a TorchDispatchMode opened here sees the step
        events.append(("begin", step))
        seen["at_begin"] = {n: p.detach().clone() for n, p in seen["lora"].items() if "lora_B" in n}

    def end(step):
        events.append(("end", step))
        # The optimizer step and zero_grad lie inside the hooks: the adapter moved and no gradient is left over.
        assert any(not torch.equal(seen["lora"][n], w) for n, w in seen["at_begin"].items())
        assert all(p.grad is None for p in seen["lora"].values())

    out = run_reference(tiny_model_dir, toy_batches, gradient_checkpointing=True, steps=2, step_begin=begin,
                        step_end=end, on_model=on_model)
    assert events == [("begin", 0), "forward", ("end", 0), ("begin", 1), "forward", ("end", 1)]
    assert len(out["losses"]) == 2 and all(math.isfinite(x) and x > 0 for x in out["losses"])
    assert len(out["step_seconds"]) == 2 and all(s > 0 for s in out["step_seconds"])
    assert out["tokens"] == sum(b["input_ids"].numel() for b in toy_batches)
    assert out["peak_memory_bytes"] > 0 and out["peak_memory_kind"] == "cpu_max_rss"

    # LoRA r=64 on the seven linears of each of the toy's 2 LLM blocks, and nothing else trains.
    names = seen["lora"].keys()
    assert len(names) == 2 * 7 * 2 and all(".language_model.layers." in n for n in names)
    assert out["trainable_parameters"] == sum(p.numel() for p in seen["lora"].values())
    assert any(not torch.equal(seen["lora"][n], w) for n, w in seen["before"].items() if "lora_A" in n)


def test_the_collator_hands_over_the_callers_tensors(toy_batches):
    from vlora.reference import _collator, _Rows

    rows = _Rows(n_batches=2, rows=4, steps=3)
    assert len(rows) == 12
    collate = _collator(toy_batches)
    for step in range(3):
        batch = collate([rows[step * 4 + r] for r in range(4)])
        assert all(batch[k] is v for k, v in toy_batches[step % 2].items())
    with pytest.raises(RuntimeError, match="rows of different batches"):
        collate([rows[0], rows[5]])


def test_recipe_details():
    from vlora.reference import LLM_LINEARS, LORA, reference_args, reference_dtypes
    import re

    assert reference_dtypes("cpu") == (torch.bfloat16, torch.float32)
    assert reference_dtypes("cuda") == (torch.bfloat16, torch.bfloat16)
    assert LORA["r"] == 64 and LORA["lora_alpha"] == 16 and LORA["lora_dropout"] == 0.05
    for name in ("base_model.model.model.language_model.layers.0.self_attn.q_proj",
                 "base_model.model.model.language_model.layers.11.mlp.down_proj"):  # fmt: skip
        assert re.fullmatch(LLM_LINEARS, name)
    for name in ("base_model.model.model.visual.blocks.0.mlp.down_proj", "base_model.model.lm_head",
                 "base_model.model.model.visual.merger.mlp.0"):  # fmt: skip
        assert not re.fullmatch(LLM_LINEARS, name)
    args = reference_args("/tmp/unused", gradient_checkpointing=False, steps=3, batch_size=4, device="cpu")
    assert args.per_device_train_batch_size == 4 and args.optim == "adamw_torch_fused" and args.report_to == []
    assert args.max_steps == 3 and not args.bf16
