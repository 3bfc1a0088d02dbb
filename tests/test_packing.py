"""Sequence packing: several samples per row, each with its own RoPE positions, attention kept within each sample.

The reference is the padded batch (one sample per row): packing must give the same loss, logits and gradients.
"""

import io
import json

import pytest
import torch

from conftest import tiny_lora_model
import webdataset as wds
from PIL import Image

from vlora.data.collate import IGNORE, Collator, first_fit
from vlora.data.manifest import shard_paths
from vlora.model import SupervisedLoss, full_logits, load_processor

PACK = 240  # the samples below: rows [0, 1, 2, 5] (full, two-image sample mid-row) and [3, 4, 6] (padded)


def _png(size, seed) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()).save(
        buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(str(tiny_model_dir))


@pytest.fixture(scope="module")
def items(processor, demo_shards):
    """6 demo samples and a two-image one (non-square images: distinct grids), encoded once."""
    demo = list(wds.WebDataset(shard_paths(demo_shards / "val"), shardshuffle=False, empty_check=False))[:6]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                             {"type": "text", "text": " with "}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The first is wider than the second."}]}]
    two = {"__key__": "two", "json": json.dumps({"messages": messages}).encode(),
           "0.png": _png((112, 56), seed=1), "1.png": _png((56, 112), seed=2)}
    col = Collator(processor, min_pixels=3136, max_pixels=12544, max_length=512)
    return [col.encode(s) for s in demo[:2] + [two] + demo[2:]]


@pytest.fixture(scope="module")
def batches(processor, items):
    padded = Collator(processor, min_pixels=3136, max_pixels=12544, max_length=512).collate(items)
    packed = Collator(processor, min_pixels=3136, max_pixels=12544, max_length=512, pack_length=PACK).collate(items)
    return padded, packed


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def peft_model(request, tiny_model_dir):
    return tiny_lora_model(tiny_model_dir, f"model.attn_implementation={request.param}")


def _row_major(batch) -> list[int]:
    return sorted(range(len(batch["spans"])), key=lambda i: batch["spans"][i][:2])


# --- the packed batch -----------------------------------------------------------------------------


def test_first_fit_fills_earlier_rows_and_isolates_long_samples():
    assert first_fit([60, 60, 50, 30, 200, 10], 128) == [[0, 1], [2, 3, 5], [4]]


def test_packed_batch_layout(batches, items, processor):
    padded, b = batches
    rows, length = b["input_ids"].shape
    assert rows == 2 and b["position_ids"].shape == (4, rows, length) and "attention_mask" not in b
    assert b["keys"] == padded["keys"] == [x["key"] for x in items] and b["n_samples"] == len(items)
    assert b["n_tokens"] == padded["n_tokens"] == sum(x["input_ids"].numel() for x in items)
    assert _row_major(b) != list(range(len(items)))  # first-fit reordered: the image order below is really tested
    used = torch.zeros(rows, length, dtype=torch.bool)
    for x, (r, start, k) in zip(items, b["spans"]):
        end = start + k
        assert torch.equal(b["input_ids"][r, start:end], x["input_ids"])
        # Row 0: text positions restart at every sample (transformers' sequence boundaries); rows 1-3: the
        # sample's own 3-D positions, as if it were alone.
        assert torch.equal(b["position_ids"][0, r, start:end], torch.arange(k))
        assert torch.equal(b["position_ids"][1:, r, start:end], x["position_ids"])
        assert b["labels"][r, start] == IGNORE and torch.equal(b["labels"][r, start + 1 : end], x["labels"][1:])
        used[r, start:end] = True
    assert all(int(used[r].sum()) <= PACK for r in range(rows))
    assert (b["input_ids"][~used] == processor.tokenizer.pad_token_id).all()
    assert (b["labels"][~used] == IGNORE).all()
    # Images follow the samples in row-major order: the order in which the model fills the <|image_pad|> tokens.
    order = [items[i] for i in _row_major(b) if "pixel_values" in items[i]]
    assert torch.equal(b["pixel_values"], torch.cat([x["pixel_values"] for x in order]))
    assert torch.equal(b["image_grid_thw"], torch.cat([x["image_grid_thw"] for x in order]))
    assert [4, 8] in b["image_grid_thw"][:, 1:].tolist() and [8, 4] in b["image_grid_thw"][:, 1:].tolist()


def test_loss_never_crosses_a_sample_boundary(batches):
    """Every supervised position predicts a token of its own sample; the same targets as the padded batch."""
    padded, b = batches
    width = b["input_ids"].shape[1]  # flat indices into the whole rows x L grid
    rows, cols = b["loss_index"] // width, b["loss_index"] % width
    assert (cols < width - 1).all()
    for r, c in zip(rows.tolist(), cols.tolist()):
        assert any(r == row and start <= c and c + 1 < start + k for row, start, k in b["spans"])
    assert torch.equal(b["input_ids"][rows, cols + 1], b["loss_targets"])
    assert sorted(b["loss_targets"].tolist()) == sorted(padded["loss_targets"].tolist())


def test_transformers_builds_the_block_diagonal_causal_mask(batches, peft_model):
    """With no attention_mask and restarting text positions, create_causal_mask (sdpa: bool, eager: additive)
    lets each token see only earlier tokens of its own sample; the row-end padding is a block of its own."""
    from transformers.masking_utils import create_causal_mask

    _, b = batches
    rows, length = b["input_ids"].shape
    seq = torch.full((rows, length), -1)  # which sample (or -1-r: padding) each token belongs to
    seq[:] = -1 - torch.arange(rows)[:, None]
    for i, (r, start, k) in enumerate(b["spans"]):
        seq[r, start : start + k] = i
    idx = torch.arange(length)
    expected = (seq[:, :, None] == seq[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])
    config = peft_model.get_base_model().model.language_model.config
    mask = create_causal_mask(config=config, inputs_embeds=torch.zeros(rows, length, 1), attention_mask=None,
                              past_key_values=None, position_ids=b["position_ids"][0])
    allowed = mask if mask.dtype == torch.bool else mask == 0
    assert config._attn_implementation in ("sdpa", "eager") and mask.shape == (rows, 1, length, length)
    assert torch.equal(allowed[:, 0], expected)


# --- packed == padded through the model -----------------------------------------------------------


def _supervised_logits(logits, batch, spans=None):
    """Logits at each supervised position, sample by sample in key order."""
    out = []
    for i in range(len(batch["keys"])):
        r, start, k = spans[i] if spans else (i, 0, int(batch["attention_mask"][i].sum()))
        sup = (batch["labels"][r, start + 1 : start + k] != IGNORE).nonzero().squeeze(1) + start
        out.append(logits[r, sup])
    return torch.cat(out)


def test_packed_loss_logits_and_gradients_equal_padded(batches, peft_model):
    padded, packed = batches
    loss_model = SupervisedLoss(peft_model)
    results = []
    for batch in (padded, packed):
        peft_model.zero_grad(set_to_none=True)
        loss = loss_model(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    peft_model.zero_grad(set_to_none=True)
    (loss_pad, grads_pad), (loss_pack, grads_pack) = results
    assert loss_pack.item() == pytest.approx(loss_pad.item(), rel=1e-4)
    for name, g in grads_pad.items():
        assert (grads_pack[name] - g).norm() <= 1e-4 * g.norm() + 1e-12, name
    assert any(g.norm() > 0 for n, g in grads_pad.items() if ".merger." in n)  # the images matter too

    logits_pad = _supervised_logits(full_logits(peft_model, padded), padded)
    logits_pack = _supervised_logits(full_logits(peft_model, packed), packed, packed["spans"])
    assert logits_pad.shape[0] == packed["loss_index"].numel()
    torch.testing.assert_close(logits_pack, logits_pad, rtol=1e-4, atol=1e-4)


def test_attention_leaking_across_samples_would_change_the_loss(batches, peft_model):
    """The equality above can fail: with a plain causal mask over the whole row (what an attention_mask of ones
    gives), later samples see earlier ones and the loss moves."""
    padded, packed = batches
    loss_model = SupervisedLoss(peft_model)
    with torch.no_grad():
        ref = loss_model(padded).item()
        leaky = loss_model({**packed, "attention_mask": torch.ones_like(packed["input_ids"])}).item()
    assert abs(leaky - ref) > 1e-3 * ref
