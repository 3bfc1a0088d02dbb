"""Synthetic demo data whose answers are in the pixels.

Each image holds 1-4 filled shapes of one kind and one colour, placed in one region of a plain
background. Because every answer (colour, shape, count, position, caption) is a function of the
pixels, a model that learns from this data shows a falling loss and a rising exact-match score
within minutes on a CPU, and the tests can check the answers against the images themselves.

The output is a ShareGPT / LLaMA-Factory dataset folder:

    out_dir/images/train-000001.png ...
    out_dir/train.jsonl   {"id", "messages": [user "<image>...", assistant "..."], "images", "meta"}
    out_dir/val.jsonl     the held-out split, from its own random stream

`meta` carries the generating parameters (ignored by readers) so evaluation can score per question kind.
The same seed gives byte-identical files: the random streams are seeded from strings, PIL's PNG encoder
is deterministic, and nothing time-dependent is written.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

# Saturated colours far apart from each other and from the backgrounds, so the dominant
# non-background colour of an image is unambiguous (ImageDraw does not anti-alias).
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 10),
}
BACKGROUNDS = {"white": (255, 255, 255), "grey": (190, 190, 190), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
REGIONS = ("left", "right", "top", "bottom")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
KINDS = ("caption", "colour", "shape", "count", "position")

QUESTIONS = {
    "caption": ("Describe the image.", "What do you see in this picture?"),
    "colour": ("What colour are the shapes?", "Which colour do the shapes have?"),
    "shape": ("What shape are the objects?", "Which kind of shape is shown?"),
    "count": ("How many shapes are there?", "Count the shapes."),
    "position": ("Where are the shapes?", "In which part of the image are the shapes?"),
}


def region_box(region: str, size: int) -> tuple[float, float, float, float]:
    """The (x0, y0, x1, y1) box that shapes of `region` are drawn in.

    The four boxes never overlap (they only touch at corners), so 'left' and 'top' can't be
    confused: left/right boxes span the middle third vertically, top/bottom the middle third horizontally.
    """
    a, b = 0.35 * size, 0.65 * size
    return {
        "left": (0.0, a, a, b),
        "right": (b, a, float(size), b),
        "top": (a, 0.0, b, a),
        "bottom": (a, b, b, float(size)),
    }[region]


def caption(meta: dict) -> str:
    """'Two red circles on the left.', 'One blue square at the top.'"""
    n = meta["count"]
    noun = meta["shape"] + ("s" if n > 1 else "")
    where = ("on the " if meta["region"] in ("left", "right") else "at the ") + meta["region"]
    return f"{NUMBER_WORDS[n].capitalize()} {meta['colour']} {noun} {where}."


def answer(kind: str, meta: dict) -> str:
    """The assistant's answer to a question of `kind`: short and exact-match friendly."""
    if kind == "caption":
        return caption(meta)
    return {"colour": meta["colour"], "shape": meta["shape"], "count": str(meta["count"]), "position": meta["region"]}[kind]


def draw_image(meta: dict, size: int) -> Image.Image:
    """Render `meta` (colour, shape, region, background, cells) as an RGB image of size x size."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[meta["background"]])
    draw = ImageDraw.Draw(img)
    fill = COLOURS[meta["colour"]]
    for x0, y0, x1, y1 in meta["boxes"]:
        if meta["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif meta["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def sample_meta(rng: random.Random, size: int) -> dict:
    """Draw one image's parameters. Shapes sit in distinct cells of a 2x2 grid inside the region
    box, with a margin, so they never touch: the count is the number of connected blobs."""
    meta = {
        "colour": rng.choice(sorted(COLOURS)),
        "shape": rng.choice(SHAPES),
        "count": rng.randint(1, 4),
        "region": rng.choice(REGIONS),
        "background": rng.choice(sorted(BACKGROUNDS)),
    }
    bx0, by0, bx1, by1 = region_box(meta["region"], size)
    cw, ch = (bx1 - bx0) / 2, (by1 - by0) / 2
    margin = max(1, round(size / 56))
    boxes = []
    for cell in sorted(rng.sample(range(4), meta["count"])):
        cx0, cy0 = bx0 + (cell % 2) * cw, by0 + (cell // 2) * ch
        side = max(3, int((min(cw, ch) - 2 * margin) * rng.uniform(0.7, 1.0)))
        # Jitter inside the cell; ints keep the drawing exact and the JSON short.
        x0 = int(cx0 + margin + rng.uniform(0, cw - 2 * margin - side))
        y0 = int(cy0 + margin + rng.uniform(0, ch - 2 * margin - side))
        boxes.append([x0, y0, x0 + side - 1, y0 + side - 1])
    meta["boxes"] = boxes
    return meta


def _write_split(out: Path, split: str, n: int, seed: int, size: int, by_kind: dict) -> None:
    # One stream per split, seeded from a string (hashed with SHA-512 by `random`, so it is stable
    # across processes and PYTHONHASHSEED): the val split is held out, not a slice of train.
    rng = random.Random(f"vlora-demo/{seed}/{split}")
    lines = []
    for i in range(1, n + 1):
        sid = f"{split}-{i:06d}"
        meta = sample_meta(rng, size)
        # About a third captions, the rest split evenly over the four VQA kinds.
        kind = "caption" if rng.random() < 1 / 3 else rng.choice(KINDS[1:])
        question = rng.choice(QUESTIONS[kind])
        draw_image(meta, size).save(out / "images" / f"{sid}.png", format="PNG")
        by_kind[kind] += 1
        record = {
            "id": sid,
            "messages": [
                {"role": "user", "content": "<image>" + question},
                {"role": "assistant", "content": answer(kind, meta)},
            ],
            "images": [f"images/{sid}.png"],
            "meta": {"kind": kind, **meta},
        }
        lines.append(json.dumps(record, sort_keys=False))
    (out / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_demo_data(out_dir, *, n_train: int, n_val: int, seed: int = 0, image_size: int = 112) -> dict:
    """Write the demo dataset to `out_dir` and return counts:
    {"train": n_train, "val": n_val, "images": total, "by_kind": {kind: n}}."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    by_kind = dict.fromkeys(KINDS, 0)
    _write_split(out, "train", n_train, seed, image_size, by_kind)
    _write_split(out, "val", n_val, seed, image_size, by_kind)
    return {"train": n_train, "val": n_val, "images": n_train + n_val, "by_kind": by_kind}
