"""Annotation file -> validated WebDataset shards + manifest.json + rejects.jsonl.

Packing is where bad data is caught, once, with the record named: a missing or unreadable image,
`<image>` tags that disagree with the image list (the "image features and image tokens do not match"
crash other tools hit mid-training), a sample with nothing to learn from. Bad records go to
rejects.jsonl with a short reason code; the rest go to tar shards, one sample per key:

    KEY.json    {"messages": canonical messages, "source": {"file", "index"}, "images": [{"width", "height"}]}
    KEY.0.png   the original image bytes, never re-encoded (KEY.1.jpg, ... for more images)

The same input gives byte-identical shards (fixed mtime/owner, sorted JSON), so shard hashes in the
manifest identify the data. Everything is written to a temporary sibling folder that replaces `out`
only when complete: a crash never leaves a folder that looks like a finished shard set.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from webdataset import TarWriter

from vlora.data.formats import RecordError, read_annotations
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


@dataclass
class PackSummary:
    """Counts of one pack run. Invariant: read == written + rejected."""

    read: int = 0
    written: int = 0
    rejected: int = 0
    shards: int = 0
    rejects_by_reason: dict = field(default_factory=dict)
    src: str = ""
    out: str = ""
    seconds: float = 0.0


def format_summary(s: PackSummary) -> str:
    """One line for the console: counts, reasons, where the rejects are, speed."""
    line = f"packed {s.src} -> {s.out}: read {s.read}, wrote {s.written} in {s.shards} shard(s), rejected {s.rejected}"
    if s.rejected:
        reasons = ", ".join(f"{r} {n}" for r, n in s.rejects_by_reason.items())
        line += f" ({reasons}; see {Path(s.out) / REJECTS})"
    rate = s.written / s.seconds if s.seconds > 0 else 0.0
    return line + f" in {s.seconds:.1f} s ({rate:.0f} samples/s)"


def sample_key(raw: dict | None, stem: str, index: int) -> str:
    """The record's "id", else f"{stem}-{index:08d}", reduced to [A-Za-z0-9_-].

    WebDataset splits a member name at the first dot of its base name into key and extension, so a
    dot (or slash) in a key would silently split one sample into two: they become underscores.
    """
    rid = raw.get("id") if isinstance(raw, dict) else None
    name = str(rid) if rid not in (None, "") else f"{stem}-{index:08d}"
    key = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if len(key) > MAX_KEY:  # keep long ids distinct after truncation
        key = key[: MAX_KEY - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return key


def validate(sample: dict) -> None:
    """Raise RecordError for a sample that would fail or teach nothing in training (images not checked here)."""
    messages = sample["messages"]
    tags = sum(part["type"] == "image" for m in messages for part in m["content"])
    if tags != len(sample["images"]):
        raise RecordError("image_count_mismatch", f"{tags} <image> tag(s) but {len(sample['images'])} image(s); make them match")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant", "no assistant turn, nothing to learn; add an answer")
    for j, m in enumerate(messages):
        if m["role"] == "assistant" and not "".join(p.get("text", "") for p in m["content"]).strip():
            raise RecordError("empty_answer", f"assistant message {j} is empty; fill it in or drop the turn")


MAX_ASPECT_RATIO = 200  # qwen_vl_utils.smart_resize's limit


def read_image(path: Path, i: int) -> tuple[bytes, str, int, int]:
    """(original bytes, extension, width, height) of image i; RecordError if missing or undecodable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError("image_missing", f"image {i} not found: {path}") from None
    except OSError as e:
        raise RecordError("image_unreadable", f"image {i} {path}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            # A full decode, not just the header: a truncated file must fail here, not in a training worker.
            im.load()
            (w, h), pil_format = im.size, im.format
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise RecordError("image_unreadable", f"image {i} {path}: {type(e).__name__}: {e}") from None
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        # Qwen's smart_resize refuses these; found here, the run never meets them in a data worker.
        raise RecordError("bad_aspect_ratio", f"image {i} {path}: {w}x{h} is more than {MAX_ASPECT_RATIO}:1")
    ext = path.suffix.lower().lstrip(".")
    ext = EXT_ALIASES.get(ext, ext)
    if ext not in KNOWN_EXTS:  # no or odd suffix: name it after the content so decoders pick it up
        ext = PIL_EXTS.get(pil_format, (pil_format or "img").lower())
    return data, ext, w, h


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

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size, self.shards = out, shard_size, []
        self.file = self.hasher = self.tar = None
        self.count = 0

    def write(self, sample: dict) -> None:
        if self.tar is None or self.count == self.shard_size:
            self._close_shard()
            name = f"shard-{len(self.shards):06d}.tar"
            self.file = open(self.out / name, "wb")
            self.hasher = _HashingFile(self.file)
            self.tar = TarWriter(self.hasher, encoder=False, **TAR_META)
            self.shards.append({"name": name})
            self.count = 0
        self.tar.write(sample)
        self.count += 1

    def _close_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.file.close()
        self.shards[-1].update(samples=self.count, bytes=self.hasher.bytes, sha256=self.hasher.sha.hexdigest())
        self.tar = None

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


def pack(src, out, *, image_root=None, shard_size: int = 1000) -> PackSummary:
    """Pack the annotation file `src` into WebDataset shards under `out` (replacing an earlier pack there).

    Raises VloraError for a missing src, an undetectable format, a bad shard_size or an `out` that
    is not a shard folder; bad records never raise, they are counted and listed in out/rejects.jsonl.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    out_abs = out.absolute()  # so the temp/old siblings get a name even for out="."
    if shard_size < 1:
        raise VloraError(f"shard_size must be at least 1, got {shard_size}")
    fmt, records = read_annotations(src, image_root=image_root)
    _check_out(out)
    out_abs.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_abs.with_name(f".{out_abs.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    s = PackSummary(src=str(src), out=str(out))
    file_name = src.name  # not the full path: the same data packed from elsewhere gives the same bytes
    rejects, keys = [], {}
    writer = _ShardWriter(tmp, shard_size)
    try:
        for rec in records:
            s.read += 1
            try:
                if rec.error:
                    raise rec.error
                validate(rec.sample)
                entry, sizes, seen = {}, [], {}
                for i, path in enumerate(rec.sample["images"]):
                    if path not in seen:  # a sample may show one image twice: decode it once
                        seen[path] = read_image(path, i)
                    data, ext, w, h = seen[path]
                    entry[f"{i}.{ext}"] = data
                    sizes.append({"width": w, "height": h})
                key = sample_key(rec.raw, src.stem, rec.index)
                if key in keys:
                    raise RecordError("duplicate_key", f"key {key!r} already used by record {keys[key]}; give records unique ids")
                keys[key] = rec.index
            except RecordError as e:
                s.rejected += 1
                s.rejects_by_reason[e.reason] = s.rejects_by_reason.get(e.reason, 0) + 1
                rejects.append({"source": file_name, "index": rec.index, "reason": e.reason, "detail": e.detail})
                continue
            meta = {"messages": rec.sample["messages"], "source": {"file": file_name, "index": rec.index}, "images": sizes}
            entry.update({"__key__": key, "json": _dumps(meta)})
            writer.write(entry)
            s.written += 1
        shards = writer.close()
        (tmp / REJECTS).write_bytes(b"".join(_dumps(r) + b"\n" for r in rejects))
        s.shards = len(shards)
        s.rejects_by_reason = dict(sorted(s.rejects_by_reason.items()))
        assert s.read == s.written + s.rejected
        write_manifest(tmp, {
            "format": FORMAT,
            "samples": s.written,
            "read": s.read,
            "rejected": s.rejected,
            "rejects_by_reason": s.rejects_by_reason,
            "shards": shards,
            "sources": [{"file": file_name, "format": fmt, "sha256": _sha256_file(src), "records": s.read}],
        })
        _swap_in(tmp, out_abs)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    s.seconds = time.perf_counter() - t0
    return s
