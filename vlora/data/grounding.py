"""Grounding boxes and points: original pixels (as packed) <-> the coordinates a Qwen-VL family was trained on.

Why this exists: the same box is written differently per family, and two of the ways depend on the image.
  - "absolute" (Qwen2.5-VL): integer pixels of the image AFTER the processor's resize (qwen_vl_utils.smart_resize,
    sides rounded to multiples of 28), not of the file. Maintainers in QwenLM/Qwen3-VL issues #676 ("absolute
    coordinates based on the actual input size of the image ... the size after processer") and #940. Qwen's own
    conversion (qwen-vl-finetune/tools/process_bbox.ipynb): x' = round(x * new_w / w), y' = round(y * new_h / h),
    clamped to [0, new_w - 1] / [0, new_h - 1].
  - "relative" (Qwen2-VL, Qwen3-VL, Qwen3.5): integers 0-1000 of the image, x' = round(x / w * 1000), clamped to
    [0, 1000]. Qwen2-VL: a maintainer in issue #866 ("Qwen2-VL using coordinates normalized between [0,1000]");
    Qwen3-VL: the README quoted in issue #1741 ("relative coordinates ranging from 0 to 1000"; that issue notes
    Alibaba Cloud's docs say 0-999, so the top value is not settled); Qwen3.5: third-party docs only, unverified.
    The resize stretches the whole image, so a fraction of the original is the same fraction of the resized image.

So a box cannot be converted when the data is packed: the family and the run's resolution (data.max_pixels, and
per-image limits) are only known in the collator, and a repack per model or resolution would be absurd. Annotations
stay in the ORIGINAL image's pixels (what users have) and `convert_boxes` runs per sample in the data workers;
`check_boxes` is the pack-time gate (reject reason "bad_box"); `to_original` maps a model's answer back for
evaluation and serving.

Syntaxes recognised in any text part (user and assistant turns alike):
  - Qwen tokens: `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`, or one point `<|box_start|>(x,y)<|box_end|>`; an
    `<|object_ref_start|>label<|object_ref_end|>` before it is plain text and stays as it is.
  - JSON inside text: `"bbox_2d": [x1, y1, x2, y2]` and `"point_2d": [x, y]` (Qwen2.5/3 answers). Only the numbers
    are rewritten, every other character is kept (the JSON is never re-serialised). A bracket holding no number
    (`"bbox_2d": [x1, y1, x2, y2]` in a prompt that describes the format) is not a box and is left alone.
Numbers may be ints or floats; output is ints, rounded half to even as Python's round(), as Qwen's notebook does.
A box refers to the most recent image part before its text (messages in order, parts in order).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vlora.data.formats import RecordError

ABSOLUTE, RELATIVE = "absolute", "relative"
# Qwen-VL's grounding tokens: special tokens, which a decode that skips special tokens would drop from an answer.
MARKERS = frozenset(("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                     "<|quad_start|>", "<|quad_end|>"))
CONVENTIONS = (ABSOLUTE, RELATIVE)
RELATIVE_SCALE = 1000

# A number as written in a box: int, float, exponent, or a non-finite spelling (parsed so that it is rejected as
# "not finite" rather than as malformed). The look-behind keeps the 1 of a template's `x1` from counting.
_NUM = r"(?<![\w.])[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?:nan|inf(?:inity)?)(?![\w]))"
_NUMBER = re.compile(_NUM, re.IGNORECASE)
_PAIR = rf"\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*"
_PAIRS = re.compile(rf"{_PAIR}(?:,{_PAIR})?", re.IGNORECASE)  # the body of a token box: 1 or 2 (x,y) pairs
_NUMBER_LIST = re.compile(rf"\s*{_NUM}\s*(?:,\s*{_NUM}\s*)*", re.IGNORECASE)
_TOKEN = re.compile(r"<\|box_(start|end)\|>")
# `"bbox_2d": [...]`, also single-quoted (a Python dict's repr) or with escaped quotes (JSON inside a JSON string).
_JSON_KEY = re.compile(r"""\\?(["'])(bbox_2d|point_2d)\\?\1\s*:\s*\[([^\[\]]*)\]""")
_CLIP = 100  # characters of a box quoted in a reject's detail


@dataclass(frozen=True)
class _Span:
    text: str  # the box as written, for messages
    numbers: tuple[tuple[int, int], ...]  # (start, end) of each coordinate in the text part: x, y[, x, y]
    values: tuple[float, ...]


def _maybe_boxes(text: str) -> bool:
    # Substring tests only: the common text part (no grounding) must cost next to nothing.
    return "<|box_" in text or "_2d" in text


def _clip(text: str) -> str:
    return repr(text if len(text) <= _CLIP else text[: _CLIP - 3] + "...")


def _span(text: str, start: int, end: int, whole: str) -> _Span:
    numbers = tuple((m.start(), m.end()) for m in _NUMBER.finditer(text, start, end))
    return _Span(whole, numbers, tuple(float(text[a:b]) for a, b in numbers))


def _token_spans(text: str, spans: list[_Span], problems: list[tuple[str, str]]) -> None:
    """The `<|box_start|>...<|box_end|>` boxes of `text`; unpaired markers and bad bodies go to `problems`."""
    opened = None
    for m in _TOKEN.finditer(text):
        if m.group(1) == "start":
            if opened is not None:  # a second start before an end: the first one is never closed
                problems.append((text[opened.start():m.end()], "<|box_start|> without its <|box_end|>"))
            opened = m
            continue
        if opened is None:
            problems.append((m.group(0), "<|box_end|> without a <|box_start|> before it"))
            continue
        whole = text[opened.start():m.end()]
        if _PAIRS.fullmatch(text, opened.end(), m.start()):
            spans.append(_span(text, opened.end(), m.start(), whole))
        else:
            problems.append((whole, "is not 1 or 2 (x,y) pairs"))
        opened = None
    if opened is not None:
        problems.append((text[opened.start():], "<|box_start|> without its <|box_end|>"))


def _json_spans(text: str, spans: list[_Span], problems: list[tuple[str, str]]) -> None:
    """The `"bbox_2d": [...]` / `"point_2d": [...]` lists of `text` that hold numbers."""
    for m in _JSON_KEY.finditer(text):
        start, end = m.span(3)
        if not _NUMBER.search(text, start, end):
            continue  # a format description such as [x1, y1, x2, y2]: no coordinates to convert
        want = 4 if m.group(2) == "bbox_2d" else 2
        if not _NUMBER_LIST.fullmatch(text, start, end):
            problems.append((m.group(0), f"{m.group(2)} is not a list of {want} numbers"))
            continue
        span = _span(text, start, end, m.group(0))
        if len(span.values) != want:
            problems.append((m.group(0), f"{m.group(2)} has {len(span.values)} numbers, not {want}"))
            continue
        spans.append(span)


def _spans(text: str) -> tuple[list[_Span], list[tuple[str, str]]]:
    """(boxes and points found, problems as (box text, why)); both empty for text without a marker."""
    spans: list[_Span] = []
    problems: list[tuple[str, str]] = []
    if "<|box_" in text:
        _token_spans(text, spans, problems)
    if "_2d" in text:
        _json_spans(text, spans, problems)
    return spans, problems


def _candidates(messages: list[dict]) -> Iterator[tuple[int, str, int, int | None, str]]:
    """(message index, role, index of the latest image before it or -1, part index or None for string content,
    text) for every text that may hold a box; images are counted as the parts go by."""
    image = -1
    for j, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):  # plain string content: one text part, no images
            if _maybe_boxes(content):
                yield j, message.get("role", "?"), image, None, content
            continue
        for p, part in enumerate(content or ()):
            kind = part.get("type")
            if kind == "image":
                image += 1
            elif kind == "text" and _maybe_boxes(text := part.get("text") or ""):
                yield j, message.get("role", "?"), image, p, text


def _bad(j: int, role: str, box: str, why: str) -> RecordError:
    return RecordError("bad_box", f"message {j} ({role}): box {_clip(box)} {why}")


def _size(sizes: list[tuple[int, int]], image: int) -> tuple[int, int]:
    if image >= len(sizes):  # the caller's lists disagree with the messages: a bug, not a bad record
        raise ValueError(f"a box refers to image {image}, but only {len(sizes)} image size(s) were given")
    return sizes[image]


def _problem(span: _Span, image: int, size: tuple[int, int]) -> str | None:
    """Why a parsed box or point does not fit image `image` of `size` (original pixels), or None."""
    if image < 0:
        return "comes before any image: put the image first"
    w, h = size
    where = f"(image {image} is {w}x{h})"
    v = span.values
    if not all(math.isfinite(x) for x in v):
        return "holds a number that is not finite"
    for i, x in enumerate(v):
        axis, limit = ("x", w) if i % 2 == 0 else ("y", h)
        if x < 0:
            return f"has a negative {axis} ({x:g})"
        if x > limit:
            return f"has {axis} {x:g} beyond the image {where}"
    if len(v) == 4 and (v[2] < v[0] or v[3] < v[1]):
        return f"has x2 < x1 or y2 < y1 ({v[0]:g},{v[1]:g},{v[2]:g},{v[3]:g}); write (left, top), (right, bottom)"
    return None


def check_boxes(messages: list[dict], sizes: list[tuple[int, int]]) -> None:
    """sizes[i] = (width, height) of image i in order. Raise RecordError("bad_box", detail) naming the message
    index, role and the box text when: a box has no image before it, a coordinate is negative or beyond the image
    (x > width or y > height), x2 < x1 or y2 < y1, a number is not finite, or a box token span is malformed (a
    <|box_start|> without a matching <|box_end|>, or a body that is not 1 or 2 (x,y) pairs). Text without boxes
    passes untouched and fast (a substring test before any regex)."""
    for j, role, image, _, text in _candidates(messages):
        spans, problems = _spans(text)
        if problems:
            raise _bad(j, role, *problems[0])
        for span in spans:
            why = _problem(span, image, _size(sizes, image) if image >= 0 else (0, 0))
            if why:
                raise _bad(j, role, span.text, why)


def _rewrite(text: str, spans: list[_Span], new_value: Callable[[int, float], int | None]) -> str:
    """`text` with coordinate k of each span (k even: x, odd: y) replaced by new_value(k, value), or kept if None."""
    edits = sorted((a, b, str(new)) for span in spans for k, (a, b) in enumerate(span.numbers)
                   if (new := new_value(k, span.values[k])) is not None)
    out, at = [], 0
    for a, b, new in edits:
        out += [text[at:a], new]
        at = b
    out.append(text[at:])
    return "".join(out)


def _clamp(x: float, top: int) -> int:
    return min(max(round(x), 0), top)


def _forward(convention: str, original: tuple[int, int], resized: tuple[int, int]) -> Callable[[int, float], int]:
    """Original pixels -> `convention`, per axis (k even: x, odd: y)."""
    (w, h), (nw, nh) = original, resized
    if convention == ABSOLUTE:  # multiply first: exact for integer inputs, so round()'s ties are Qwen's ties
        return lambda k, x: _clamp(x * nw / w, nw - 1) if k % 2 == 0 else _clamp(x * nh / h, nh - 1)
    if convention == RELATIVE:
        return lambda k, x: _clamp(x * RELATIVE_SCALE / (w if k % 2 == 0 else h), RELATIVE_SCALE)
    raise ValueError(f"unknown grounding convention {convention!r}; expected one of {CONVENTIONS}")


def convert_boxes(messages: list[dict], originals: list[tuple[int, int]], resized: list[tuple[int, int]],
                  convention: str) -> list[dict]:
    """New messages (input not mutated; parts and messages without boxes are shared) with every box and point
    rewritten from original pixels to `convention` (ABSOLUTE: pixels of resized[i]; RELATIVE: 0-1000). Returns
    the input object itself when no text holds a box (the common case costs a substring test per text part).
    A box that check_boxes would reject raises the same RecordError: nothing unconvertible reaches the model."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown grounding convention {convention!r}; expected one of {CONVENTIONS}")
    out = None  # copied on the first rewrite only
    for j, role, image, p, text in _candidates(messages):
        spans, problems = _spans(text)
        if problems:
            raise _bad(j, role, *problems[0])
        if not spans:
            continue
        for span in spans:
            if why := _problem(span, image, _size(originals, image) if image >= 0 else (0, 0)):
                raise _bad(j, role, span.text, why)
        new = _rewrite(text, spans, _forward(convention, originals[image], _size(resized, image)))
        if out is None:
            out = list(messages)
        if p is None:
            out[j] = {**out[j], "content": new}
        else:
            if out[j] is messages[j]:  # copy a message (and its part list) once, however many parts change
                out[j] = {**messages[j], "content": list(messages[j]["content"])}
            out[j]["content"][p] = {**out[j]["content"][p], "text": new}
    return messages if out is None else out


def to_original(text: str, convention: str, original: tuple[int, int], resized: tuple[int, int]) -> str:
    """The inverse for one image: a model's answer in `convention` back to original pixels (ints, rounded, clamped
    to [0, width] / [0, height]), for evaluation and serving. Tolerant, as generated text may be cut short or odd:
    malformed spans and non-finite numbers are left as written, never an error. `resized` is unused for RELATIVE."""
    if not _maybe_boxes(text):
        return text
    spans, _ = _spans(text)
    if not spans:
        return text
    (w, h), (nw, nh) = original, resized
    if convention == ABSOLUTE:
        scale = (w / nw, h / nh)
    elif convention == RELATIVE:
        scale = (w / RELATIVE_SCALE, h / RELATIVE_SCALE)
    else:
        raise ValueError(f"unknown grounding convention {convention!r}; expected one of {CONVENTIONS}")
    return _rewrite(text, spans, lambda k, x: _clamp(x * scale[k % 2], (w, h)[k % 2]) if math.isfinite(x) else None)


def boxes_in(text: str) -> list[tuple[float, float, float, float]]:
    """The boxes (x1, y1, x2, y2) written in `text`, in reading order, for scoring; points, malformed spans and
    non-finite numbers are left out, never an error (a model's answer may be cut short)."""
    if not _maybe_boxes(text):
        return []
    spans, _ = _spans(text)
    return [span.values for span in sorted(spans, key=lambda span: span.numbers[0][0])  # type: ignore[misc]
            if len(span.values) == 4 and all(map(math.isfinite, span.values))]
