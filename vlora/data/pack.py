"""Annotation files -> validated WebDataset shards + manifest.json + rejects.jsonl.

Packing is where bad data is caught, once, with the record named, so that training never meets it in a data
worker. Every record read is either written or rejected (read == written + rejected, always); a reject is a
line of rejects.jsonl with its file, record index (and line, for JSON Lines), a reason code and a detail:

    invalid_json, invalid_utf8, bad_record    the line or record cannot be read as a sample
    bad_task                                  a "task" that is not a string of 1-64 characters (not blank,
                                              no control characters)
    image_count_mismatch                      placeholders and the image list disagree (or one sits in an answer)
    special_token                             a Qwen control token (<|im_end|>, <|image_pad|>, ...) in the text
    no_assistant, empty_answer                nothing to learn from
    remote_image                              an http(s) URL: packing never downloads (data: URIs are decoded)
    image_missing, image_unreadable           not there, or not fully decodable (truncated files included)
    image_not_a_file                          a directory, FIFO, device (/dev/zero) or socket: never opened
    image_too_large                           over --max-image-pixels (PIL's decompression-bomb limit), or over
                                              --max-image-bytes (checked on the file's size before reading)
    image_outside_root                        with --confine: resolves outside --image-root and the file's folder
    bad_aspect_ratio                          over 200:1, which Qwen's smart_resize refuses, or so narrow that it
                                              resizes to zero width under max_pixels (--max-pixels or per image)
    too_many_tokens                           over --max-tokens at the run's pixel limits (optional check)
    duplicate_key                             two records would share a shard key

Written samples, one per key:

    KEY.json    {"messages": canonical messages, "source": {"file", "index"[, "line"]}, "images": [{"width", "height"}][,
                 "task": the record's task label, only when it has one]}
    KEY.0.png   the original image bytes, never re-encoded (KEY.1.jpg, ... for more images)

The same inputs and flags give byte-identical shards and manifest (fixed tar metadata, sorted JSON, results
taken in record order whatever the number of workers), so shard hashes in the manifest identify the data.
The manifest counts the written samples per task ("tasks": {task: n}) when any record has a task; without
tasks, shards and manifest are what they were before tasks existed.
Everything is written to a temporary sibling folder that replaces `out` only when complete: a crash never
leaves a folder that looks like a finished shard set.

A folder `src` is read one annotation file at a time. Inside it, `.json` files that match no annotation format
(LLaMA-Factory's dataset_info.json) and folders holding a manifest.json (earlier shard sets) are skipped and
listed in the summary and the manifest (`skipped`), not read and not an error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import stat
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from webdataset import TarWriter

from vlora import families
from vlora.data.grounding import check_boxes, convert_boxes
from vlora.data.formats import BOM, Record, RecordError, UnknownFormat, read_annotations
from vlora.data.manifest import FORMAT, MANIFEST, write_manifest
from vlora.errors import VloraError

REJECTS = "rejects.jsonl"
# Fixed tar metadata: with time.time() and the default owner the same data would hash differently per run.
TAR_META = {"user": "vlora", "group": "vlora", "mode": 0o444, "mtime": 0}
# ustar member names hold 100 bytes; keep room for ".NN.jpeg"-style suffixes.
MAX_KEY = 80
EXT_ALIASES = {"jpeg": "jpg", "tif": "tiff"}
KNOWN_EXTS = {"jpg", "png", "webp", "gif", "bmp", "tiff"}
PIL_EXTS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
MAX_ASPECT_RATIO = 200  # qwen_vl_utils.smart_resize's limit
PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS
MAX_IMAGE_BYTES = 64 << 20  # generous: a photo is a few MiB; only a bound on what one record can make us read
ANNOTATION_SUFFIXES = (".json", ".jsonl")
# Records per worker task: large enough to amortise the inter-process round trip, small enough to balance.
CHUNK = 64
SHOWN_REJECTS = 3  # rejects named on the console when --max-reject is exceeded
# Qwen's control tokens. In a sample's text the tokenizer turns them into the real tokens: an <|im_end|> or
# <|im_start|> cuts the turn (and its label mask) short, an <|image_pad|> breaks the image-token count in a data
# worker. `<|vision_start|>PATH<|vision_end|>` is an image placeholder and is gone by now; a lone one is not.
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>",
                  "<|vision_start|>", "<|vision_end|>")
_SPECIAL = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


@dataclass
class PackSummary:
    """Counts of one pack run. Invariant: read == written + rejected."""

    read: int = 0
    written: int = 0
    # per resize factor, the largest max_pixels_floor of the written images: data.max_pixels must reach it
    max_pixels_floor: dict = field(default_factory=lambda: dict.fromkeys(RESIZE_FACTORS, 0))
    rejected: int = 0
    shards: int = 0
    rejects_by_reason: dict = field(default_factory=dict)
    paths_resolved_by_suffix: int = 0  # image paths found by a PathResolver fallback (ancestor folder, shorter path)
    first_rejects: list = field(default_factory=list)  # the first SHOWN_REJECTS lines of rejects.jsonl
    skipped: list = field(default_factory=list)  # "name (why)" of files and folders under a folder src not read
    shard_size: int = 0
    last_shard: int = 0  # samples in the last shard: readers whose share holds it get fewer samples per epoch
    tasks: dict = field(default_factory=dict)  # written samples per "task" label (samples without one not counted)
    src: str = ""
    out: str = ""
    seconds: float = 0.0


def format_summary(s: PackSummary) -> str:
    """One line for the console: counts, reasons, where the rejects are, path fallbacks, speed."""
    line = f"packed {s.src} -> {s.out}: read {s.read}, wrote {s.written} in {s.shards} shard(s), rejected {s.rejected}"
    if s.rejected:
        reasons = ", ".join(f"{r} {n}" for r, n in s.rejects_by_reason.items())
        line += f" ({reasons}; see {Path(s.out) / REJECTS})"
    if s.shards > 1 and s.last_shard < s.shard_size:  # uneven shards make uneven per-reader epochs (stream.py)
        line += f", last shard {s.last_shard} of {s.shard_size} samples"
    if s.skipped:
        line += f", skipped {len(s.skipped)} ({'; '.join(s.skipped[:3])}{'; ...' if len(s.skipped) > 3 else ''})"
    if s.paths_resolved_by_suffix:
        line += f", {s.paths_resolved_by_suffix} image path(s) resolved by fallback (ancestor folder or shorter path)"
    rate = s.written / s.seconds if s.seconds > 0 else 0.0
    return line + f" in {s.seconds:.1f} s ({rate:.0f} samples/s)"


def reject_location(r: dict) -> str:
    """file:line for JSON Lines, file[index] for a JSON array."""
    return f"{r['source']}:{r['line']}" if r.get("line") else f"{r['source']}[{r['index']}]"


def reject_report(s: PackSummary, max_reject: float) -> list[str]:
    """Error lines when more than `max_reject` (a fraction) of the records were rejected, else []."""
    if not s.rejected or s.rejected <= max_reject * s.read:
        return []
    head = (f"rejected {s.rejected} of {s.read} records ({s.rejected / s.read:.1%}), more than --max-reject {max_reject:g}; "
            f"the shards are written, every reject is in {Path(s.out) / REJECTS}")
    return [head] + [f"{reject_location(r)} {r['reason']} {r['detail']}" for r in s.first_rejects]


def sample_key(raw: dict | None, stem: str, index: int, *, scoped: bool = False) -> str:
    """The record's "id" (f"{stem}/{id}" when `scoped`), else f"{stem}-{index:08d}", reduced to [A-Za-z0-9_-].

    WebDataset splits a member name at the first dot of its base name into key and extension, so a
    dot (or slash) in a key would silently split one sample into two: they become underscores.
    """
    rid = raw.get("id") if isinstance(raw, dict) else None
    name = f"{stem}-{index:08d}" if rid in (None, "") else f"{stem}/{rid}" if scoped else str(rid)
    key = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if len(key) > MAX_KEY:  # keep long ids distinct after truncation
        key = key[: MAX_KEY - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return key


# --- per-sample checks (run in the worker processes) ------------------------------------------------


def check_sample(sample: dict) -> None:
    """Raise RecordError for a sample that would fail or teach nothing in training (images not checked here)."""
    messages = sample["messages"]
    tags = sum(part["type"] == "image" for m in messages for part in m["content"])
    if tags != len(sample["images"]):  # formats.py binds them one to one; a guard against a new reader's bug
        raise RecordError("image_count_mismatch", f"{tags} <image> tag(s) but {len(sample['images'])} image(s); make them match")
    for j, m in enumerate(messages):
        for part in m["content"]:
            if part["type"] == "text" and (hit := _SPECIAL.search(part["text"])):
                raise RecordError("special_token", f"message {j} ({m['role']}) holds Qwen's special token {hit.group(0)}, which "
                                                   "would cut the turn or its image tokens short; remove it or spell it differently")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant", "no assistant turn, nothing to learn; add an answer")
    for j, m in enumerate(messages):
        if m["role"] == "assistant" and not "".join(p.get("text", "") for p in m["content"]).strip():
            raise RecordError("empty_answer", f"assistant message {j} is empty; fill it in or drop the turn")


def _too_large(i: int, name, size: str, max_bytes: int) -> RecordError:
    return RecordError("image_too_large", f"image {i} {name}: {size}, over --max-image-bytes {max_bytes}; "
                                          "raise the limit or re-encode the image smaller")


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_a_file(i: int, path: Path, mode: int) -> RecordError:
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "a special file")
    return RecordError("image_not_a_file", f"image {i} {path}: {kind}, not a regular file")


def _file_bytes(path: Path, i: int, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, or RecordError; anything else is refused unopened.

    An annotation may name any path: open() blocks on a FIFO until a writer comes, /dev/zero never ends and
    opening some devices has side effects. So the path is stat'ed first (following symlinks, as open would)
    and only a regular file of an acceptable size is opened.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RecordError("image_missing", f"image {i} not found: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise RecordError("image_unreadable", f"image {i} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_file(i, path, st.st_mode)
    if st.st_size > max_bytes:
        raise _too_large(i, path, f"{st.st_size} bytes", max_bytes)
    try:
        # O_NONBLOCK: were the path swapped for a FIFO after the stat, open returns at once (no wait for a
        # writer) and fstat refuses it; on a regular file the flag changes nothing.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
                raise _not_a_file(i, path, mode)
            # The size seen by stat plus one byte; should the file have grown since, read on, to one byte over the cap.
            data = f.read(min(st.st_size, max_bytes) + 1)
            if len(data) > st.st_size:
                data += f.read(max_bytes + 1 - len(data))
    except FileNotFoundError:
        raise RecordError("image_missing", f"image {i} not found: {path}") from None
    except OSError as e:
        raise RecordError("image_unreadable", f"image {i} {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise _too_large(i, path, "grew while read", max_bytes)
    return data


def _image_bytes(ref: Path | str, i: int, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes behind an image reference: a file, or a base64 data: URI (formats.py keeps those as strings)."""
    if not isinstance(ref, str):
        return _file_bytes(ref, i, max_bytes)
    header, _, payload = ref.partition(",")
    try:
        if not header.endswith(";base64"):
            raise ValueError("only base64 data: URIs are supported")
        data = base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error) as e:
        raise RecordError("image_unreadable", f"image {i} {header[:40]}: {e}") from None
    if len(data) > max_bytes:  # the same limit as for a file, wherever the bytes come from
        raise _too_large(i, header[:40], f"{len(data)} bytes", max_bytes)
    return data


def read_image(ref: Path | str, i: int, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes, str, int, int]:
    """(original bytes, extension, width, height) of image i; RecordError if missing, not a regular file,
    undecodable or too large.

    The pixel limit is PIL's Image.MAX_IMAGE_PIXELS (set by the pack run): over it PIL warns, over twice it
    raises DecompressionBombError; both become an `image_too_large` reject, found from the header before decoding.
    """
    data = _image_bytes(ref, i, max_bytes)
    name = ref if isinstance(ref, Path) else "(data: URI)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                # A full decode, not just the header: a truncated file must fail here, not in a training worker.
                im.load()
                (w, h), pil_format = im.size, im.format
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise RecordError("image_too_large", f"image {i} {name}: {e} Raise --max-image-pixels or downscale it") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...
        raise RecordError("image_unreadable", f"image {i} {name}: {type(e).__name__}: {e}") from None
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise RecordError("bad_aspect_ratio", f"image {i} {name}: {w}x{h} is more than {MAX_ASPECT_RATIO}:1")
    ext = ref.suffix.lower().lstrip(".") if isinstance(ref, Path) else ""
    ext = EXT_ALIASES.get(ext, ext)
    if ext not in KNOWN_EXTS:  # no or odd suffix: name it after the content so decoders pick it up
        ext = PIL_EXTS.get(pil_format, (pil_format or "img").lower())
    return data, ext, w, h


QWEN_FACTOR = 28  # Qwen2.5-VL's patch (14) x spatial merge (2): one image token per 28 x 28 pixels
# Every family's resize factor (28 for Qwen2/2.5-VL, 32 for Qwen3-VL/3.5). A pack without --model does not know
# which family will train on it: the manifest's pixel floor is kept per factor.
RESIZE_FACTORS = tuple(sorted({families.get(name).resize_factor for name in families.NAMES}))


def resized_size(entry: dict, width: int, height: int, *, min_pixels: int, max_pixels: int,
                 factor: int = QWEN_FACTOR) -> tuple[int, int]:
    """(height, width) that training resizes image `entry` to, as Collator.load_images + qwen_vl_utils.fetch_image do.

    RecordError where that resize would fail in a data worker: a zero side (a narrow image under a small
    max_pixels; smart_resize floors it to 0) or a fixed resized_height/width over 200:1.
    """
    from qwen_vl_utils import smart_resize

    if "resized_height" in entry and "resized_width" in entry:  # fetch_image's fixed size, at its default limits
        try:
            return smart_resize(entry["resized_height"], entry["resized_width"], factor=factor)
        except ValueError as e:
            raise RecordError("bad_aspect_ratio", f"resized_height/resized_width: {e}") from None
    hi = entry.get("max_pixels", max_pixels)  # a per-image limit wins over the run's, also below its minimum
    lo = min(entry.get("min_pixels", min_pixels), hi)
    h, w = smart_resize(height, width, factor=factor, min_pixels=lo, max_pixels=hi)
    if not h or not w:
        raise RecordError("bad_aspect_ratio", f"a {width}x{height} image resizes to {w}x{h} under max_pixels {hi}; raise max_pixels or crop it")
    return h, w


def max_pixels_floor(entry: dict, width: int, height: int, factor: int = QWEN_FACTOR) -> int:
    """The smallest run max_pixels (data.max_pixels) under which image `entry` still resizes without a zero side;
    0 when the run's limit plays no part (the entry brings its own max_pixels or a fixed size).

    smart_resize shrinks an image only when its factor-rounded size exceeds max_pixels, and then a side comes out
    zero exactly when max_pixels * short side < factor^2 * long side. Both bounds are upward-closed, so the
    smaller one is the threshold (+1 on the second: no float rounding at the exact boundary).
    """
    if "max_pixels" in entry or ("resized_height" in entry and "resized_width" in entry):
        return 0
    fits = max(factor, round(height / factor) * factor) * max(factor, round(width / factor) * factor)
    return min(fits, factor * factor * max(width, height) // min(width, height) + 1)


class TokenCounter:
    """The tokens a sample will take in training: chat-template text + image tokens at the run's pixel limits.

    Mirrors vlora.data.collate.Collator.encode (same template and processor, same per-image overrides,
    qwen_vl_utils.smart_resize) without resizing any pixels: an image resized to h x w takes
    (h / 28) * (w / 28) tokens, i.e. (h / patch / merge) * (w / patch / merge).
    """

    def __init__(self, model: str, *, min_pixels: int, max_pixels: int, boxes: str = "original"):
        import qwen_vl_utils  # noqa: F401  here, before the pool forks, so that workers inherit it
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        ip = self.processor.image_processor
        self.factor = ip.patch_size * ip.merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        # Boxes in image pixels are rewritten in training (more or fewer digits): count the rewritten text.
        self.boxes = families.of_model_path(model).box_convention(boxes)

    def image_tokens(self, entry: dict, width: int, height: int) -> int:
        h, w = resized_size(entry, width, height, min_pixels=self.min_pixels, max_pixels=self.max_pixels, factor=self.factor)
        return (h // self.factor) * (w // self.factor)

    def count(self, messages: list[dict], sizes: list[dict]) -> int:
        entries = [p for m in messages for p in m["content"] if p["type"] == "image"]
        if self.boxes:
            originals = [(s["width"], s["height"]) for s in sizes]
            resized = [resized_size(e, w, h, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                                    factor=self.factor)[::-1] for e, (w, h) in zip(entries, originals)]
            messages = convert_boxes(messages, originals, resized, self.boxes)
        text = self.processor.apply_chat_template(messages, tokenize=False)
        ids = self.processor.tokenizer(text)["input_ids"]  # here each image is one <|image_pad|>
        return len(ids) - len(entries) + sum(self.image_tokens(e, s["width"], s["height"]) for e, s in zip(entries, sizes))


class Checker:
    """Checks one canonical sample and reads its images: the per-record work that runs in the worker pool."""

    def __init__(self, *, max_image_pixels: int, min_pixels: int, max_pixels: int, max_tokens: int | None = None,
                 counter: TokenCounter | None = None, max_image_bytes: int = MAX_IMAGE_BYTES, boxes: str = "original"):
        self.max_image_pixels, self.min_pixels, self.max_pixels = max_image_pixels, min_pixels, max_pixels
        self.max_image_bytes = max_image_bytes
        self.max_tokens, self.counter, self.boxes = max_tokens, counter, boxes
        # The --model's factor; without one, every family's: a per-image size (which the manifest's floor does not
        # cover) must resize at each, or a Qwen3-VL run would meet a zero side in a data worker.
        self.factors = (counter.factor,) if counter is not None else RESIZE_FACTORS

    def __call__(self, sample: dict | None):
        """[(bytes, extension, width, height) per image] or the RecordError; None for a record already rejected."""
        if sample is None:
            return None
        Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        try:
            check_sample(sample)
            seen = {}
            parts = [p for m in sample["messages"] for p in m["content"] if p["type"] == "image"]
            for i, (ref, part) in enumerate(zip(sample["images"], parts)):
                if ref not in seen:  # a sample may show one image twice: decode it once
                    seen[ref] = read_image(ref, i, self.max_image_bytes)
                _, _, w, h = seen[ref]
                # Only per-image sizes or a very narrow image can fail to resize: skipping the others spares
                # importing qwen_vl_utils (and torchvision with it, ~1.5 s) on most runs.
                for f in self.factors:
                    if len(part) > 1 or min(w, h) * self.max_pixels < 2 * f**2 * max(w, h):
                        resized_size(part, w, h, min_pixels=self.min_pixels, max_pixels=self.max_pixels, factor=f)
            images = [seen[ref] for ref in sample["images"]]
            sizes = [{"width": w, "height": h} for _, _, w, h in images]
            # Boxes and points stay in the original image's pixels here (each family's convention is applied in
            # training, vlora.data.grounding): they must lie on their image. --boxes as_written: not ours to check.
            if self.boxes == "original":
                check_boxes(sample["messages"], [(w, h) for _, _, w, h in images])
            if self.counter is not None and (n := self.counter.count(sample["messages"], sizes)) > self.max_tokens:
                raise RecordError("too_many_tokens", f"{n} tokens (images at min_pixels {self.min_pixels}, max_pixels {self.max_pixels}) "
                                                     f"> --max-tokens {self.max_tokens}; shorten it, lower --max-pixels or raise the limit")
            return images
        except RecordError as e:
            return e


_checker: Checker | None = None  # the worker process's Checker, set by the pool's initializer


def _init_worker(checker: Checker) -> None:
    global _checker
    _checker = checker


def _check_chunk(samples: list) -> list:
    # The image bytes stay on disk and the main process reads them again (from the page cache): megabytes sent
    # back through the result pipe starve the pool's reader thread of the GIL, and two workers ran slower than one.
    results = [_checker(s) for s in samples]
    return [[(None, *im[1:]) for im in r] if isinstance(r, list) else r for r in results]


def _checked(items: Iterator[tuple[object, dict | None]], checker: Checker, workers: int) -> Iterator[tuple[object, object]]:
    """(tag, checker result) for each (tag, sample), in input order; with workers > 1 the checks run in a pool.

    Chunks are submitted in order with a bounded window in flight, so memory stays flat on any input and
    the output does not depend on which worker finishes first.
    """
    chunks = iter(lambda: list(itertools.islice(items, CHUNK)), [])
    if workers <= 1:
        for chunk in chunks:
            yield from ((tag, checker(sample)) for tag, sample in chunk)
        return
    # fork: workers start at once and inherit the imported modules (spawn would re-import torch in each).
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(checker,))
    try:
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_check_chunk, [sample for _, sample in chunk])))
            while pending and (len(pending) >= 4 * workers or pending[0][1].done()):
                chunk, future = pending.popleft()
                yield from zip((tag for tag, _ in chunk), future.result())
        while pending:
            chunk, future = pending.popleft()
            yield from zip((tag for tag, _ in chunk), future.result())
    finally:
        pool.shutdown(cancel_futures=True)


def _shard_entry(refs: list, images: list, max_bytes: int) -> tuple[dict, list[dict]]:
    """({"0.jpg": bytes, ...}, [{"width", "height"}, ...]) from a Checker result, reading what a worker left on disk
    (with the worker's checks on the file: it may have changed since)."""
    entry, data_of = {}, {}
    for i, (ref, (data, ext, _, _)) in enumerate(zip(refs, images)):
        if ref not in data_of:
            data_of[ref] = data if data is not None else _image_bytes(ref, i, max_bytes)
        entry[f"{i}.{ext}"] = data_of[ref]
    return entry, [{"width": w, "height": h} for _, _, w, h in images]


# --- shards -----------------------------------------------------------------------------------------


class _HashingFile:
    """Write-through file wrapper that hashes and counts bytes, so a shard is not read back to hash it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


class _ShardWriter:
    """Writes samples into shard-000000.tar, shard-000001.tar, ... rolling over every `shard_size`."""

    def __init__(self, out: Path, shard_size: int, on_shard: Callable[[Path], None] | None = None):
        self.out, self.shard_size, self.shards, self.on_shard = out, shard_size, [], on_shard
        self.file = self.hasher = self.tar = None
        self.count = 0

    def write(self, sample: dict) -> None:
        if self.tar is None or self.count == self.shard_size:
            self._close_shard()
            name = f"shard-{len(self.shards):06d}.tar"
            self.file = open(self.out / name, "wb")
            self.hasher = _HashingFile(self.file)
            self.tar = TarWriter(self.hasher, encoder=False, **TAR_META)
            self.shards.append({"name": name, "offsets": []})
            self.count = 0
        # Where the sample's first tar header starts: a resumed reader seeks (or asks a store for bytes) from here.
        self.shards[-1]["offsets"].append(self.tar.tarstream.offset)
        self.tar.write(sample)
        self.count += 1

    def _close_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()
        self.shards[-1].update(samples=self.count, bytes=self.hasher.bytes, sha256=self.hasher.sha.hexdigest())
        self.tar = None
        if self.on_shard is not None:
            path = self.out / self.shards[-1]["name"]
            self.on_shard(path)
            path.unlink()  # uploaded: the local disk holds one shard at a time

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Close quietly after an error (the folder is about to be deleted). The tar stream must be
        closed too, or its destructor later flushes into the closed file and warns."""
        if self.tar is not None:
            with contextlib.suppress(Exception):
                self.tar.close()
            self.file.close()
            self.tar = None


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_out(out: Path) -> None:
    # Packing replaces `out` wholesale, so refuse anything that is not an earlier shard folder.
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))):
        raise VloraError(f"{out}: exists and is not a shard folder (no {MANIFEST}); choose another output folder or remove it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` folder with renames only."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def annotation_files(src: Path, out: Path) -> tuple[list[Path], list[str]]:
    """(`src` itself, or every *.json / *.jsonl under the folder `src` (recursive, sorted); the skipped folders).

    Hidden folders and the output folder are left out silently; folders holding a manifest.json (earlier shard
    sets, whose manifest.json and rejects.jsonl are no annotation files) are left out and named, relative to src.
    """
    if not src.is_dir():
        return [src], []
    files, shard_sets = [], set()
    for p in sorted(src.rglob("*")):
        if p.suffix not in ANNOTATION_SUFFIXES or not p.is_file():
            continue
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or out.absolute() in p.absolute().parents:
            continue
        folders = [Path(*rel.parts[:k]) for k in range(len(rel.parts))]  # ".", "a", "a/b", ...: src down to p's folder
        if shard_set := next((f for f in folders if (src / f / MANIFEST).is_file()), None):
            shard_sets.add(shard_set)
            continue
        files.append(p)
    skipped = [f"{f.as_posix()}/ (shard folder)" for f in sorted(shard_sets)]
    if not files:
        extra = f" (skipped {'; '.join(skipped)})" if skipped else ""
        raise VloraError(f"{src}: no .json or .jsonl annotation files in this folder{extra}")
    return files, skipped


def _records(entries: list[tuple[str, str, Path]], open_file, stats: list[dict], skipped: list[str], *,
             in_folder: bool) -> Iterator[tuple[tuple[str, str, Record], dict | None]]:
    """((file name, key stem, record), sample) over all files, opened one at a time by `open_file(path)`.

    Appends a stats entry per file read (records, path fallbacks). In a folder, a .json file that matches no
    format (UnknownFormat) is skipped and named in `skipped`; a lone file or a .jsonl is meant as data: an error.
    """
    for name, stem, path in entries:
        try:
            source = open_file(path)
        except UnknownFormat:
            if not in_folder or path.suffix != ".json":
                raise
            skipped.append(f"{name} (no known annotation format)")
            continue
        st = {"file": name, "format": source.format, "records": 0, "path": path}
        stats.append(st)
        for rec in source.records:
            st["records"] += 1
            yield (name, stem, rec), rec.sample
        st["paths_resolved_by_suffix"] = source.resolver.by_suffix


def _check_not_inside(out: Path, **paths) -> None:
    """Packing deletes the old `out` when it swaps the new one in: no input may live there."""
    out_real = out.resolve()
    for flag, path in paths.items():
        if path is None:
            continue
        real = Path(path).resolve()
        if real == out_real or out_real in real.parents:
            raise VloraError(f"--{flag.replace('_', '-')} {path} lies inside the output folder {out}, which packing "
                             "replaces (deleting what is in it); choose another --out")


def _count_records(files: list[Path]) -> int | None:
    """Non-blank lines of JSON Lines files, for the progress bar's total; None when a JSON array is among them."""
    total = 0
    for path in files:
        with open(path, "rb") as f:
            if f.read(4096).removeprefix(BOM).lstrip()[:1] == b"[":
                return None
            f.seek(0)
            total += sum(1 for line in f if line.strip())
    return total


# A run's default resize limits (data.min_pixels / data.max_pixels in vlora.config, which the data package may not
# import: data takes plain arguments). tests/test_config.py holds the two pairs equal.
DEFAULT_MIN_PIXELS = QWEN_FACTOR * QWEN_FACTOR * 4  # 3136: 4 image tokens
DEFAULT_MAX_PIXELS = QWEN_FACTOR * QWEN_FACTOR * 256  # 200704: 256 image tokens


def pack(src, out, *, fmt: str | None = None, image_root=None, shard_size: int = 1000, workers: int = 1,
         max_image_pixels: int = PIL_MAX_IMAGE_PIXELS, max_tokens: int | None = None, model=None,
         min_pixels: int | None = None, max_pixels: int | None = None, progress: bool = False, boxes: str = "original",
         max_image_bytes: int = MAX_IMAGE_BYTES, confine: bool = False, on_shard=None) -> PackSummary:
    """Pack the annotation file `src` (or every annotation file under the folder `src`) into WebDataset shards
    under `out`, replacing an earlier pack there. `out` may be an s3:// or gs:// folder: the shards are written
    locally, each uploaded (and deleted) as soon as it is finished, the manifest last (vlora.data.remote.Uploader).

    `min_pixels` / `max_pixels` are the run's (by default data.min_pixels / data.max_pixels): every image must
    resize under them as training will; `max_tokens` (with `model`, a model folder) also rejects samples longer
    than that in training. Only regular files of at most `max_image_bytes` are read as images; `confine` refuses
    images outside `image_root` and each annotation file's folder (formats.PathResolver). `boxes`: "original"
    (grounding boxes in image pixels, checked) or "as_written" (left alone). Raises VloraError for a missing src, an
    undetectable format, bad settings or an `out` that is not a shard folder; bad records never raise, they are
    counted and listed in out/rejects.jsonl.
    """
    from vlora.data import remote

    if remote.is_remote(str(out)):
        return _pack_to_store(src, str(out), fmt=fmt, image_root=image_root, shard_size=shard_size, workers=workers,
                              max_image_pixels=max_image_pixels, max_tokens=max_tokens, model=model,
                              min_pixels=min_pixels, max_pixels=max_pixels, progress=progress,
                              max_image_bytes=max_image_bytes, confine=confine, boxes=boxes)
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    out_abs = out.absolute()  # so the temp/old siblings get a name even for out="."
    if shard_size < 1 or workers < 1 or max_image_pixels < 1 or max_image_bytes < 1:
        raise VloraError(f"shard_size, workers, max_image_pixels and max_image_bytes must be at least 1, "
                         f"got {shard_size}, {workers}, {max_image_pixels}, {max_image_bytes}")
    min_pixels = DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    checker = _make_checker(max_image_pixels, max_image_bytes, min_pixels, max_pixels, max_tokens, model, boxes)
    if not src.exists():
        raise VloraError(f"{src}: annotation file not found; check the path")
    _check_not_inside(out_abs, src=src, image_root=image_root)
    files, entries, open_file, skipped = _sources(src, out_abs, image_root=image_root, fmt=fmt, confine=confine)
    _check_out(out)
    out_abs.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_abs.with_name(f".{out_abs.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    s = PackSummary(src=str(src), out=str(out), shard_size=shard_size, skipped=skipped)
    stats: list[dict] = []  # one entry per annotation file read, filled as the files are opened
    # Ids are often unique per file only: in a folder, keys are scoped by file so two files cannot collide.
    taker = _Taker(s, _ShardWriter(tmp, shard_size, on_shard), scoped=src.is_dir(), max_image_bytes=max_image_bytes)
    bar = None
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=_count_records(files), unit="sample", desc="pack", dynamic_ncols=True)
        records = _records(entries, open_file, stats, s.skipped, in_folder=src.is_dir())
        for (name, stem, rec), result in _checked(records, checker, workers):
            if bar is not None:
                bar.update()
            taker.take(name, stem, rec, result)
        if not stats:
            raise VloraError(f"{src}: no annotation file in this folder matches a known format (skipped {'; '.join(s.skipped)})")
        shards = taker.writer.close()
        (tmp / REJECTS).write_bytes(b"".join(taker.rejects))
        checks = {"max_image_pixels": max_image_pixels, "max_image_bytes": max_image_bytes, "confine": confine,
                  "max_aspect_ratio": MAX_ASPECT_RATIO, "min_pixels": min_pixels, "max_pixels": max_pixels}
        if boxes != "original":  # absent by default, so that box-free manifests keep their bytes
            checks["boxes"] = boxes
        if checker.counter:
            checks["max_tokens_and_model"] = (max_tokens, str(model))
        write_manifest(tmp, _manifest(s, stats, shards, checks))
        _swap_in(tmp, out_abs)
    except BaseException:
        taker.writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit  # the in-process checker set it; leave PIL as we found it
        if bar is not None:
            bar.close()
    s.seconds = time.perf_counter() - t0
    return s


def _pack_to_store(src, url: str, **kwargs) -> PackSummary:
    """pack() into a local scratch folder whose shards go to the store `url` one by one, the manifest last."""
    import tempfile

    from vlora.data import remote

    uploader = remote.Uploader(url)
    scratch = Path(tempfile.mkdtemp(prefix="vlora-pack-"))
    try:
        summary = pack(src, scratch / "set", on_shard=uploader.put, **kwargs)
        uploader.finish(scratch / "set")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary.out = url
    return summary


def _make_checker(max_image_pixels: int, max_image_bytes: int, min_pixels: int, max_pixels: int,
                  max_tokens: int | None, model, boxes: str) -> Checker:
    if not 0 < min_pixels <= max_pixels:
        raise VloraError(f"need 0 < --min-pixels <= --max-pixels, got {min_pixels} and {max_pixels}")
    if boxes not in families.BOX_MODES:
        raise VloraError(f"--boxes is one of {', '.join(families.BOX_MODES)}, got {boxes!r}")
    counter = None
    if max_tokens is not None:
        if model is None or not (Path(model) / "config.json").is_file():
            raise VloraError(f"--max-tokens needs --model, a local model folder (with config.json); got {model}")
        counter = TokenCounter(str(model), min_pixels=min_pixels, max_pixels=max_pixels, boxes=boxes)
    return Checker(max_image_pixels=max_image_pixels, min_pixels=min_pixels, max_pixels=max_pixels,
                   max_tokens=max_tokens, counter=counter, max_image_bytes=max_image_bytes, boxes=boxes)


def _sources(src: Path, out_abs: Path, *, image_root, fmt: str | None, confine: bool):
    """(annotation files, (name, stem, path) entries, a function opening one file's records, skipped files)."""
    files, skipped = annotation_files(src, out_abs)
    # Names relative to src, not full paths: the same data packed from elsewhere gives the same bytes.
    names = [p.name if p == src else p.relative_to(src).as_posix() for p in files]
    entries = [(n, n.rsplit(".", 1)[0], p) for n, p in zip(names, files)]
    if not src.is_dir():  # one file: its format errors come before anything is written
        opened = read_annotations(src, image_root=image_root, fmt=fmt, confine=confine)
        return files, entries, lambda path: opened, skipped
    # a folder: files are opened (and JSON arrays parsed) one at a time, as the records are needed
    return files, entries, lambda path: read_annotations(path, image_root=image_root, fmt=fmt, confine=confine), \
        skipped


class _Taker:
    """Takes each checked record: a shard sample, or a reject (counted by reason, listed in rejects.jsonl)."""

    def __init__(self, summary: PackSummary, writer, *, scoped: bool, max_image_bytes: int):
        self.s, self.writer, self.scoped, self.max_image_bytes = summary, writer, scoped, max_image_bytes
        self.rejects: list[bytes] = []
        self.keys: dict[str, str] = {}

    def take(self, name: str, stem: str, rec, result) -> None:
        s = self.s
        s.read += 1
        line = {"line": rec.line} if rec.line else {}  # JSON Lines only
        try:
            if rec.error:
                raise rec.error
            if isinstance(result, RecordError):
                raise result
            entry, sizes = _shard_entry(rec.sample["images"], result, self.max_image_bytes)
            key = sample_key(rec.raw, stem, rec.index, scoped=self.scoped)
            if key in self.keys:
                raise RecordError("duplicate_key", f"key {key!r} already used by {self.keys[key]}; give records unique ids")
            self.keys[key] = f"{name} record {rec.index}"
        except RecordError as e:
            s.rejected += 1
            s.rejects_by_reason[e.reason] = s.rejects_by_reason.get(e.reason, 0) + 1
            reject = {"source": name, "index": rec.index, **line, "reason": e.reason, "detail": e.detail}
            self.rejects.append(_dumps(reject) + b"\n")
            if len(s.first_rejects) < SHOWN_REJECTS:
                s.first_rejects.append(reject)
            return
        parts = [p for m in rec.sample["messages"] for p in m["content"] if p["type"] == "image"]
        for f in RESIZE_FACTORS:
            floors = [max_pixels_floor(p, z["width"], z["height"], f) for p, z in zip(parts, sizes)]
            s.max_pixels_floor[f] = max([s.max_pixels_floor[f], *floors])
        meta = {"messages": rec.sample["messages"], "source": {"file": name, "index": rec.index, **line}, "images": sizes}
        if (task := rec.sample.get("task")) is not None:  # absent, not null: task-free shards stay byte-identical
            meta["task"] = task
            s.tasks[task] = s.tasks.get(task, 0) + 1
        self.writer.write({"__key__": key, "json": _dumps(meta), **entry})
        s.written += 1


def _manifest(s: PackSummary, stats: list[dict], shards: list[dict], checks: dict) -> dict:
    """The manifest of a finished pack (and the summary's last counts); the counts must balance."""
    s.shards = len(shards)
    s.last_shard = shards[-1]["samples"] if shards else 0
    s.rejects_by_reason = dict(sorted(s.rejects_by_reason.items()))
    s.tasks = dict(sorted(s.tasks.items()))
    s.paths_resolved_by_suffix = sum(st["paths_resolved_by_suffix"] for st in stats)
    assert s.read == s.written + s.rejected == sum(st["records"] for st in stats)
    for st in stats:
        st["sha256"] = _sha256_file(st.pop("path"))
    tokens = checks.pop("max_tokens_and_model", None)
    return {
        "format": FORMAT,
        "samples": s.written,
        "read": s.read,
        "rejected": s.rejected,
        "rejects_by_reason": s.rejects_by_reason,
        "paths_resolved_by_suffix": s.paths_resolved_by_suffix,
        "shards": shards,
        "sources": stats,
        "skipped": s.skipped,
        # max_pixels_floor, per resize factor: a training run's data.max_pixels below it could resize an image here
        # to a zero side (preflight's check_packed_pixels refuses that); it may lie far below max_pixels, which the
        # images were checked at (at the --model's factor, else 28).
        "checks": {**checks, "max_pixels_floor": {str(f): n for f, n in s.max_pixels_floor.items()}}
                  | ({"max_tokens": tokens[0], "model": tokens[1]} if tokens else {}),
    } | ({"tasks": s.tasks} if s.tasks else {})  # only with tasks: a task-free manifest keeps its bytes

