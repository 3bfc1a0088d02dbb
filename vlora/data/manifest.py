"""manifest.json: what a shard folder holds, written last by `pack` and checked by every reader.

A folder is a usable shard set only if its manifest parses, has the expected format tag, and every
shard it lists is present with the listed size. Readers take shard paths from the manifest rather
than globbing, so a stray or half-written tar is never streamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlora.errors import VloraError

MANIFEST = "manifest.json"
FORMAT = "vlora-shards/1"


def write_manifest(out_dir, manifest: dict) -> Path:
    """Write `manifest` as out_dir/manifest.json (sorted keys, indent 2, trailing newline) atomically."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader sees the old manifest or the new one, never half of one
    return path


def _is_shard_entry(s) -> bool:
    return isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int)


def _offsets_ok(s: dict) -> bool:
    """An entry's optional per-sample byte offsets: one per sample, from 0, rising, on tar's 512-byte blocks, inside
    the shard."""
    offsets = s.get("offsets")
    if offsets is None:
        return True
    return (isinstance(offsets, list) and len(offsets) == s["samples"] and isinstance(s.get("bytes"), int)
            and all(isinstance(o, int) and not isinstance(o, bool) and o % 512 == 0 for o in offsets)
            and (not offsets or offsets[0] == 0) and all(a < b for a, b in zip(offsets, offsets[1:]))
            and (not offsets or offsets[-1] < s["bytes"]))


def parse_manifest(text: bytes | str, where: str) -> dict:
    """The manifest in `text` (read from `where`), checked; VloraError naming `where` when it is unusable."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VloraError(f"{where}: not valid JSON ({e}); run `vlora pack` again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise VloraError(f"{where}: format is {got!r}, expected {FORMAT!r}; repack with this version of vlora")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(map(_is_shard_entry, shards)):
        raise VloraError(f"{where}: 'shards' must be a list of {{name, samples, bytes, sha256}}; run `vlora pack` again")
    for s in shards:
        if not _offsets_ok(s):
            raise VloraError(f"{where}: shard {s['name']}'s 'offsets' are not one rising byte offset per sample inside "
                             "the shard; run `vlora pack` again")
    return manifest


def read_manifest(shard_dir) -> dict:
    """Load and check shard_dir/manifest.json; VloraError (naming the folder) when it is unusable.

    A folder URL (s3://, gs://, http(s)://, pipe:) is read through vlora.data.remote; its shards' sizes are
    checked when each is opened (a listing is not something every store offers)."""
    from vlora.data import remote

    if remote.is_remote(str(shard_dir)):
        url = remote.join(str(shard_dir), MANIFEST)
        return parse_manifest(remote.read_bytes(url), remote.redact(url))
    d = Path(shard_dir)
    if not d.is_dir():
        raise VloraError(f"{d}: shard folder not found; run `vlora pack` first or fix the path")
    path = d / MANIFEST
    if not path.is_file():
        raise VloraError(f"{d}: no {MANIFEST} (not a shard folder, or packing did not finish); run `vlora pack` again")
    manifest = parse_manifest(path.read_bytes(), str(path))
    for s in manifest["shards"]:
        shard = d / s["name"]
        if not shard.is_file():
            raise VloraError(f"{d}: shard {s['name']} listed in {MANIFEST} is missing; copy it over or repack")
        size = shard.stat().st_size
        if "bytes" in s and size != s["bytes"]:
            raise VloraError(f"{d}: shard {s['name']} has {size} bytes, {MANIFEST} says {s['bytes']}; copy it again or repack")
    return manifest


def shard_paths(shard_dir, manifest: dict | None = None) -> list[str]:
    """Absolute paths (or URLs) of the shards listed in the manifest, in manifest order."""
    from vlora.data import remote

    if remote.is_remote(str(shard_dir)):
        return [remote.join(str(shard_dir), s["name"]) for s in (manifest or read_manifest(shard_dir))["shards"]]
    d = Path(shard_dir).absolute()
    return [str(d / s["name"]) for s in (manifest or read_manifest(d))["shards"]]
