"""Formats -> canonical samples, and pack -> shards + manifest + rejects, checked byte for byte."""

import hashlib
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from vlora.data import pack as pack_mod
from vlora.data.formats import detect, load_samples, read_annotations
from vlora.data.manifest import read_manifest, shard_paths, write_manifest
from vlora.data.pack import format_summary, pack, sample_key
from vlora.errors import VloraError

MLLM_DEMO = Path("/work/shared/peers/llamafactory_mllm_demo/mllm_demo.json")


def _png(path: Path, colour=(255, 0, 0), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _qa(q="<image>Q?", a="A", images=("a.png",), **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "images": list(images), **extra}


# --- formats --------------------------------------------------------------------------------------


def test_sharegpt_to_canonical(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Compare <image> and<image>\nplease."},
            {"role": "assistant", "content": "Same."},
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Red <image> twice."},
        ],
        "images": ["x/1.png", "/abs/2.jpg", "3.png"],
    }])
    (sample,) = load_samples(src)
    assert sample["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and"},
                                     {"type": "image"}, {"type": "text", "text": "\nplease."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red "}, {"type": "image"}, {"type": "text", "text": " twice."}]},
    ]
    assert sample["images"] == [tmp_path.absolute() / "x/1.png", Path("/abs/2.jpg"), tmp_path.absolute() / "3.png"]
    (rooted,) = load_samples(src, image_root=tmp_path / "root")
    assert rooted["images"][0] == (tmp_path / "root/x/1.png").absolute()


def test_llava_to_canonical_json_array(tmp_path):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([
        {"id": "0", "image": "a.jpg", "conversations": [
            {"from": "system", "value": "Sys."},
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."}]},
        {"id": "1", "images": ["b.png", "c.png"], "system": "Top-level system.", "conversations": [
            {"from": "human", "value": "<image><image>Diff?"}, {"from": "gpt", "value": "None."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Text only."}, {"from": "gpt", "value": "OK."}]},
    ], indent=1))
    fmt, records = read_annotations(src)
    assert fmt == "llava"
    a, b, c = (r.sample for r in records)
    assert a == {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ], "images": [tmp_path.absolute() / "a.jpg"]}
    assert b["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "Top-level system."}]}
    assert b["messages"][1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Diff?"}]
    assert b["images"] == [tmp_path.absolute() / "b.png", tmp_path.absolute() / "c.png"]
    assert c["images"] == []


def test_detect_and_unknown_format(tmp_path):
    assert detect(_qa()) == "sharegpt"
    assert detect({"conversations": [{"from": "human", "value": "hi"}]}) == "llava"
    # OpenAI-style content lists are a later format: not mistaken for ShareGPT.
    assert detect({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) is None
    src = _jsonl(tmp_path / "weird.jsonl", [{"image_path": "a.png", "text": "caption"}])
    with pytest.raises(VloraError, match="weird.jsonl: matches no known format") as e:
        read_annotations(src)
    assert "\n" not in str(e.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(VloraError, match="empty.jsonl: has no records"):
        read_annotations(tmp_path / "empty.jsonl")
    (tmp_path / "broken.json").write_text('[{"messages": ]')
    with pytest.raises(VloraError, match="broken.json: not valid JSON"):
        read_annotations(tmp_path / "broken.json")


# --- pack: the demo shards --------------------------------------------------------------------------


def test_demo_manifest_matches_files(demo_shards):
    for split, n, n_shards in (("train", 256, 8), ("val", 64, 2)):
        d = demo_shards / split
        m = read_manifest(d)
        assert (m["format"], m["read"], m["samples"], m["rejected"], m["rejects_by_reason"]) == ("vlora-shards/1", n, n, 0, {})
        assert m["read"] == m["samples"] + m["rejected"]
        assert [s["name"] for s in m["shards"]] == [f"shard-{i:06d}.tar" for i in range(n_shards)]
        assert [s["samples"] for s in m["shards"]] == [32] * n_shards
        for s in m["shards"]:
            assert s["sha256"] == _sha(d / s["name"]) and s["bytes"] == (d / s["name"]).stat().st_size
        assert m["sources"] == [{"file": f"{split}.jsonl", "format": "sharegpt", "records": n, "sha256": m["sources"][0]["sha256"]}]
        assert (d / "rejects.jsonl").read_text() == ""
        assert sorted(p.name for p in d.iterdir()) == sorted(["manifest.json", "rejects.jsonl"] + [s["name"] for s in m["shards"]])
        text = (d / "manifest.json").read_text()
        assert text.endswith("}\n") and text == json.dumps(m, sort_keys=True, indent=2) + "\n"
        assert shard_paths(d) == [str((d / s["name"]).absolute()) for s in m["shards"]]


def test_demo_shards_stream_back_identically(demo_src, demo_shards):
    records = [json.loads(line) for line in (demo_src / "train.jsonl").read_text().splitlines()]
    canonical = load_samples(demo_src / "train.jsonl")
    got = list(wds.WebDataset(shard_paths(demo_shards / "train"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == [r["id"] for r in records]
    for i, (s, r, c) in enumerate(zip(got, records, canonical)):
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {"json", "0.png"}
        assert s["0.png"] == (demo_src / r["images"][0]).read_bytes()
        meta = json.loads(s["json"])
        assert meta == {"messages": c["messages"], "source": {"file": "train.jsonl", "index": i}, "images": [{"width": 112, "height": 112}]}


def test_repack_is_byte_identical(demo_src, demo_shards, tmp_path):
    pack(demo_src / "val.jsonl", tmp_path / "a", shard_size=32)
    pack(demo_src / "val.jsonl", tmp_path / "b", shard_size=32)
    for name in ("shard-000000.tar", "shard-000001.tar", "manifest.json", "rejects.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() == (demo_shards / "val" / name).read_bytes()


def test_pack_replaces_an_earlier_pack_in_place(demo_src, tmp_path):
    out = tmp_path / "out"
    pack(demo_src / "val.jsonl", out, shard_size=16)
    s = pack(demo_src / "val.jsonl", out, shard_size=40)
    assert (s.read, s.written, s.rejected, s.shards) == (64, 64, 0, 2)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.jsonl", "shard-000000.tar", "shard-000001.tar"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old folders left behind
    assert format_summary(s).startswith(f"packed {demo_src / 'val.jsonl'} -> {out}: read 64, wrote 64 in 2 shard(s), rejected 0 in ")


# --- pack: rejects ---------------------------------------------------------------------------------


def test_each_reject_reason(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "not_an_image.png").write_bytes(b"this is text")
    good = _png(tmp_path / "b.png", size=(64, 64)).read_bytes()
    _png(tmp_path / "sliver.png", size=(402, 2))  # wider than Qwen's 200:1 limit
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    src = _jsonl(tmp_path / "bad.jsonl", [
        _qa(id="ok"),                                              # 0 written
        _qa(images=["missing.png"]),                               # 1
        _qa(images=["not_an_image.png"]),                          # 2
        _qa(images=["truncated.png"]),                             # 3
        _qa(q="<image><image>Two?"),                               # 4
        _qa(q="No tag?"),                                          # 5
        {"messages": [{"role": "user", "content": "<image>Q"}], "images": ["a.png"]},  # 6
        _qa(a="  "),                                               # 7
        '{"messages": [',                                          # 8
        _qa(id="ok"),                                              # 9
        {"messages": [{"role": "bot", "content": "x"}], "images": []},  # 10
        [1, 2],                                                    # 11
        _qa(id="ok2", images=["a.png"]),                           # 12 written
        _qa(images=["sliver.png"]),                                # 13
    ])
    s = pack(src, tmp_path / "out", shard_size=10)
    rejects = [json.loads(line) for line in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["index"], r["reason"]) for r in rejects] == [
        ("bad.jsonl", 1, "image_missing"),
        ("bad.jsonl", 2, "image_unreadable"),
        ("bad.jsonl", 3, "image_unreadable"),
        ("bad.jsonl", 4, "image_count_mismatch"),
        ("bad.jsonl", 5, "image_count_mismatch"),
        ("bad.jsonl", 6, "no_assistant"),
        ("bad.jsonl", 7, "empty_answer"),
        ("bad.jsonl", 8, "invalid_json"),
        ("bad.jsonl", 9, "duplicate_key"),
        ("bad.jsonl", 10, "bad_record"),
        ("bad.jsonl", 11, "bad_record"),
        ("bad.jsonl", 13, "bad_aspect_ratio"),
    ]
    details = [r["detail"] for r in rejects]
    assert str(tmp_path / "missing.png") in details[0]
    assert details[3] == "2 <image> tag(s) but 1 image(s); make them match"
    assert details[7].startswith("line 9: ")
    assert "'ok' already used by record 0" in details[8]
    assert (s.read, s.written, s.rejected, s.shards) == (14, 2, 12, 1)
    assert s.rejects_by_reason == {"bad_aspect_ratio": 1, "bad_record": 2, "duplicate_key": 1, "empty_answer": 1, "image_count_mismatch": 2,
                                   "image_missing": 1, "image_unreadable": 2, "invalid_json": 1, "no_assistant": 1}
    m = read_manifest(tmp_path / "out")
    assert (m["read"], m["samples"], m["rejected"], m["rejects_by_reason"]) == (14, 2, 12, s.rejects_by_reason)
    got = list(wds.WebDataset(shard_paths(tmp_path / "out"), shardshuffle=False, empty_check=False))
    assert [g["__key__"] for g in got] == ["ok", "ok2"]
    assert "rejected 12 (bad_aspect_ratio 1, bad_record 2, duplicate_key 1," in format_summary(s)


def test_keys_are_sanitised_and_default_to_stem_index(tmp_path):
    _png(tmp_path / "a.png")
    src = _jsonl(tmp_path / "my.data.jsonl", [_qa(id="a.b/c d"), _qa(), _qa(id=7), _qa(id="x" * 200)])
    pack(src, tmp_path / "out")
    got = list(wds.WebDataset(shard_paths(tmp_path / "out"), shardshuffle=False, empty_check=False))
    # Dots would make webdataset split one sample into several: none may survive.
    assert [g["__key__"] for g in got] == ["a_b_c_d", "my_data-00000001", "7", sample_key({"id": "x" * 200}, "", 0)]
    assert len(got[3]["__key__"]) == 80 and all("0.png" in g for g in got)


def test_image_extension_from_file_not_reencoded(tmp_path):
    Image.new("RGB", (10, 7), (0, 9, 9)).save(tmp_path / "p.JPEG")
    _png(tmp_path / "noext")
    src = _jsonl(tmp_path / "d.jsonl", [_qa(q="<image><image>?", images=["p.JPEG", "noext"], id="s")])
    pack(src, tmp_path / "out")
    (g,) = wds.WebDataset(shard_paths(tmp_path / "out"), shardshuffle=False, empty_check=False)
    assert g["0.jpg"] == (tmp_path / "p.JPEG").read_bytes() and g["1.png"] == (tmp_path / "noext").read_bytes()
    assert json.loads(g["json"])["images"] == [{"width": 10, "height": 7}, {"width": 8, "height": 6}]


# --- pack: errors and crash safety ------------------------------------------------------------------


def test_user_errors_are_one_line_and_name_the_path(tmp_path):
    with pytest.raises(VloraError, match=f"{tmp_path / 'nope.jsonl'}: annotation file not found") as e:
        pack(tmp_path / "nope.jsonl", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(VloraError, match=f"{tmp_path / 'missing'}: shard folder not found"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(VloraError, match=f"{tmp_path / 'plain'}: no manifest.json"):
        shard_paths(tmp_path / "plain")
    (tmp_path / "plain" / "keep.txt").write_text("user data")
    _png(tmp_path / "a.png")
    src = _jsonl(tmp_path / "d.jsonl", [_qa()])
    with pytest.raises(VloraError, match="plain: exists and is not a shard folder"):
        pack(src, tmp_path / "plain")
    assert (tmp_path / "plain" / "keep.txt").read_text() == "user data"


def test_manifest_problems_are_caught(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    write_manifest(d, {"format": "vlora-shards/1", "shards": [{"name": "shard-000000.tar", "samples": 1, "bytes": 3}]})
    with pytest.raises(VloraError, match=f"{d}: shard shard-000000.tar listed in manifest.json is missing"):
        read_manifest(d)
    (d / "shard-000000.tar").write_bytes(b"ab")
    with pytest.raises(VloraError, match="has 2 bytes, manifest.json says 3"):
        read_manifest(d)
    write_manifest(d, {"format": "other/9", "shards": []})
    with pytest.raises(VloraError, match="format is 'other/9'"):
        read_manifest(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(VloraError, match="manifest.json: not valid JSON"):
        read_manifest(d)


def test_a_crash_leaves_no_shard_folder(tmp_path, monkeypatch):
    _png(tmp_path / "a.png")
    src = _jsonl(tmp_path / "d.jsonl", [_qa(id=f"s{i}") for i in range(5)])
    calls = []

    def flaky(path, i):
        calls.append(path)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real(path, i)

    real = pack_mod.read_image
    monkeypatch.setattr(pack_mod, "read_image", flaky)
    with pytest.raises(RuntimeError):
        pack(src, tmp_path / "out", shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d.jsonl"]


# --- a real LLaMA-Factory file ----------------------------------------------------------------------


def test_llamafactory_mllm_demo(tmp_path):
    s = pack(MLLM_DEMO, tmp_path / "out")
    assert (s.read, s.written, s.rejected, s.shards) == (6, 6, 0, 1)
    raw = json.loads(MLLM_DEMO.read_text())
    got = list(wds.WebDataset(shard_paths(tmp_path / "out"), shardshuffle=False, empty_check=False))
    assert [g["__key__"] for g in got] == [f"mllm_demo-{i:08d}" for i in range(6)]
    images = [(g, k) for g in got for k in g if k.endswith(".jpg")]
    assert len(images) == 8
    for g, r in zip(got, raw):
        assert [g[f"{i}.jpg"] for i in range(len(r["images"]))] == [(MLLM_DEMO.parent / p).read_bytes() for p in r["images"]]
        meta = json.loads(g["json"])
        assert len(meta["images"]) == len(r["images"]) and all(im["width"] > 0 for im in meta["images"])
        assert [m["role"] for m in meta["messages"]] == [m["role"] for m in r["messages"]]
    assert json.loads(got[0]["json"])["messages"][2]["content"] == [{"type": "text", "text": "What are they doing?"}, {"type": "image"}]
