"""Annotation files -> canonical samples.

Every source format is read into one layout, so packing, collation and evaluation know one shape:

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": [{"type": "image"} | {"type": "text", "text": str}, ...]}, ...],
     "images": [Path, ...]}          # one resolved path per {"type": "image"}, in reading order

Text is kept exactly; an `<image>` tag only splits it. Image paths resolve against the annotation
file's folder, or against `image_root` when given; absolute paths stay as they are.

Formats (detected per file from its first records; one reader function each):
  - "sharegpt": ShareGPT / LLaMA-Factory `{"messages": [{"role", "content": "<image>..."}], "images": [...]}`,
    optional top-level "system" string.
  - "llava": LLaVA / Qwen style `{"image": "a.jpg" | "images": [...], "conversations":
    [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}]}` (also LLaMA-Factory's
    sharegpt-with-conversations layout).
To add a format: write `_read_<name>(record, resolve) -> sample`, a `_is_<name>(record) -> bool`,
and register both in FORMATS (order = detection priority).

Files are JSON arrays or JSON Lines, told apart by their first character rather than their suffix
(LLaMA-Factory and HF `datasets` accept JSON Lines in a `.json` file).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlora.errors import VloraError

IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")
# How many records detection looks at before giving up: enough to skip a few broken lines.
DETECT_WINDOW = 64


class RecordError(ValueError):
    """One record is unusable. Packing turns it into a line of rejects.jsonl, not a crash."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Record:
    """One record of an annotation file: the raw JSON (None if unparsable) and either the
    canonical sample or the error that prevented it."""

    index: int
    raw: dict | None
    sample: dict | None = None
    error: RecordError | None = None


def split_tags(text: str) -> list[dict]:
    """'<image>What is it?' -> [{"type": "image"}, {"type": "text", "text": "What is it?"}]."""
    parts = re.split(f"({re.escape(IMAGE_TAG)})", text)
    return [{"type": "image"} if p == IMAGE_TAG else {"type": "text", "text": p} for p in parts if p]


def _bad(detail: str):
    raise RecordError("bad_record", detail)


def _image_list(value, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        _bad(f"'{key}' must be a path or a list of paths")
    return value


def _with_system(record: dict, messages: list[dict]) -> list[dict]:
    """Honour a top-level "system" string (LLaMA-Factory's `system` column) unless a system turn exists."""
    system = record.get("system")
    if isinstance(system, str) and system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": split_tags(system)}] + messages
    return messages


# --- ShareGPT / LLaMA-Factory ------------------------------------------------------------------


def _is_sharegpt(record: dict) -> bool:
    msgs = record.get("messages")
    # String content only: OpenAI-style content lists are a different format.
    return isinstance(msgs, list) and bool(msgs) and isinstance(msgs[0], dict) and isinstance(msgs[0].get("content"), str)


def _read_turns(record: dict, resolve: Callable[[str], Path], *, turns_key: str, role_key: str, text_key: str,
                roles: dict[str, str], images_key: str) -> dict:
    """The shared reader of 'a list of turns with string content and <image> tags, plus an image list'."""
    turns = record.get(turns_key)
    if not isinstance(turns, list) or not turns:
        _bad(f"'{turns_key}' must be a non-empty list")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_key) not in roles:
            _bad(f"{turns_key}[{j}].{role_key} must be one of {', '.join(roles)}")
        if not isinstance(turn.get(text_key), str):
            _bad(f"{turns_key}[{j}].{text_key} must be a string")
        messages.append({"role": roles[turn[role_key]], "content": split_tags(turn[text_key])})
    images = _image_list(record.get(images_key, []), images_key)
    return {"messages": _with_system(record, messages), "images": [resolve(p) for p in images]}


def _read_sharegpt(record: dict, resolve: Callable[[str], Path]) -> dict:
    return _read_turns(record, resolve, turns_key="messages", role_key="role", text_key="content",
                       roles={r: r for r in ROLES}, images_key="images")


# --- LLaVA / Qwen ---------------------------------------------------------------------------------

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _is_llava(record: dict) -> bool:
    conv = record.get("conversations")
    return isinstance(conv, list) and bool(conv) and isinstance(conv[0], dict) and "from" in conv[0] and "value" in conv[0]


def _read_llava(record: dict, resolve: Callable[[str], Path]) -> dict:
    return _read_turns(record, resolve, turns_key="conversations", role_key="from", text_key="value",
                       roles=LLAVA_ROLES, images_key="images" if "images" in record else "image")


# name -> (detector, reader); dict order is detection priority.
FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[[dict, Callable[[str], Path]], dict]]] = {
    "sharegpt": (_is_sharegpt, _read_sharegpt),
    "llava": (_is_llava, _read_llava),
}


def detect(record) -> str | None:
    """The name of the first format whose detector accepts `record`, or None."""
    if isinstance(record, dict):
        for name, (is_format, _) in FORMATS.items():
            if is_format(record):
                return name
    return None


# --- files ----------------------------------------------------------------------------------------


def _raw_records(path: Path) -> Iterator[dict | RecordError]:
    """Yield each record's parsed JSON, or a RecordError for a line that does not parse."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        head = f.read(4096).lstrip()[:1]
        f.seek(0)
        if head == "[":
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                # A broken array loses every record: that is the user's to fix, not a reject.
                raise VloraError(f"{path}: not valid JSON ({e}); fix the file or convert it to JSON Lines") from None
            yield from records
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield RecordError("invalid_json", f"line {lineno}: {e}")


def read_annotations(path, *, image_root=None, fmt: str | None = None) -> tuple[str, Iterator[Record]]:
    """Open an annotation file and return (format name, iterator of Records).

    Checks that the file exists and detects its format before returning, so a wrong path or an
    unknown format raises VloraError at once; per-record problems come back as Record.error.
    """
    path = Path(path)
    if not path.is_file():
        raise VloraError(f"{path}: annotation file not found; check the path")
    if fmt is not None and fmt not in FORMATS:
        raise VloraError(f"{path}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    raws = _raw_records(path)
    head = list(itertools.islice(raws, DETECT_WINDOW))
    if fmt is None:
        fmt = next((f for f in map(detect, head) if f), None)
        if fmt is None:
            what = "has no records" if not head else f"matches no known format in its first {len(head)} records"
            raise VloraError(f"{path}: {what}; expected {' or '.join(FORMATS)} records (see vlora/data/formats.py)")
    reader = FORMATS[fmt][1]
    base = Path(image_root) if image_root is not None else path.parent
    base = base.expanduser().absolute()

    def resolve(p: str) -> Path:
        return base / Path(p).expanduser()  # an absolute p replaces base

    def records() -> Iterator[Record]:
        for index, raw in enumerate(itertools.chain(head, raws)):
            if isinstance(raw, RecordError):
                yield Record(index, None, error=raw)
            elif not isinstance(raw, dict):
                yield Record(index, None, error=RecordError("bad_record", f"record is a JSON {type(raw).__name__}, not an object"))
            else:
                try:
                    yield Record(index, raw, sample=reader(raw, resolve))
                except RecordError as e:
                    yield Record(index, raw, error=e)

    return fmt, records()


def load_samples(path, *, image_root=None) -> list[dict]:
    """All canonical samples of a file; raises VloraError at the first bad record (for small files and tests)."""
    _, records = read_annotations(path, image_root=image_root)
    samples = []
    for r in records:
        if r.error:
            raise VloraError(f"{path}: record {r.index}: {r.error}")
        samples.append(r.sample)
    return samples
