"""Shard samples -> model batches: images resized once, chat template, processor, labels, 3-D RoPE positions, padding
(or packing several samples per row).

Runs inside the data-loader workers, so everything per-sample (image decoding and resizing, tokenization,
label masks, the multimodal RoPE positions that the model would otherwise compute with a Python loop on the
training step's critical path) is done here, off the GPU's way.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import io
import json
import logging
from collections.abc import Callable

import torch
from PIL import Image

log = logging.getLogger("vlora")

IGNORE = -100
# Qwen's own per-image keys: a sample may override the run's resolution for one image.
PER_IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


def image_entries(messages: list[dict]) -> list[dict]:
    """The image placeholders of a conversation, in order (their index matches KEY.<i>.<ext>)."""
    return [
        part
        for m in messages
        if isinstance(m["content"], list)
        for part in m["content"]
        if part.get("type") == "image"
    ]


def sample_images(sample: dict) -> list[bytes]:
    """The image bytes stored beside KEY.json, ordered by their index (KEY.0.jpg, KEY.1.png, ...)."""
    numbered = [k for k in sample if k.split(".", 1)[0].isdigit()]
    return [sample[k] for k in sorted(numbered, key=lambda k: int(k.split(".", 1)[0]))]


def mrope_positions(token_types: torch.Tensor, image_grid_thw: torch.Tensor | None, merge: int) -> torch.Tensor:
    """Qwen-VL's 3-D RoPE positions (temporal, height, width) for ONE unpadded sample, shape (3, L).

    Text tokens count up on all three axes; an image's tokens take (t, row, col) offsets from the position where
    the image starts, and text after it resumes at start + max(rows, cols). Same result as every family's own
    `get_rope_index` for images (tested per family; they differ only for video), computed per sample so that padding
    and packing cannot shift it, and about 6x faster.
    """
    length = token_types.numel()
    pos = torch.empty(3, length, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    kinds, runs = torch.unique_consecutive(token_types, return_counts=True)  # runs of text / of one image's tokens
    i, current = 0, 0
    for kind, n in zip(kinds.tolist(), runs.tolist()):
        j = i + n
        if kind == 0:
            pos[:, i:j] = torch.arange(current, current + n).expand(3, -1)
            current += n
        else:
            t, h, w = next(grids)
            h, w = h // merge, w // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pos[:, i:j] = torch.stack([tt, hh, ww]).reshape(3, -1) + current
            current += max(h, w)
        i = j
    return pos


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: each sample, in order, joins the first row with room for it, else opens a new row.
    A sample longer than `capacity` opens a row of its own that nothing else joins."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        r = next((r for r, free in enumerate(room) if n <= free), None)
        if r is None:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[r].append(i)
            room[r] -= n
    return rows


class Collator:
    """Encodes single samples (`encode`) and pads (or, with `pack_length`, packs) a list of them into a batch.

    `boxes`: the family's grounding convention (vlora.data.grounding): boxes stored in original pixels are rewritten
    for the model once the resize is known; None leaves text as it is. `boundaries`: packed samples go into ONE row
    with `cu_seq_lens_q` and `seq_idx`, which the fused linear-attention kernels (Qwen3.5) need to keep them apart.
    """

    def __init__(self, processor, *, min_pixels: int, max_pixels: int, max_length: int, train_on: str = "assistant",
                 pixel_dtype: torch.dtype = torch.float32, pack_length: int = 0, boxes: str | None = None,
                 boundaries: bool = False):
        self.processor = processor
        self.boxes, self.boundaries = boxes, boundaries
        self.pixel_dtype = pixel_dtype  # the vision tower's dtype: cast here, in the worker, not after the copy
        self.pack_length = pack_length  # 0: one sample per row, padded to the longest
        self.tok = processor.tokenizer
        self.min_pixels, self.max_pixels, self.max_length = min_pixels, max_pixels, max_length
        self.train_on = train_on
        self.image_token_id = self.tok.convert_tokens_to_ids("<|image_pad|>")
        vision_tokens = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
        self.vision_ids = torch.tensor([self.tok.convert_tokens_to_ids(t) for t in vision_tokens])
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.im_start = self.tok.convert_tokens_to_ids("<|im_start|>")
        # A turn is found by `<|im_start|>ROLE` and the newline token after it (which may be "\n\n" or longer
        # when the reply starts with a newline: BPE merges them). `train_on` says which roles carry loss.
        roles = ("assistant",) if train_on == "assistant" else ("user", "assistant")
        self.headers = [self.tok.encode(f"<|im_start|>{r}", add_special_tokens=False) for r in roles]
        assert all(h[0] == self.im_start for h in self.headers), "a turn header must start with <|im_start|>"
        self.pad_id = self.tok.pad_token_id
        self.merge = processor.image_processor.merge_size
        self.patch = processor.image_processor.patch_size  # 14 or 16: images resize to multiples of patch x merge

    def load_images(self, messages: list[dict], blobs: list[bytes]) -> tuple[list[Image.Image], list[tuple[int, int]]]:
        """The images resized as the model sees them, and their original (width, height)."""
        from qwen_vl_utils import fetch_image

        images, originals = [], []
        # PIL's decompression-bomb limit is off while decoding: `vlora pack` already checked every image against
        # --max-image-pixels (which may be above PIL's default), so an image it accepted must not raise
        # DecompressionBombError here, in a data worker, mid-training. Restored after, as it is process-wide.
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            for entry, blob in zip(image_entries(messages), blobs, strict=True):
                spec = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
                spec.update({k: entry[k] for k in PER_IMAGE_KEYS if k in entry})
                # A per-image limit wins over the run's, also when it asks for fewer pixels than the run's minimum.
                spec["min_pixels"] = min(spec["min_pixels"], spec["max_pixels"])
                spec["image"] = Image.open(io.BytesIO(blob))
                originals.append(spec["image"].size)
                images.append(fetch_image(spec, image_patch_size=self.patch))
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        return images, originals

    def label_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True on the tokens that carry loss: each supervised turn's content and the <|im_end|> that closes it."""
        mask = torch.zeros_like(ids, dtype=torch.bool)
        seq = ids.tolist()
        ends = (ids == self.im_end).nonzero().squeeze(1).tolist()
        resume = 0  # a supervised turn runs to its <|im_end|>: no header is looked for inside it
        for i in (ids == self.im_start).nonzero().squeeze(1).tolist():  # every header starts with <|im_start|>
            if i < resume:
                continue
            header = next((h for h in self.headers if seq[i : i + len(h)] == h), None)
            newline = i + len(header) if header else -1
            if header is None or newline >= len(seq) or not self.tok.decode(seq[newline]).startswith("\n"):
                continue
            start = newline + 1
            k = bisect.bisect_left(ends, start)
            end = ends[k] if k < len(ends) else len(seq)  # the turn's <|im_end|>, or the end of the sequence
            mask[start : end + 1] = True
            resume = end + 1
        # Image and video tokens never carry loss, even inside a supervised turn.
        return mask & ~torch.isin(ids, self.vision_ids)

    def encode(self, sample: dict) -> dict | None:
        """One shard sample -> tensors of one unpadded sequence; None (counted, logged) if it does not fit."""
        meta = json.loads(sample["json"])
        messages = meta["messages"]
        images, originals = self.load_images(messages, sample_images(sample))
        if self.boxes:
            from vlora.data.formats import RecordError
            from vlora.data.grounding import convert_boxes

            try:
                messages = convert_boxes(messages, originals, [im.size for im in images], self.boxes)
            except RecordError as e:  # shards packed before boxes were checked: skip, never train on a wrong box
                log.warning("skipping sample %s: %s", sample.get("__key__"), e)
                return None
        text = self.processor.apply_chat_template(messages, tokenize=False)
        # No mm_token_type_ids: training passes its own 3-D positions (below), and the processor's per-token loop
        # would be a fifth of this function's time.
        enc = self.processor(text=[text], images=images or None, do_resize=False, return_tensors="pt",
                             return_mm_token_type_ids=False)
        ids = enc["input_ids"][0]
        if ids.numel() > self.max_length:
            # Cutting would split an image's tokens or drop the answer: skip the sample, never truncate it.
            log.warning("skipping sample %s: %d tokens > data.max_length=%d", sample.get("__key__"), ids.numel(), self.max_length)
            return None
        grid = enc.get("image_grid_thw")
        token_types = (ids == self.image_token_id).long()
        labels = torch.where(self.label_mask(ids), ids, IGNORE)
        out = {
            "key": sample.get("__key__", ""),
            "input_ids": ids,
            "labels": labels,
            "position_ids": mrope_positions(token_types, grid, self.merge),
        }
        if images:
            out["pixel_values"] = enc["pixel_values"].to(self.pixel_dtype)
            out["image_grid_thw"] = grid
        return out

    def collate(self, items: list[dict], empty: Callable = torch.empty) -> dict:
        """Pad to the longest sample in the batch (right padding; pads are masked and carry no loss), or pack.

        `empty(shape, dtype=)` makes the tensor that `pixel_values` is written into: a data worker passes one that
        places it in the shared memory that carries the batch to the trainer (stream.Slabs), saving a copy.
        """
        if self.pack_length > 0:
            return self.collate_packed(items, empty)
        n, length = len(items), max(x["input_ids"].numel() for x in items)
        batch = {
            "input_ids": torch.full((n, length), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, length), dtype=torch.long),
            "labels": torch.full((n, length), IGNORE, dtype=torch.long),
            "position_ids": torch.zeros((3, n, length), dtype=torch.long),
        }
        for row, x in enumerate(items):
            k = x["input_ids"].numel()
            batch["input_ids"][row, :k] = x["input_ids"]
            batch["attention_mask"][row, :k] = 1
            batch["labels"][row, :k] = x["labels"]
            batch["position_ids"][:, row, :k] = x["position_ids"]
        return self.finish(batch, items, row_major=items, empty=empty)

    def collate_packed(self, items: list[dict], empty: Callable = torch.empty) -> dict:
        """Pack samples first-fit into rows of at most `pack_length` tokens, padded to the longest row.

        `position_ids` is (4, rows, L): row 0 holds text positions restarting at 0 for every sample, rows 1-3 each
        sample's own 3-D RoPE positions. There is no `attention_mask`: with it absent (and no cache), transformers
        splits each row into sequences wherever the text position does not step by +1 and masks attention
        causally within each sequence only, for sdpa and eager alike. `spans[i]` = (row, start, length) of `keys[i]`.
        """
        lengths = [x["input_ids"].numel() for x in items]
        # The linear-attention kernels take boundaries for one row only: there every sample shares it.
        rows = [list(range(len(items)))] if self.boundaries else first_fit(lengths, self.pack_length)
        n, length = len(rows), max(sum(lengths[i] for i in row) for row in rows)
        batch = {
            "input_ids": torch.full((n, length), self.pad_id, dtype=torch.long),
            "labels": torch.full((n, length), IGNORE, dtype=torch.long),
            "position_ids": torch.zeros((4, n, length), dtype=torch.long),
        }
        spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(items)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                x, end = items[i], start + lengths[i]
                batch["input_ids"][r, start:end] = x["input_ids"]
                batch["labels"][r, start:end] = x["labels"]
                # The previous sample's last position would predict this token: never a target (it is a system or
                # user token anyway, but a sample's first token has nothing of its own before it).
                batch["labels"][r, start] = IGNORE
                batch["position_ids"][0, r, start:end] = torch.arange(lengths[i])
                batch["position_ids"][1:, r, start:end] = x["position_ids"]
                spans[i] = (r, start, lengths[i])
                start = end
            # The row's padding restarts at 0 as well: a sequence of its own, which no real token attends to.
            batch["position_ids"][:, r, start:] = torch.arange(length - start)
        batch["spans"] = spans
        if self.boundaries:  # one row, no padding: the sample boundaries as the fused kernels take them
            batch["cu_seq_lens_q"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(len(items), dtype=torch.int32),
                                                       torch.tensor(lengths))[None]
        # The model scatters image features into the <|image_pad|> tokens in row-major order: images follow it.
        return self.finish(batch, items, row_major=[items[i] for row in rows for i in row], empty=empty)

    @staticmethod
    def finish(batch: dict, items: list[dict], row_major: list[dict], empty: Callable = torch.empty) -> dict:
        """Images in row-major order, loss positions, and the per-batch counts (keys in the items' order)."""
        with_images = [x for x in row_major if "pixel_values" in x]
        if with_images:
            pixels = [x["pixel_values"] for x in with_images]
            dtype = functools.reduce(torch.promote_types, (p.dtype for p in pixels))  # what torch.cat would give
            out = empty((sum(p.shape[0] for p in pixels), *pixels[0].shape[1:]), dtype=dtype)
            batch["pixel_values"] = torch.cat(pixels, out=out)
            batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in with_images])
        # The predicting positions, as flat indices r * L + c into the whole (rows x L) grid (c < L - 1), whose
        # next token carries loss, and those tokens: the loss gathers hidden.reshape(-1, H) (a view) with
        # index_select, so the device never resolves a boolean mask and no activation is copied whole.
        labels = batch["labels"]
        rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
        batch["loss_index"] = rows * labels.shape[1] + cols
        batch["loss_targets"] = labels[rows, cols + 1]
        batch["keys"] = [x["key"] for x in items]
        batch["n_samples"] = len(items)
        batch["n_tokens"] = sum(x["input_ids"].numel() for x in items)  # real (non-pad) tokens, for throughput
        return batch
