"""Synthetic demo data whose answers are in the pixels.

Each image holds 1-4 filled shapes of one kind and one colour, placed in one region of a plain
background. Because every answer (colour, shape, count, position, caption) is a function of the
pixels, a model that learns from this data shows a falling loss and a rising exact-match score
within minutes on a CPU, and the tests can check the answers against the images themselves.

The output is a ShareGPT / LLaMA-Factory dataset folder:

    out_dir/images/train-000001.png ...
    out_dir/train.jsonl   {"id", "messages": [user "<image>...", assistant "..."], "images", "task", "meta"}
    out_dir/val.jsonl     the held-out split, from its own random stream

`task` is the question kind (caption, colour, shape, count, position): packing keeps it in each sample, so
evaluation can score per kind. `meta` carries the generating parameters, the kind included (ignored by readers).
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


# The image is a GRID x GRID board of cells, and every shape sits in one cell. At the demo's 112 px, a cell is 28 px:
# exactly one Qwen2.5-VL image token (14 px patches, merged 2 x 2), so each shape fills one token of its own.
# (Shapes drawn across token borders, in a random frozen vision tower, left too weak a signal for the tiny model to
# learn colour, shape, count or position within the demo's 300 steps.)
GRID = 4
# Each region is four cells, and no cell belongs to two regions: top and bottom are the first and last rows,
# left and right the two halves of the middle rows.
REGION_CELLS = {
    "left": ((1, 0), (1, 1), (2, 0), (2, 1)),
    "right": ((1, 2), (1, 3), (2, 2), (2, 3)),
    "top": ((0, 0), (0, 1), (0, 2), (0, 3)),
    "bottom": ((3, 0), (3, 1), (3, 2), (3, 3)),
}


def region_box(region: str, size: int) -> tuple[float, float, float, float]:
    """The (x0, y0, x1, y1) box that holds the cells of `region` (boxes of different regions never overlap)."""
    rows = [r for r, _ in REGION_CELLS[region]]
    cols = [c for _, c in REGION_CELLS[region]]
    cell = size / GRID
    return (min(cols) * cell, min(rows) * cell, (max(cols) + 1) * cell, (max(rows) + 1) * cell)


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
    """Draw one image's parameters. Each shape sits in its own cell of the region, with a margin on every side,
    so shapes never touch: the count is the number of connected blobs."""
    meta = {
        "colour": rng.choice(sorted(COLOURS)),
        "shape": rng.choice(SHAPES),
        "count": rng.randint(1, 4),
        "region": rng.choice(REGIONS),
        "background": rng.choice(sorted(BACKGROUNDS)),
    }
    cell = size / GRID
    margin = max(1, round(size / 56))
    boxes = []
    for k in sorted(rng.sample(range(4), meta["count"])):
        row, col = REGION_CELLS[meta["region"]][k]
        side = max(3, int((cell - 2 * margin) * rng.uniform(0.75, 1.0)))
        # Jitter inside the cell; ints keep the drawing exact and the JSON short.
        x0 = int(col * cell + margin + rng.uniform(0, cell - 2 * margin - side))
        y0 = int(row * cell + margin + rng.uniform(0, cell - 2 * margin - side))
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
            "task": kind,
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
