"""The demo generator: deterministic, held-out val split, and every answer readable from the pixels."""

import hashlib
import json
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image

from vlora.data import synth


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _blobs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, as pixel lists (no scipy in the venv)."""
    seen = np.zeros_like(mask)
    blobs = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, blob = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            blob.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        blobs.append(blob)
    return blobs


def read_pixels(path: Path) -> dict:
    """Recover colour, shape, count, region and background from the image alone."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    size = a.shape[0]
    # The background is the most common colour: at most 4 of the 16 cells hold a shape.
    flat, counts = np.unique(a.reshape(-1, 3), axis=0, return_counts=True)
    bg = tuple(int(v) for v in flat[counts.argmax()])
    mask = (a != bg).any(-1)
    colours = {tuple(int(v) for v in c) for c in a[mask]}
    assert len(colours) == 1, f"{path}: expected one flat shape colour, got {colours}"
    blobs = _blobs(mask)
    fills = []
    for blob in blobs:
        ys, xs = zip(*blob)
        fills.append(len(blob) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1)))
    # Fill ratio of a blob's bounding box: square 1, circle ~pi/4, triangle ~1/2.
    kinds = {"square" if f > 0.95 else "circle" if f > 0.68 else "triangle" for f in fills}
    assert len(kinds) == 1, f"{path}: mixed shapes {fills}"
    ys, xs = np.nonzero(mask)
    regions = [r for r in synth.REGIONS if _inside(synth.region_box(r, size), xs, ys)]
    assert len(regions) == 1, f"{path}: shapes in regions {regions}"
    return {
        "colour": {v: k for k, v in synth.COLOURS.items()}[colours.pop()],
        "background": {v: k for k, v in synth.BACKGROUNDS.items()}[bg],
        "shape": kinds.pop(),
        "count": len(blobs),
        "region": regions[0],
    }


def _inside(box, xs, ys) -> bool:
    x0, y0, x1, y1 = box
    return xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    stats = [synth.write_demo_data(tmp_path / name, n_train=24, n_val=8, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (_hashes(tmp_path / name) for name in "abc")
    assert len(a) == 24 + 8 + 2  # images + two annotation files
    assert a == b
    assert stats[0] == stats[1] == {"train": 24, "val": 8, "images": 32, "by_kind": stats[0]["by_kind"]}
    assert sum(stats[0]["by_kind"].values()) == 32
    tasks = [r["task"] for split in ("train", "val") for r in _records(tmp_path / "a" / f"{split}.jsonl")]
    assert stats[0]["by_kind"] == {kind: tasks.count(kind) for kind in synth.KINDS}
    assert a.keys() == c.keys()
    assert a["train.jsonl"] != c["train.jsonl"]
    assert sum(a[k] != c[k] for k in a) >= 30  # nearly every image differs too


def test_record_layout_and_held_out_split(demo_src):
    train, val = _records(demo_src / "train.jsonl"), _records(demo_src / "val.jsonl")
    assert len(train) == 256 and len(val) == 64
    assert train[0]["id"] == "train-000001" and val[-1]["id"] == "val-000064"
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert not {r["images"][0] for r in train} & {r["images"][0] for r in val}
    for r in train + val:
        assert list(r) == ["id", "messages", "images", "task", "meta"]
        assert r["task"] == r["meta"]["kind"] and r["task"] in synth.KINDS  # the label evaluation scores per task by
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"].startswith("<image>") and r["messages"][0]["content"].count("<image>") == 1
        assert r["images"] == [f"images/{r['id']}.png"] and (demo_src / r["images"][0]).is_file()
    kinds = [r["meta"]["kind"] for r in train + val]
    assert set(kinds) == set(synth.KINDS)
    assert 0.25 < kinds.count("caption") / len(kinds) < 0.42  # about a third captions


def test_answers_are_in_the_pixels(demo_src):
    question_kind = {q: kind for kind, qs in synth.QUESTIONS.items() for q in qs}
    seen_answers = {kind: set() for kind in synth.KINDS}
    for r in _records(demo_src / "train.jsonl") + _records(demo_src / "val.jsonl"):
        facts = read_pixels(demo_src / r["images"][0])
        question = r["messages"][0]["content"].removeprefix("<image>")
        kind = question_kind[question]
        assert r["task"] == r["meta"]["kind"] == kind
        got = r["messages"][1]["content"]
        # The answer recomputed from pixels alone must equal the stored one, for every kind.
        assert got == synth.answer(kind, facts), (r["id"], question, got, facts)
        assert {k: r["meta"][k] for k in facts} == facts and len(r["meta"]["boxes"]) == facts["count"]
        seen_answers[kind].add(got)
    assert seen_answers["count"] == {"1", "2", "3", "4"}
    assert seen_answers["position"] == set(synth.REGIONS)
    assert seen_answers["shape"] == set(synth.SHAPES)


def test_caption_wording():
    meta = {"colour": "red", "shape": "circle", "count": 2, "region": "left"}
    assert synth.caption(meta) == "Two red circles on the left."
    assert synth.caption({**meta, "count": 1, "region": "top"}) == "One red circle at the top."


def test_image_size_is_honoured(tmp_path):
    synth.write_demo_data(tmp_path, n_train=3, n_val=1, seed=5, image_size=64)
    for p in (tmp_path / "images").iterdir():
        with Image.open(p) as im:
            assert im.size == (64, 64)
        read_pixels(p)
