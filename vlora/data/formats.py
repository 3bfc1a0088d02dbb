"""Annotation files -> canonical samples.

Every source format is read into one layout, so packing, collation and evaluation know one shape:

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": [{"type": "image", **per_image_keys} | {"type": "text", "text": str}, ...]}, ...],
     "images": [Path | str, ...],    # one per {"type": "image"}, in reading order: a resolved path or a data: URI
     "task": str}                    # only when the record has one (see below)

Formats (detected per file from its first records; one reader function each):
  - "sharegpt": ShareGPT / LLaMA-Factory `{"messages": [{"role", "content": "<image>..."}], "images": [...]}`.
    Read by the "openai" reader, which takes string content too: a content-list file whose first record is
    text-only is detected as sharegpt and still reads its image records.
  - "llava": LLaVA / Qwen `{"image": "a.jpg" | "images": [...], "conversations": [{"from": "human" | "gpt" | "system",
    "value": "<image>\\n..."}]}`.
  - "openai": content lists `{"messages": [{"role", "content": [{"type": "text", "text" | "value": ...},
    {"type": "image", "image": path} | {"type": "image_url", "image_url": {"url": path} | path} |
    {"type": "image_url", "value": path} (LLaMA-Factory v1) | {"type": "image"} (next of a top-level "images")]}]}`.
    An image part's min_pixels / max_pixels / resized_height / resized_width stay on its canonical entry.
  - "instruction": `{"image_path", "instruction", "input", "output"}` -> user [images, instruction + "\\n" + input]
    (placeholders in instruction / input place the images there instead).
  - "caption": `{"image_path" | "image", "text" | "caption"}` -> user [images], assistant the text.
  In both, an image placeholder in the answer (output / text / caption) is an image_count_mismatch reject: the
  images belong to the user turn. `"image": null` / `"images": null` (any format) means no images.
Any format may add a top-level "system" string; files may hold several images and turns per sample.
Any format may add a top-level "task" string (e.g. "caption", "vqa"), kept on the sample so evaluation can
score per task: 1-64 characters, not blank, no control characters, else a `bad_task` reject; `"task": null`
means none. It is read once, in `to_sample`, not by the readers.
To add a format: write `_read_<name>(record) -> (messages, image list)` and `_is_<name>(record) -> bool`, and
register both in FORMATS (order = detection priority).

Image placeholders, in any text (text is kept exactly; a placeholder only splits it):
  `<image>`                       the record's next listed image
  `<image_1>`, `<image_no_1>`     listed image 1 (1-based); may repeat, but every listed image must be used
  `<|vision_start|>PATH<|vision_end|>`   an image at PATH (an `<|image_pad|>` inside is ignored; no PATH = `<image>`)

Image paths: see PathResolver. Files are JSON arrays or JSON Lines, told apart by their first character rather
than their suffix (LLaMA-Factory and HF `datasets` accept JSON Lines in a `.json` file).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlora.errors import VloraError

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Qwen's per-image keys; the same tuple as vlora.data.collate.PER_IMAGE_KEYS (tested), not imported: collate needs torch.
PER_IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
PLACEHOLDER = re.compile(r"<image>|<image_(?:no_)?(\d+)>|<\|vision_start\|>(.*?)<\|vision_end\|>")
# How many records detection looks at before giving up: enough to skip a few broken lines.
DETECT_WINDOW = 64
MAX_TASK = 64  # characters of a record's "task" label
BOM = b"\xef\xbb\xbf"


class UnknownFormat(VloraError):
    """A file holds no records, or none that any reader recognises (in a folder, `pack` skips such .json files)."""


class RecordError(ValueError):
    """One record is unusable. Packing turns it into a line of rejects.jsonl, not a crash."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # crosses process boundaries (pack's worker pool) intact
        return RecordError, (self.reason, self.detail)


@dataclass
class Record:
    """One record of an annotation file: where it is (index; line for JSON Lines), the raw JSON (None if
    unparsable) and either the canonical sample or the error that prevented it."""

    index: int
    line: int | None
    raw: dict | None
    sample: dict | None = None
    error: RecordError | None = None


def _bad(detail: str):
    raise RecordError("bad_record", detail)


def _mismatch(detail: str):
    raise RecordError("image_count_mismatch", detail)


# --- text and images ------------------------------------------------------------------------------


def split_tags(text: str) -> list[dict]:
    """'<image>What is it?' -> [{"type": "image"}, {"type": "text", "text": "What is it?"}].

    Numbered and inline-path placeholders carry a private "_ref" / "_path" until `_bind_images` resolves them.
    """
    parts, pos = [], 0
    for m in PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos : m.start()]})
        number, inline = m.group(1), m.group(2)
        inline = (inline or "").replace("<|image_pad|>", "").strip()
        parts.append({"type": "image", "_ref": int(number)} if number else {"type": "image", "_path": inline} if inline else {"type": "image"})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def _image_list(value, key: str) -> list[str]:
    if value is None:  # `"images": null`, as HF exports and LLaVA's text-only rows write it
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        _bad(f"'{key}' must be a path or a list of paths")
    return value


def _bind_images(messages: list[dict], listed: list[str], resolve: Callable[[str], Path | str]) -> list[Path | str]:
    """Give every image part its image: inline paths as they are, `<image>` the next listed one, `<image_N>` the Nth.

    Whatever the placeholders, the record's image list must be used exactly: a count that disagrees is the
    "image features and image tokens do not match" crash other tools meet mid-training.
    """
    parts = [p for m in messages for p in m["content"] if p["type"] == "image"]
    plain = sum("_ref" not in p and "_path" not in p for p in parts)
    numbers = [p["_ref"] for p in parts if "_ref" in p]
    if numbers:
        if plain:
            _mismatch("mixes <image> tags with numbered placeholders; use one kind per record")
        if bad := [n for n in numbers if not 1 <= n <= len(listed)]:
            _mismatch(f"placeholder <image_{bad[0]}> but the record lists {len(listed)} image(s)")
        if unused := sorted(set(range(1, len(listed) + 1)) - set(numbers)):
            _mismatch(f"image {unused[0]} of {len(listed)} is never referenced; reference it or drop it")
    elif plain != len(listed):
        _mismatch(f"{plain} <image> tag(s) but {len(listed)} image(s); make them match")
    sequential, refs = iter(listed), []
    for p in parts:  # the private markers go: a canonical entry is {"type": "image", **per-image keys}
        if "_path" in p:
            refs.append(p.pop("_path"))
        elif "_ref" in p:
            refs.append(listed[p.pop("_ref") - 1])
        else:
            refs.append(next(sequential))
    return [resolve(r) for r in refs]


class PathResolver:
    """Image reference -> local Path (or the data: URI itself, decoded at pack time).

    A relative path is tried, in order, as image_root/path (when given), annotation_dir/path, then the two
    fallbacks: ANCESTOR/path for the annotation folder's first PARENT_LEVELS ancestors (paths with a folder in
    them only), and annotation_dir/<path
    with leading folders dropped one at a time while at least two components remain>; the first existing file
    wins. The fallbacks cover paths written relative to a parent folder (LLaMA-Factory's
    `data/mllm_demo_data/1.jpg`, relative to its repository root, found as repo/data/... or, with the annotation
    folder standing in for `data/`, as annotation_dir/mllm_demo_data/1.jpg). The file's own folder is never
    dropped, so `cats/1.jpg` and `dogs/1.jpg` cannot both bind to annotation_dir/1.jpg. `by_suffix` counts the
    fallback resolutions, so a surprising match can be noticed. When no candidate exists the first is returned,
    and the missing-image reject names it. Absolute paths and file:// URLs stay as they are; http(s) URLs are
    refused: packing never downloads.

    `confine` (for annotation files from elsewhere): a path is taken as written, image_root/path then
    annotation_dir/path, without the two fallbacks (they are guesses, and the ancestors lie outside the roots by
    construction), and the path taken must resolve, symlinks followed, inside image_root or annotation_dir;
    otherwise an `image_outside_root` RecordError, raised before anything is opened. Absolute paths too.
    The candidate is chosen as without `confine`, so confining refuses paths but never binds another file.
    """

    PARENT_LEVELS = 3

    def __init__(self, annotation_dir: Path, image_root: Path | None = None, *, confine: bool = False):
        self.annotation_dir = annotation_dir.expanduser().absolute()
        self.image_root = image_root.expanduser().absolute() if image_root is not None else None
        self.by_suffix = 0
        self.confine = confine
        # Real paths, so a root reached through a symlink still contains its own files.
        self.roots = [Path(os.path.realpath(d)) for d in (self.image_root, self.annotation_dir) if d is not None]

    def __call__(self, ref: str) -> Path | str:
        if ref.startswith(("http://", "https://")):
            raise RecordError("remote_image", f"{ref[:100]}: remote images are not downloaded; fetch it and use a local path")
        if ref.startswith("data:"):
            return ref
        if "\0" in ref:  # no file has such a name, and os functions raise ValueError on it
            raise RecordError("image_unreadable", f"{ref[:100]!r}: a NUL byte in the path")
        try:
            path = Path(ref.removeprefix("file://")).expanduser()
        except RuntimeError:  # `~name/...` of an unknown user: one reject, not the end of the pack
            raise RecordError("image_missing", f"{ref[:100]}: no home folder for that user") from None
        if not path.is_absolute():
            path = self._relative(path)
        if self.confine:
            self._check_inside(ref, path)
        return path

    def _relative(self, path: Path) -> Path:
        direct = [d / path for d in (self.image_root, self.annotation_dir) if d is not None]
        if self.confine:
            return next((c for c in direct if c.is_file()), direct[0])
        # A bare file name stays beside the annotation file: a same-named file elsewhere is no evidence.
        ancestors = [a / path for a in self.annotation_dir.parents[: self.PARENT_LEVELS]] if len(path.parts) > 1 else []
        shorter = [self.annotation_dir / Path(*path.parts[k:]) for k in range(1, len(path.parts) - 1)]
        for n, candidate in enumerate(direct + ancestors + shorter):
            if candidate.is_file():
                self.by_suffix += n >= len(direct)
                return candidate
        return direct[0]

    def _check_inside(self, ref: str, path: Path) -> None:
        # realpath, not a look at the path's text: `..` and symlinks (a link to /etc/passwd inside the folder)
        # are followed as open() would follow them. A missing path is judged by where it would be.
        real = Path(os.path.realpath(path))
        if not any(real == root or root in real.parents for root in self.roots):
            where = f"resolves to {real}, " if str(real) != ref else ""
            raise RecordError("image_outside_root", f"{ref[:100]}: {where}outside {' and '.join(map(str, self.roots))}; "
                                                    "--confine reads images under --image-root and the annotation file's folder only")


def _with_system(record: dict, messages: list[dict]) -> list[dict]:
    """Honour a top-level "system" string (LLaMA-Factory's `system` column) unless a system turn exists."""
    system = record.get("system")
    if isinstance(system, str) and system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": split_tags(system)}] + messages
    return messages


def _role(turn, where: str, key: str) -> str:
    # isinstance first: `{"from": ["human"]}` is unhashable, and `in` a dict would raise TypeError
    if not isinstance(turn, dict) or not isinstance(turn.get(key), str) or turn[key] not in ROLE_NAMES:
        _bad(f"{where}.{key} must be one of {', '.join(ROLE_NAMES)}")
    return ROLE_NAMES[turn[key]]


# --- ShareGPT / LLaMA-Factory and LLaVA / Qwen: string turns with <image> tags -----------------------


def _string_turns(record: dict, turns_key: str, role_key: str, text_key: str) -> list[dict]:
    turns = record.get(turns_key)
    if not isinstance(turns, list) or not turns:
        _bad(f"'{turns_key}' must be a non-empty list")
    messages = []
    for j, turn in enumerate(turns):
        role = _role(turn, f"{turns_key}[{j}]", role_key)
        if not isinstance(turn.get(text_key), str):
            _bad(f"{turns_key}[{j}].{text_key} must be a string")
        messages.append({"role": role, "content": split_tags(turn[text_key])})
    return messages


def _contents(record: dict) -> list:
    msgs = record.get("messages")
    return [m.get("content") for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []


def _is_sharegpt(record: dict) -> bool:
    # String content only: content lists are the "openai" format.
    contents = _contents(record)
    return bool(contents) and all(isinstance(c, str) for c in contents)


def _is_llava(record: dict) -> bool:
    conv = record.get("conversations")
    return isinstance(conv, list) and bool(conv) and isinstance(conv[0], dict) and "from" in conv[0] and "value" in conv[0]


def _read_llava(record: dict):
    key = "images" if record.get("images") is not None else "image"
    return _string_turns(record, "conversations", "from", "value"), _image_list(record.get(key, []), key)


# --- OpenAI-style content lists ---------------------------------------------------------------------


def _is_openai(record: dict) -> bool:
    return any(isinstance(c, list) for c in _contents(record))


def _content_part(part, where: str) -> list[dict]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            _bad(f"{where}: a text part needs a 'text' (or 'value') string")
        return split_tags(text)
    if kind not in ("image", "image_url"):
        _bad(f"{where}: unsupported part type {kind!r}; use text, image or image_url")
    ref = part.get(kind)
    if isinstance(ref, dict):  # {"image_url": {"url": ...}}
        ref = ref.get("url")
    for key in ("url", "path", "value"):  # the spellings of transformers' templates and LLaMA-Factory v1
        ref = part.get(key) if ref is None else ref
    entry = {"type": "image"}
    if ref is not None:  # no reference: the next image of the record's "images" list (TRL's layout)
        if not isinstance(ref, str) or not ref:
            _bad(f"{where}: the image reference must be a non-empty string")
        entry["_path"] = ref
    for key in PER_IMAGE_KEYS:
        if key in part:
            if type(part[key]) is not int or part[key] < 1:
                _bad(f"{where}.{key} must be a positive integer")
            entry[key] = part[key]
    return [entry]


def _read_openai(record: dict):
    if not isinstance(record.get("messages"), list) or not record["messages"]:
        _bad("'messages' must be a non-empty list")
    messages = []
    for j, msg in enumerate(record["messages"]):
        role = _role(msg, f"messages[{j}]", "role")
        content = msg.get("content")
        if isinstance(content, str):
            parts = split_tags(content)
        elif isinstance(content, list):
            parts = [p for k, part in enumerate(content) for p in _content_part(part, f"messages[{j}].content[{k}]")]
        else:
            _bad(f"messages[{j}].content must be a string or a list of parts")
        messages.append({"role": role, "content": parts})
    return messages, _image_list(record.get("images", []), "images")


# --- single-turn tables: instruction triples and caption pairs --------------------------------------

IMAGE_KEYS = ("image_path", "image", "images")


def _record_images(record: dict) -> list[str]:
    key = next((k for k in IMAGE_KEYS if record.get(k) is not None), None)
    return _image_list(record[key], key) if key else []


def _answer(record: dict, keys: tuple[str, ...]) -> str:
    """The answer text, kept verbatim; an image placeholder in it is refused: the images belong to the user turn."""
    answer = _text_field(record, keys)
    if m := PLACEHOLDER.search(answer):
        key = next(k for k in keys if k in record)
        _mismatch(f"'{key}' (the answer) holds the image placeholder {m.group(0)[:60]!r}; an image belongs to the user "
                  "turn: move it to the prompt or drop it")
    return answer


def _text_field(record: dict, keys: tuple[str, ...], *, required: bool = True) -> str:
    key = next((k for k in keys if k in record), None)
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        _bad(f"'{keys[0]}' must be a string")
    return value


def _is_instruction(record: dict) -> bool:
    return "instruction" in record and "output" in record


def _read_instruction(record: dict):
    images = _record_images(record)
    extra = _text_field(record, ("input",), required=False)
    prompt = split_tags(_text_field(record, ("instruction",)) + ("\n" + extra if extra else ""))
    if not any(p["type"] == "image" for p in prompt):  # placeholders in the prompt place the images themselves
        prompt = [{"type": "image"} for _ in images] + prompt
    answer = _answer(record, ("output",))
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": [{"type": "text", "text": answer}] if answer else []}], images


def _is_caption(record: dict) -> bool:
    return any(k in record for k in IMAGE_KEYS) and any(k in record for k in ("text", "caption")) \
        and "conversations" not in record and "messages" not in record


def _read_caption(record: dict):
    images = _record_images(record)
    caption = _answer(record, ("text", "caption"))
    return [{"role": "user", "content": [{"type": "image"} for _ in images]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}] if caption else []}], images


# name -> (detector, reader); dict order is detection priority.
FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], tuple[list[dict], list[str]]]]] = {
    # The openai reader takes string content as well: a file detected as sharegpt from a text-only first
    # record may go on with content lists (the OpenAI layout) without every image record being refused.
    "sharegpt": (_is_sharegpt, _read_openai),
    "llava": (_is_llava, _read_llava),
    "openai": (_is_openai, _read_openai),
    "instruction": (_is_instruction, _read_instruction),
    "caption": (_is_caption, _read_caption),
}


def detect(record) -> str | None:
    """The name of the first format whose detector accepts `record`, or None."""
    if isinstance(record, dict):
        for name, (is_format, _) in FORMATS.items():
            if is_format(record):
                return name
    return None


def record_task(record: dict) -> str | None:
    """The record's top-level "task" label (None when absent or null); RecordError("bad_task") unless it is a
    non-blank string of at most MAX_TASK characters without control characters (it becomes a per-task metric name)."""
    task = record.get("task")
    if task is None:
        return None
    if not isinstance(task, str):
        raise RecordError("bad_task", f"'task' must be a string, got a JSON {type(task).__name__}")
    if not task.strip():
        raise RecordError("bad_task", "'task' is empty; name the task (e.g. \"caption\") or leave the key out")
    if len(task) > MAX_TASK:
        raise RecordError("bad_task", f"'task' {task[:40]!r}... has {len(task)} characters, over {MAX_TASK}; shorten it")
    if bad := next((c for c in task if unicodedata.category(c) == "Cc"), None):
        raise RecordError("bad_task", f"'task' {task!r} holds the control character {bad!r}; remove it")
    return task


def to_sample(record: dict, fmt: str, resolve: Callable[[str], Path | str]) -> dict:
    """One raw record of format `fmt` -> canonical sample (with "task" only when the record has one);
    RecordError if it cannot be one."""
    task = record_task(record)
    messages, listed = FORMATS[fmt][1](record)
    messages = _with_system(record, messages)
    sample = {"messages": messages, "images": _bind_images(messages, listed, resolve)}
    return sample if task is None else {**sample, "task": task}


# --- files ----------------------------------------------------------------------------------------


def _raw_records(path: Path) -> Iterator[tuple[int | None, object]]:
    """Yield (line number or None, parsed JSON or RecordError) per record; JSON Lines are read as bytes so a
    line that is not UTF-8 is one reject, not the end of the file."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(BOM).lstrip()[:1]
        f.seek(0)
        if head == b"[":
            data = f.read()
            try:
                records = json.loads(data.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                line = data[: e.start].count(b"\n") + 1
                raise VloraError(f"{path}: line {line} is not valid UTF-8; re-save the file as UTF-8") from None
            except json.JSONDecodeError as e:
                # A broken array loses every record: that is the user's to fix, not a reject.
                raise VloraError(f"{path}: not valid JSON ({e}); fix the file or convert it to JSON Lines") from None
            yield from ((None, r) for r in records)
            return
        for lineno, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as e:
                yield lineno, RecordError("invalid_utf8", f"line {lineno}: byte 0x{line[e.start]:02x} at column {e.start + 1} is not valid UTF-8; re-save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, RecordError("invalid_json", f"line {lineno}: {e}")


@dataclass
class AnnotationFile:
    """An opened annotation file: its detected format, its records (read lazily, once) and the resolver
    whose `by_suffix` count is final once the records are consumed."""

    path: Path
    format: str
    records: Iterator[Record]
    resolver: PathResolver


def read_annotations(path, *, image_root=None, fmt: str | None = None, confine: bool = False) -> AnnotationFile:
    """Open an annotation file; `fmt` None (or "auto") detects the format from the first records; `confine`: see
    PathResolver.

    A wrong path or an unknown format raises VloraError at once; per-record problems come back as Record.error.
    """
    path = Path(path)
    if not path.is_file():
        raise VloraError(f"{path}: annotation file not found; check the path")
    fmt = None if fmt == "auto" else fmt
    if fmt is not None and fmt not in FORMATS:
        raise VloraError(f"{path}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    raws = _raw_records(path)
    head = list(itertools.islice(raws, DETECT_WINDOW))
    if fmt is None:
        fmt = next((f for f in (detect(raw) for _, raw in head) if f), None)
        if fmt is None:
            what = "has no records" if not head else f"matches no known format in its first {len(head)} records"
            raise UnknownFormat(f"{path}: {what}; expected {', '.join(FORMATS)} records (see vlora/data/formats.py)")
    resolver = PathResolver(path.parent, None if image_root is None else Path(image_root), confine=confine)

    def records() -> Iterator[Record]:
        for index, (line, raw) in enumerate(itertools.chain(head, raws)):
            if isinstance(raw, RecordError):
                yield Record(index, line, None, error=raw)
            elif not isinstance(raw, dict):
                yield Record(index, line, None, error=RecordError("bad_record", f"record is a JSON {type(raw).__name__}, not an object"))
            else:
                try:
                    yield Record(index, line, raw, sample=to_sample(raw, fmt, resolver))
                except RecordError as e:
                    if e.reason == "bad_record" and (other := detect(raw)) not in (None, fmt):
                        e = RecordError(e.reason, f"{e.detail} (the record looks like {other}, the file is read as {fmt})")
                    yield Record(index, line, raw, error=e)

    return AnnotationFile(path, fmt, records(), resolver)


def load_samples(path, *, image_root=None, fmt: str | None = None) -> list[dict]:
    """All canonical samples of a file; raises VloraError at the first bad record (for small files and tests)."""
    samples = []
    for r in read_annotations(path, image_root=image_root, fmt=fmt).records:
        if r.error:
            raise VloraError(f"{path}: record {r.index}: {r.error}")
        samples.append(r.sample)
    return samples
