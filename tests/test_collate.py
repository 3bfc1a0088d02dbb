"""Shard samples -> model batches: labels, 3-D RoPE positions, pixel budgets, length limit, padding."""

import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from vlora.data.collate import IGNORE, Collator
from vlora.data.manifest import shard_paths

TOKENS_4 = 28 * 28 * 4  # 56x56 pixels: 4 image tokens after the 2x2 merge
TOKENS_16 = 28 * 28 * 16  # 112x112 pixels: 16 image tokens
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from vlora.model import load_processor

    return load_processor(str(tiny_model_dir))


@pytest.fixture(scope="module")
def make_collator(processor):
    def make(**kw):
        args = {"min_pixels": TOKENS_4, "max_pixels": TOKENS_16, "max_length": 1024, **kw}
        return Collator(processor, **args)

    return make


@pytest.fixture(scope="module")
def demo_samples(demo_shards):
    """The first 32 train samples (one shard) exactly as the stream hands them to `encode`."""
    ds = wds.WebDataset(shard_paths(demo_shards / "train")[:1], shardshuffle=False, empty_check=False)
    samples = list(ds)
    assert len(samples) == 32
    return samples


def _png(size=(112, 112), seed=0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _text(t):
    return {"type": "text", "text": t}


def _sample(messages, images=(), key="k") -> dict:
    """A sample as WebDataset yields it from KEY.json + KEY.<i>.png."""
    s = {"__key__": key, "json": json.dumps({"messages": messages}).encode()}
    for i, blob in enumerate(images):
        s[f"{i}.png"] = blob
    return s


def _runs(tok, item) -> list[str]:
    """The decoded runs of consecutive supervised tokens."""
    sup = (item["labels"] != IGNORE).tolist()
    runs, cur = [], []
    for i, on in enumerate(sup):
        if on:
            cur.append(int(item["input_ids"][i]))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def _answer(sample) -> str:
    (reply,) = [m for m in json.loads(sample["json"])["messages"] if m["role"] == "assistant"]
    return "".join(p["text"] for p in reply["content"])


def _vision_ids(tok):
    return torch.tensor([tok.convert_tokens_to_ids(t) for t in VISION_TOKENS])


MULTI_TURN = [
    {"role": "system", "content": [_text("Be brief.")]},
    {"role": "user", "content": [{"type": "image"}, _text("What colour is it?")]},
    {"role": "assistant", "content": [_text("Red.")]},
    {"role": "user", "content": [_text("And the shape?")]},
    {"role": "assistant", "content": [_text("A circle, see "), {"type": "image"}, _text(" here.")]},
]


# --- labels ---------------------------------------------------------------------------------------


def test_demo_labels_are_the_answer_and_im_end(make_collator, processor, demo_samples):
    col, tok = make_collator(), processor.tokenizer
    for s in demo_samples:
        item = col.encode(s)
        sup = item["labels"] != IGNORE
        assert tok.decode(item["input_ids"][sup]) == _answer(s) + "<|im_end|>", s["__key__"]
        assert torch.equal(item["labels"][sup], item["input_ids"][sup])
        assert _runs(tok, item) == [_answer(s) + "<|im_end|>"]  # one contiguous run, the last turn
        assert item["key"] == s["__key__"]


def test_vision_tokens_never_carry_loss(make_collator, processor, demo_samples):
    tok = processor.tokenizer
    vision = _vision_ids(tok)
    multi = _sample(MULTI_TURN, [_png(seed=1), _png((56, 112), seed=2)])
    n_vision = 0
    for train_on in ("assistant", "all"):
        col = make_collator(train_on=train_on)
        for s in [*demo_samples[:8], multi]:
            item = col.encode(s)
            is_vision = torch.isin(item["input_ids"], vision)
            n_vision += int(is_vision.sum())
            assert (item["labels"][is_vision] == IGNORE).all(), (train_on, s["__key__"])
    assert n_vision > 0


def test_multi_turn_supervises_every_reply_only(make_collator, processor):
    tok = processor.tokenizer
    item = make_collator().encode(_sample(MULTI_TURN, [_png(seed=1), _png((56, 112), seed=2)]))
    # The image inside the second reply splits its run; no system or user token is supervised.
    assert _runs(tok, item) == ["Red.<|im_end|>", "A circle, see ", " here.<|im_end|>"]


def test_train_on_all_also_supervises_user_turns(make_collator, processor):
    tok = processor.tokenizer
    item = make_collator(train_on="all").encode(_sample(MULTI_TURN, [_png(seed=1), _png((56, 112), seed=2)]))
    assert _runs(tok, item) == [
        "What colour is it?<|im_end|>",  # the user's image tokens before it are not supervised
        "Red.<|im_end|>",
        "And the shape?<|im_end|>",
        "A circle, see ",
        " here.<|im_end|>",
    ]  # the system turn stays unsupervised


# --- 3-D RoPE positions ---------------------------------------------------------------------------


def test_mrope_positions_match_the_models_get_rope_index(tiny_model_dir, make_collator, demo_samples):
    from transformers import Qwen2_5_VLForConditionalGeneration

    col = make_collator()
    two_images = _sample(
        [
            {"role": "user", "content": [_text("Compare "), {"type": "image"}, _text(" and "), {"type": "image"}]},
            {"role": "assistant", "content": [_text("The first is wider.")]},
        ],
        [_png((112, 56), seed=3), _png((56, 112), seed=4)],  # non-square: height and width axes differ
        key="two",
    )
    text_only = _sample(
        [{"role": "user", "content": "Count the objects carefully and report the number, please."},
         {"role": "assistant", "content": "There are four shapes."}],
        key="text",
    )
    items = [col.encode(s) for s in (demo_samples[0], two_images, text_only, demo_samples[1])]
    assert len({x["input_ids"].numel() for x in items}) >= 3  # really padded
    batch = col.collate(items)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 8], [1, 8, 4], [1, 8, 8]]

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    types = (batch["input_ids"] == model.config.image_token_id).int()
    expected, _ = model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=types, image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    mask = batch["attention_mask"].bool()
    assert batch["position_ids"].shape == expected.shape == (3, 4, mask.shape[1])
    assert torch.equal(batch["position_ids"][:, mask], expected[:, mask])
    # The text-only row is plain 1-D positions on all three axes.
    n = int(mask[2].sum())
    assert torch.equal(batch["position_ids"][:, 2, :n], torch.arange(n).expand(3, -1))


# --- pixel budgets --------------------------------------------------------------------------------


def _one_image(entry=None):
    return _sample(
        [{"role": "user", "content": [entry or {"type": "image"}, _text("What is it?")]},
         {"role": "assistant", "content": [_text("Noise.")]}],
        [_png((112, 112))],
    )


def _image_tokens(processor, item) -> int:
    return int((item["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def test_run_pixel_limits_set_the_image_token_count(make_collator, processor):
    small = make_collator(max_pixels=TOKENS_4).encode(_one_image())
    assert _image_tokens(processor, small) == 4
    assert small["image_grid_thw"].tolist() == [[1, 4, 4]] and small["pixel_values"].shape[0] == 16
    big = make_collator(max_pixels=TOKENS_16).encode(_one_image())
    assert _image_tokens(processor, big) == 16
    assert big["image_grid_thw"].tolist() == [[1, 8, 8]] and big["pixel_values"].shape[0] == 64
    # min_pixels up-scales: a 112x112 image with a 32-token floor gets more than its native 16.
    up = make_collator(min_pixels=28 * 28 * 32, max_pixels=28 * 28 * 64).encode(_one_image())
    assert _image_tokens(processor, up) > 16


def test_per_image_entry_overrides_the_run_limit(make_collator, processor):
    col = make_collator(max_pixels=TOKENS_16)
    assert _image_tokens(processor, col.encode(_one_image({"type": "image", "max_pixels": 3136}))) == 4
    fixed = col.encode(_one_image({"type": "image", "resized_height": 56, "resized_width": 112}))
    assert fixed["image_grid_thw"].tolist() == [[1, 4, 8]] and _image_tokens(processor, fixed) == 8
    assert _image_tokens(processor, col.encode(_one_image())) == 16  # the override did not stick


def test_per_image_max_pixels_below_run_min_pixels(make_collator, processor):
    col = make_collator(min_pixels=TOKENS_16, max_pixels=28 * 28 * 64)
    assert _image_tokens(processor, col.encode(_one_image({"type": "image", "max_pixels": 3136}))) == 4


# --- max_length -----------------------------------------------------------------------------------


def test_too_long_sample_is_skipped_never_truncated(make_collator, demo_samples):
    s = demo_samples[0]
    n = make_collator().encode(s)["input_ids"].numel()
    exact = make_collator(max_length=n)
    assert exact.encode(s)["input_ids"].numel() == n
    assert make_collator(max_length=n - 1).encode(s) is None  # skipped whole, not cut


def test_loss_index_points_at_the_supervised_next_tokens(make_collator, demo_samples):
    """loss_index: flat indices r * L + c into the whole (rows x L) grid of the positions that predict a supervised
    token (c < L - 1), so the loss gathers hidden.reshape(-1, H), a view, and copies nothing else."""
    col = make_collator()
    batch = col.collate([col.encode(s) for s in demo_samples[:3]])
    labels = batch["labels"]
    width = labels.shape[1]
    targets = labels[:, 1:]
    assert torch.equal(batch["loss_targets"], targets[targets != -100])
    expected = [r * width + c for r in range(labels.shape[0]) for c in range(width - 1) if labels[r, c + 1] != -100]
    assert batch["loss_index"].tolist() == expected
    rows, cols = batch["loss_index"] // width, batch["loss_index"] % width
    assert (cols < width - 1).all() and len(set(rows.tolist())) == 3
    assert torch.equal(batch["input_ids"].reshape(-1)[batch["loss_index"] + 1], batch["loss_targets"])
    assert torch.equal(batch["input_ids"][rows, cols + 1], batch["loss_targets"])


def test_images_over_pils_bomb_limit_still_load(make_collator, processor):
    """`vlora pack` checked sizes against --max-image-pixels (which may exceed PIL's default); a data worker must not
    raise PIL's DecompressionBombError on such an image. PIL's own limit is left as it was."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # 112x112 = 12544 pixels: over twice this, PIL's error threshold
    try:
        item = make_collator().encode(_one_image())
        assert _image_tokens(processor, item) == 16
        assert Image.MAX_IMAGE_PIXELS == 1000
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# --- collate --------------------------------------------------------------------------------------


def test_collate_pads_right_to_the_longest(make_collator, processor, demo_samples):
    col = make_collator()
    text_only = _sample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], key="t")
    two = _sample([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, _text("Same?")]},
                   {"role": "assistant", "content": [_text("No.")]}],
                  [_png((56, 56), seed=5), _png((112, 56), seed=6)], key="two")
    samples = [demo_samples[3], text_only, two, demo_samples[4]]
    items = [col.encode(s) for s in samples]
    b = col.collate(items)
    lengths = [x["input_ids"].numel() for x in items]
    n, longest = len(items), max(lengths)
    assert b["keys"] == [s["__key__"] for s in samples] == [items[i]["key"] for i in range(n)]
    assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape == (n, longest)
    assert b["position_ids"].shape == (3, n, longest)
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row, (x, k) in enumerate(zip(items, lengths)):
        assert torch.equal(b["input_ids"][row, :k], x["input_ids"])
        assert torch.equal(b["labels"][row, :k], x["labels"])
        assert torch.equal(b["position_ids"][:, row, :k], x["position_ids"])
        assert (b["attention_mask"][row, :k] == 1).all()
        assert (b["input_ids"][row, k:] == pad).all()
        assert (b["attention_mask"][row, k:] == 0).all()
        assert (b["labels"][row, k:] == IGNORE).all()
    assert min(lengths) < longest  # some row was padded
    # Images in sample order: demo (8x8 patches), two (4x4, 4x8), demo.
    assert b["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 4], [1, 4, 8], [1, 8, 8]]
    assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum()) == 64 + 16 + 32 + 64
    with_images = [x for x in items if "pixel_values" in x]
    assert torch.equal(b["pixel_values"], torch.cat([x["pixel_values"] for x in with_images]))


@pytest.mark.parametrize("pack_length", [0, 512])
def test_collate_writes_pixel_values_where_empty_puts_them(make_collator, demo_samples, pack_length):
    """A data worker passes `empty` to place pixel_values in the memory that carries the batch: the same batch,
    the pixels written into the one tensor it made, with the shape and dtype of what torch.cat gives."""
    col = make_collator(pack_length=pack_length, pixel_dtype=torch.bfloat16)
    items = [col.encode(s) for s in demo_samples[5:8]]
    made = []

    def empty(shape, dtype):
        made.append(torch.full(shape, float("nan"), dtype=dtype))
        return made[-1]

    b, want = col.collate(items, empty=empty), col.collate(items)
    assert len(made) == 1 and b["pixel_values"].data_ptr() == made[0].data_ptr()
    assert (made[0].shape, made[0].dtype) == ((3 * 64, 1176), torch.bfloat16)
    assert list(b) == list(want)
    for key, value in want.items():
        assert torch.equal(b[key], value) if isinstance(value, torch.Tensor) else b[key] == value, key
    text_only = col.encode(_sample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]))
    assert "pixel_values" not in col.collate([text_only], empty=empty) and len(made) == 1  # nothing to place


def test_collate_text_only_batch_has_no_pixels(make_collator):
    col = make_collator()
    items = [col.encode(_sample([{"role": "user", "content": t}, {"role": "assistant", "content": "Yes."}], key=t))
             for t in ("Hi", "Is the sky blue today?")]
    b = col.collate(items)
    assert "pixel_values" not in b and "image_grid_thw" not in b
    assert b["keys"] == ["Hi", "Is the sky blue today?"]
    assert b["attention_mask"].sum(1).tolist() == [x["input_ids"].numel() for x in items]
    assert b["n_samples"] == 2 and b["n_tokens"] == int(b["attention_mask"].sum())


def test_images_follow_their_index_not_dict_order(make_collator):
    """KEY.1.png may come before KEY.0.png in the tar; the image index, not the order, decides."""
    s = {"__key__": "k", "1.png": _png((56, 112), seed=8), "json": json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, _text("?")]},
        {"role": "assistant", "content": [_text("Ok.")]},
    ]}).encode(), "0.png": _png((112, 56), seed=7)}
    assert make_collator().encode(s)["image_grid_thw"].tolist() == [[1, 4, 8], [1, 8, 4]]
