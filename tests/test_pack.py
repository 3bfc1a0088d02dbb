"""pack -> shards + manifest + rejects, checked byte for byte: rejects, balance, folders, workers, tokens, CLI.
(Formats -> canonical samples are in test_formats.py.)"""

import base64
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from helpers import REPO
from vlora.data import pack as pack_mod
from vlora.data.formats import RecordError, load_samples
from vlora.data.manifest import read_manifest, shard_paths, write_manifest
from vlora.data.pack import TokenCounter, format_summary, pack, sample_key
from vlora.errors import VloraError

# LLaMA-Factory's demo files, in ../shared beside the checkout (not part of the repository).
PEERS = REPO.parent / "shared" / "peers" / "llamafactory_mllm_demo"
MLLM_DEMO = PEERS / "mllm_demo.json"
V1_DEMO = PEERS / "v1_multimodal_demo.jsonl"
needs_peers = pytest.mark.skipif(not PEERS.is_dir(), reason=f"{PEERS} is absent (../shared/peers is not beside this checkout)")


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


def _read(out: Path) -> list[dict]:
    return list(wds.WebDataset(shard_paths(out), shardshuffle=False, empty_check=False))


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --- pack: the demo shards --------------------------------------------------------------------------


def test_demo_manifest_matches_files(demo_src, demo_shards):
    for split, n, n_shards in (("train", 256, 8), ("val", 64, 2)):
        d = demo_shards / split
        m = read_manifest(d)
        kinds = [json.loads(line)["meta"]["kind"] for line in (demo_src / f"{split}.jsonl").read_text().splitlines()]
        assert m["tasks"] == {k: kinds.count(k) for k in sorted(set(kinds))} and sum(m["tasks"].values()) == n
        assert list(m["tasks"]) == ["caption", "colour", "count", "position", "shape"]
        assert (m["format"], m["read"], m["samples"], m["rejected"], m["rejects_by_reason"]) == ("vlora-shards/1", n, n, 0, {})
        assert m["read"] == m["samples"] + m["rejected"]
        assert [s["name"] for s in m["shards"]] == [f"shard-{i:06d}.tar" for i in range(n_shards)]
        assert [s["samples"] for s in m["shards"]] == [32] * n_shards
        for s in m["shards"]:
            assert s["sha256"] == _sha(d / s["name"]) and s["bytes"] == (d / s["name"]).stat().st_size
        assert m["sources"] == [{"file": f"{split}.jsonl", "format": "sharegpt", "records": n, "paths_resolved_by_suffix": 0,
                                 "sha256": m["sources"][0]["sha256"]}]
        assert (m["paths_resolved_by_suffix"], m["checks"]) == (0, {"max_image_pixels": 89_478_485, "max_image_bytes": 64 << 20,
                                                                  "confine": False, "max_aspect_ratio": 200,
                                                                  "min_pixels": 3136, "max_pixels": 200704,
                                                                  "max_pixels_floor": {"28": 28 * 28 + 1, "32": 32 * 32 + 1}})  # 112x112
        assert m["skipped"] == []
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
        assert meta == {"messages": c["messages"], "source": {"file": "train.jsonl", "index": i, "line": i + 1},
                        "images": [{"width": 112, "height": 112}], "task": r["meta"]["kind"]}
        assert meta["task"] == c["task"] == r["task"]


def test_repack_is_byte_identical_for_any_workers(demo_src, demo_shards, tmp_path):
    pack(demo_src / "val.jsonl", tmp_path / "a", shard_size=32)
    pack(demo_src / "val.jsonl", tmp_path / "b", shard_size=32, workers=2)
    pack(demo_src / "val.jsonl", tmp_path / "c", shard_size=32, workers=3)
    expected = _files(demo_shards / "val")
    assert list(expected) == ["manifest.json", "rejects.jsonl", "shard-000000.tar", "shard-000001.tar"]
    assert _files(tmp_path / "a") == _files(tmp_path / "b") == _files(tmp_path / "c") == expected


def test_pack_replaces_an_earlier_pack_in_place(demo_src, tmp_path):
    out = tmp_path / "out"
    pack(demo_src / "val.jsonl", out, shard_size=16)
    s = pack(demo_src / "val.jsonl", out, shard_size=40)
    assert (s.read, s.written, s.rejected, s.shards) == (64, 64, 0, 2)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.jsonl", "shard-000000.tar", "shard-000001.tar"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old folders left behind
    assert format_summary(s).startswith(f"packed {demo_src / 'val.jsonl'} -> {out}: read 64, wrote 64 in 2 shard(s), rejected 0, last shard 24 of 40 samples in ")


# --- pack: rejects ---------------------------------------------------------------------------------


def test_each_reject_reason_and_the_balance(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "not_an_image.png").write_bytes(b"this is text")
    good = _png(tmp_path / "b.png", size=(64, 64)).read_bytes()
    _png(tmp_path / "sliver.png", size=(402, 2))  # wider than Qwen's 200:1 limit
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    _png(tmp_path / "big.png", size=(80, 80))  # 6400 pixels: over the limit (PIL would only warn)
    _png(tmp_path / "bomb.png", size=(120, 120))  # 14400: over twice the limit (PIL's DecompressionBombError)
    inline = base64.b64encode(good).decode()
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
        _qa(images=["https://example.com/cat.jpg"]),               # 14
        _qa(images=["big.png"]),                                   # 15
        _qa(images=["bomb.png"]),                                  # 16
        '"INVALID_UTF8"',                                          # 17 (bytes patched below)
        _qa(id="inline", images=[f"data:image/png;base64,{inline}"]),  # 18 written, decoded
        _qa(images=["data:image/png;base64,%%%"]),                 # 19
    ])
    src.write_bytes(src.read_bytes().replace(b'"INVALID_UTF8"', b'{"messages": "caf\xe9"}'))
    s = pack(src, tmp_path / "out", shard_size=10, max_image_pixels=5000)
    rejects = _rejects(tmp_path / "out")
    assert [(r["source"], r["index"], r["line"], r["reason"]) for r in rejects] == [
        ("bad.jsonl", i, i + 1, reason) for i, reason in [
            (1, "image_missing"), (2, "image_unreadable"), (3, "image_unreadable"), (4, "image_count_mismatch"),
            (5, "image_count_mismatch"), (6, "no_assistant"), (7, "empty_answer"), (8, "invalid_json"), (9, "duplicate_key"),
            (10, "bad_record"), (11, "bad_record"), (13, "bad_aspect_ratio"), (14, "remote_image"), (15, "image_too_large"),
            (16, "image_too_large"), (17, "invalid_utf8"), (19, "image_unreadable")]
    ]
    details = [r["detail"] for r in rejects]
    assert str(tmp_path / "missing.png") in details[0]
    assert details[3] == "2 <image> tag(s) but 1 image(s); make them match"
    assert details[7].startswith("line 9: ")
    assert "'ok' already used by bad.jsonl record 0" in details[8]
    assert details[12].startswith("https://example.com/cat.jpg: remote images are not downloaded")
    assert "Image size (6400 pixels) exceeds limit of 5000 pixels" in details[13] and str(tmp_path / "big.png") in details[13]
    assert "Image size (14400 pixels) exceeds limit of 10000 pixels" in details[14]
    assert details[15] == "line 18: byte 0xe9 at column 18 is not valid UTF-8; re-save the file as UTF-8"
    assert details[16].startswith("image 0 data:image/png;base64: ")
    assert (s.read, s.written, s.rejected, s.shards) == (20, 3, 17, 1) and s.read == s.written + s.rejected
    assert s.rejects_by_reason == {"bad_aspect_ratio": 1, "bad_record": 2, "duplicate_key": 1, "empty_answer": 1, "image_count_mismatch": 2,
                                   "image_missing": 1, "image_too_large": 2, "image_unreadable": 3, "invalid_json": 1, "invalid_utf8": 1,
                                   "no_assistant": 1, "remote_image": 1}
    assert sum(s.rejects_by_reason.values()) == s.rejected
    assert s.first_rejects == rejects[:3]
    m = read_manifest(tmp_path / "out")
    assert (m["read"], m["samples"], m["rejected"], m["rejects_by_reason"]) == (20, 3, 17, s.rejects_by_reason)
    assert m["checks"]["max_image_pixels"] == 5000
    got = _read(tmp_path / "out")
    assert [g["__key__"] for g in got] == ["ok", "ok2", "inline"]
    assert got[2]["0.png"] == good  # the data: URI's bytes, as they were
    assert "rejected 17 (bad_aspect_ratio 1, bad_record 2, duplicate_key 1," in format_summary(s)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's global is left as it was


# --- pack: task labels ------------------------------------------------------------------------------


def test_tasks_are_packed_counted_and_bad_ones_rejected(tmp_path):
    _png(tmp_path / "a.png")
    src = _jsonl(tmp_path / "t.jsonl", [
        _qa(id="cap", task="caption"),             # 0 written, task caption
        _qa(id="plain"),                           # 1 written, no task
        _qa(id="vqa", task="vqa"),                 # 2 written, task vqa
        _qa(id="null", task=None),                 # 3 written, no task ("task": null is none)
        _qa(task=7),                               # 4 bad_task: not a string
        _qa(task=""),                              # 5 bad_task: empty
        _qa(task="x" * 65),                        # 6 bad_task: too long
        _qa(task="vqa\n"),                         # 7 bad_task: a control character
        _qa(task=["vqa"]),                         # 8 bad_task: not a string
        _qa(id="cap2", task="caption"),            # 9 written, task caption
        _qa(task="vqa", images=["missing.png"]),   # 10 image_missing: a good task does not save a bad record
        _qa(id="long", task="y" * 64),             # 11 written: 64 characters is the limit
    ])
    s = pack(src, tmp_path / "out", shard_size=4, workers=2)
    assert (s.read, s.written, s.rejected) == (12, 6, 6) and s.read == s.written + s.rejected
    assert s.rejects_by_reason == {"bad_task": 5, "image_missing": 1}
    rejects = _rejects(tmp_path / "out")
    assert [(r["index"], r["reason"]) for r in rejects] == [(4, "bad_task"), (5, "bad_task"), (6, "bad_task"), (7, "bad_task"),
                                                           (8, "bad_task"), (10, "image_missing")]
    assert rejects[0]["detail"] == "'task' must be a string, got a JSON int"
    assert "control character '\\n'" in rejects[3]["detail"]
    got = {g["__key__"]: json.loads(g["json"]) for g in _read(tmp_path / "out")}
    assert {k: m.get("task") for k, m in got.items()} == {"cap": "caption", "plain": None, "vqa": "vqa", "null": None,
                                                           "cap2": "caption", "long": "y" * 64}
    assert "task" not in got["plain"] and "task" not in got["null"]  # absent, not null
    assert set(got["plain"]) == {"messages", "source", "images"} and set(got["cap"]) == {"messages", "source", "images", "task"}
    m = read_manifest(tmp_path / "out")
    assert m["tasks"] == s.tasks == {"caption": 2, "vqa": 1, "y" * 64: 1}  # written samples only, sorted
    assert (m["read"], m["samples"], m["rejected"], m["rejects_by_reason"]) == (12, 6, 6, s.rejects_by_reason)


# Hashes of a task-free pack, computed with the packer as it was before "task" labels existed. The 8x6 red PNG's
# bytes are fixed here (not encoded by this PIL); the tar layout is webdataset's TarWriter with fixed metadata.
RED_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAGCAIAAABxZ0isAAAAEklEQVR4nGP8z4AdMOEQp4sEAJiFAQtsMIKbAAAAAElFTkSuQmCC")
TASKLESS_SHA256 = {"shard-000000.tar": "b3d9efa1de7516fb1118bb5659d42f77f273ed7659062130d49a6c4b83ba7e29",
                   "rejects.jsonl": "b15f6cb786410c2a475db944cb9f641e0c515d54ed435a3cc6dd8d1fd243dfd3"}


def test_data_without_tasks_packs_byte_identically_to_before_tasks(tmp_path):
    (tmp_path / "a.png").write_bytes(RED_PNG)
    src = _jsonl(tmp_path / "plain.jsonl", [
        _qa(q="<image>What colour?", a="Red.", id="one"),
        {**_qa(q="<image>Shape?", a="A rectangle."), "system": "Be brief.", "meta": {"kind": "shape"}},
        _qa(a="  "),
    ])
    s = pack(src, tmp_path / "out", shard_size=10)
    assert (s.read, s.written, s.rejected, s.tasks) == (3, 2, 1, {})
    assert {name: _sha(tmp_path / "out" / name) for name in TASKLESS_SHA256} == TASKLESS_SHA256
    m = read_manifest(tmp_path / "out")
    assert "tasks" not in m and m["shards"][0]["sha256"] == TASKLESS_SHA256["shard-000000.tar"]


def test_demo_data_without_its_tasks_packs_as_before(demo_src, demo_shards, tmp_path):
    """The demo val split with "task" removed: the same shards but for KEY.json's "task", which alone differs."""
    records = [json.loads(line) for line in (demo_src / "val.jsonl").read_text().splitlines()]
    assert all(r["task"] == r["meta"]["kind"] for r in records)
    (tmp_path / "images").symlink_to((demo_src / "images").absolute())
    _jsonl(tmp_path / "val.jsonl", [{k: v for k, v in r.items() if k != "task"} for r in records])
    s = pack(tmp_path / "val.jsonl", tmp_path / "out", shard_size=32)
    assert (s.read, s.written, s.tasks) == (64, 64, {})
    assert "tasks" not in read_manifest(tmp_path / "out") and "tasks" in read_manifest(demo_shards / "val")
    plain, tasked = _read(tmp_path / "out"), _read(demo_shards / "val")
    assert [g["__key__"] for g in plain] == [g["__key__"] for g in tasked] == [r["id"] for r in records]
    for p, t, r in zip(plain, tasked, records):
        assert p["0.png"] == t["0.png"]
        meta = json.loads(t["json"])
        assert meta.pop("task") == r["meta"]["kind"]
        assert p["json"] == json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


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


# --- pack: paths that are not image files, and --confine ---------------------------------------------


def _child_pack_logging_opens(log: Path, result: Path, argv: list[str]) -> None:
    """`vlora pack ARGV` in a forked child (modules already imported) that logs "PID PATH" for every open: its own
    and its workers' (forked again, they keep the audit hook; the pytest process never has it). builtins.open,
    io.open, os.open, Path.open / read_bytes and PIL.Image.open all raise the "open" audit event, so nothing the
    packer might use to read escapes the log; os.stat raises none."""
    from vlora.cli import main

    os.setpgid(0, 0)  # a process group of its own, workers included, to kill on a hang
    # A memory limit turns an endless read (of /dev/zero) into a quick failure rather than a swamped machine.
    data = int(re.search(r"VmData:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) << 10
    resource.setrlimit(resource.RLIMIT_DATA, (data + (2 << 30), resource.getrlimit(resource.RLIMIT_DATA)[1]))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            os.write(fd, b"%d %s\n" % (os.getpid(), os.fsencode(args[0])))

    out, err = io.StringIO(), io.StringIO()
    sys.addaudithook(hook)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["pack", *argv])
    result.write_text(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}))


def _pack_watched(tmp_path: Path, *args) -> tuple[dict, dict[str, set[int]]]:
    """({"rc", "stdout", "stderr"} of `vlora pack ARGS`, {real path opened: pids that opened it}). The 60 s timeout
    only catches a hang (open() of a FIFO waits for a writer); it times nothing."""
    log, result = tmp_path / "opened.log", tmp_path / "result.json"
    child = multiprocessing.get_context("fork").Process(target=_child_pack_logging_opens, args=(log, result, list(map(str, args))))
    child.start()
    child.join(60)
    if child.is_alive():
        os.killpg(child.pid, signal.SIGKILL)  # the workers too: one may sit in open() of the FIFO
        child.join()
        pytest.fail(f"vlora pack {' '.join(map(str, args))} still running after 60 s: blocked on a FIFO or reading an endless file?")
    assert child.exitcode == 0 and result.is_file(), f"vlora pack crashed (exit code {child.exitcode}); its traceback is above"
    opened = {}
    for line in log.read_text(errors="replace").splitlines():
        pid, path = line.split(" ", 1)
        opened.setdefault(os.path.realpath(path), set()).add(int(pid))
    return json.loads(result.read_text()), opened


@pytest.mark.parametrize("workers", [1, 2])
def test_only_regular_files_are_opened_as_images(tmp_path, workers):
    """An annotation may name any path: a FIFO would block open() for ever and /dev/zero never ends. Only regular
    files of at most --max-image-bytes are opened; the rest are rejected by name, unopened, and the counts balance."""
    d = tmp_path / "data"
    ok = _png(d / "ok.png")
    cap = ok.stat().st_size  # a file of exactly the limit is read, one byte more is not
    (d / "big.png").write_bytes(ok.read_bytes() + b"\0")
    os.mkfifo(d / "pipe.png")
    (d / "folder.png").mkdir()
    (d / "zero.png").symlink_to("/dev/zero")  # stat follows the link, as open would
    inline = "data:image/png;base64," + base64.b64encode((d / "big.png").read_bytes()).decode()
    src = _jsonl(d / "d.jsonl", [_qa(id="ok", images=["ok.png"]), _qa(images=["/dev/zero"]), _qa(images=["pipe.png"]),
                                 _qa(images=["folder.png"]), _qa(images=["zero.png"]), _qa(images=["big.png"]), _qa(images=[inline])])
    out = tmp_path / "out"
    res, opened = _pack_watched(tmp_path, "--src", src, "--out", out, "--workers", workers, "--max-image-bytes", cap, "--max-reject", 1)
    assert res["rc"] == 0, res["stderr"]
    over = f"{cap + 1} bytes, over --max-image-bytes {cap}; raise the limit or re-encode the image smaller"
    assert [(r["source"], r["index"], r["line"], r["reason"], r["detail"]) for r in _rejects(out)] == [
        ("d.jsonl", 1, 2, "image_not_a_file", "image 0 /dev/zero: a character device, not a regular file"),
        ("d.jsonl", 2, 3, "image_not_a_file", f"image 0 {d / 'pipe.png'}: a FIFO, not a regular file"),
        ("d.jsonl", 3, 4, "image_not_a_file", f"image 0 {d / 'folder.png'}: a directory, not a regular file"),
        ("d.jsonl", 4, 5, "image_not_a_file", f"image 0 {d / 'zero.png'}: a character device, not a regular file"),
        ("d.jsonl", 5, 6, "image_too_large", f"image 0 {d / 'big.png'}: {over}"),
        ("d.jsonl", 6, 7, "image_too_large", f"image 0 data:image/png;base64: {over}"),  # the same limit for data: URIs
    ]
    assert "read 7, wrote 1 in 1 shard(s), rejected 6 (image_not_a_file 4, image_too_large 2; see " in res["stdout"]
    m = read_manifest(out)
    assert (m["read"], m["samples"], m["rejected"], m["rejects_by_reason"]) == (7, 1, 6, {"image_not_a_file": 4, "image_too_large": 2})
    assert m["checks"]["max_image_bytes"] == cap and m["checks"]["confine"] is False
    ((g,),) = [_read(out)]
    assert (g["__key__"], g["0.png"]) == ("ok", ok.read_bytes())
    # The spy sees the reads (in a worker and again in the main process with --workers 2) ...
    assert len(opened[str(ok.resolve())]) == workers
    # ... and none of the bad paths was opened by any process.
    bad = {"/dev/zero", *(os.path.realpath(d / n) for n in ("pipe.png", "folder.png", "zero.png", "big.png"))}
    assert sorted(bad & set(opened)) == []


def test_confine_rejects_images_outside_the_roots_unopened(tmp_path):
    """--confine, for annotation files from elsewhere: an image that resolves (symlinks and `..` followed) outside
    --image-root and the annotation file's folder is rejected unopened, and no fallback looks in other folders."""
    tmp_path = Path(os.path.realpath(tmp_path))  # the rejects name real paths
    d, imgs, outside = tmp_path / "data", tmp_path / "imgs", tmp_path / "outside"
    _png(d / "in.png")
    _png(d / "sub/deep.png")
    _png(imgs / "r.png", colour=(0, 255, 0))
    secret = _png(outside / "secret.png", colour=(0, 0, 255))
    (d / "escape.png").symlink_to(secret)
    (d / "alias.png").symlink_to(d / "in.png")
    src = _jsonl(d / "d.jsonl", [
        _qa(id="in", images=["in.png"]),                     # 0 written
        _qa(id="root", images=["r.png"]),                    # 1 written, from --image-root
        _qa(id="alias", images=["alias.png"]),               # 2 written: a symlink that stays inside
        _qa(id="escape", images=["escape.png"]),             # 3 a symlink out of the folder
        _qa(id="abs", images=[str(secret)]),                 # 4 an absolute path elsewhere
        _qa(id="dotdot", images=["../outside/secret.png"]),  # 5
        _qa(id="parent", images=["outside/secret.png"]),     # 6 found in the parent folder, without --confine
        _qa(id="shorter", images=["x/sub/deep.png"]),        # 7 found by dropping x/, without --confine
    ])
    free = pack(src, tmp_path / "free", image_root=imgs)
    assert (free.written, free.rejected, free.paths_resolved_by_suffix) == (8, 0, 2)
    out = tmp_path / "out"
    res, opened = _pack_watched(tmp_path, "--src", src, "--out", out, "--image-root", imgs, "--confine", "--workers", 2, "--max-reject", 1)
    assert res["rc"] == 0, res["stderr"]
    roots = f"outside {imgs} and {d}; --confine reads images under --image-root and the annotation file's folder only"
    assert [(r["source"], r["index"], r["reason"], r["detail"]) for r in _rejects(out)] == [
        ("d.jsonl", 3, "image_outside_root", f"escape.png: resolves to {secret}, {roots}"),
        ("d.jsonl", 4, "image_outside_root", f"{secret}: {roots}"),
        ("d.jsonl", 5, "image_outside_root", f"../outside/secret.png: resolves to {secret}, {roots}"),
        ("d.jsonl", 6, "image_missing", f"image 0 not found: {imgs / 'outside/secret.png'}"),  # as written: no fallback
        ("d.jsonl", 7, "image_missing", f"image 0 not found: {imgs / 'x/sub/deep.png'}"),
    ]
    assert "read 8, wrote 3 in 1 shard(s), rejected 5 (image_missing 2, image_outside_root 3; see " in res["stdout"]
    assert "resolved by fallback" not in res["stdout"]
    m = read_manifest(out)
    assert (m["read"], m["samples"], m["rejected"], m["paths_resolved_by_suffix"]) == (8, 3, 5, 0)
    assert m["rejects_by_reason"] == {"image_missing": 2, "image_outside_root": 3} and m["checks"]["confine"] is True
    assert [g["__key__"] for g in _read(out)] == ["in", "root", "alias"]
    assert str(d / "in.png") in opened and sorted({str(secret)} & set(opened)) == []


def test_a_file_changed_after_its_stat_is_still_capped_and_never_blocks(tmp_path, monkeypatch):
    """Between the size check and the read a file may grow, or be swapped for a FIFO: the read still stops one
    byte over the limit, and the FIFO is opened without waiting for a writer and refused."""
    grown = tmp_path / "grown.png"
    grown.write_bytes(b"x" * 100)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    real_stat = os.stat

    def stale_stat(path, *args, **kw):  # what the stat said a moment earlier: a regular file of 10 bytes
        st = real_stat(path, *args, **kw)
        return os.stat_result((stat.S_IFREG | 0o644, *st[1:6], 10, *st[7:10]))

    monkeypatch.setattr(pack_mod.os, "stat", stale_stat)
    with pytest.raises(RecordError) as e:
        pack_mod._file_bytes(grown, 0, 50)
    assert (e.value.reason, e.value.detail) == ("image_too_large", f"image 0 {grown}: grew while read, over --max-image-bytes 50; "
                                                                   "raise the limit or re-encode the image smaller")
    assert pack_mod._file_bytes(grown, 0, 200) == b"x" * 100  # grown, but within the limit: read whole
    result = []

    def read_fifo():
        try:
            result.append(pack_mod._file_bytes(fifo, 0, 50))
        except RecordError as e:
            result.append(e)

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():  # blocked in open(): a writer releases it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"reading {fifo} blocked")
    monkeypatch.undo()
    assert [(e.reason, e.detail) for e in result] == [("image_not_a_file", f"image 0 {fifo}: a FIFO, not a regular file")]
    with pytest.raises(VloraError, match="max_image_bytes must be at least 1, got 1000, 1, 89478485, 0"):
        pack(tmp_path / "d.jsonl", tmp_path / "out", max_image_bytes=0)


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


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crash_leaves_no_shard_folder(tmp_path, monkeypatch, workers):
    _png(tmp_path / "a.png")
    src = _jsonl(tmp_path / "d.jsonl", [_qa(id=f"s{i}") for i in range(5)])
    calls = []

    def flaky(path, i, *limits):
        calls.append(path)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real(path, i, *limits)

    real = pack_mod.read_image
    monkeypatch.setattr(pack_mod, "read_image", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):  # raised in a worker process, re-raised here
        pack(src, tmp_path / "out", shard_size=2, workers=workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d.jsonl"]


# --- folders ----------------------------------------------------------------------------------------


def test_a_folder_packs_every_annotation_file_in_order(tmp_path):
    d = tmp_path / "data"
    _png(d / "imgs/a.png")
    _png(d / "sub/b.png", colour=(0, 0, 255))
    _jsonl(d / "sub/qa.jsonl", [_qa(id="0", images=["b.png"]), _qa(id="1", images=["missing.png"])])
    (d / "llava.json").write_text(json.dumps([{"id": "0", "image": "imgs/a.png",
                                               "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "Red."}]}]))
    _jsonl(d / "caps.jsonl", [{"image_path": "imgs/a.png", "text": "A red square."}])
    (d / ".hidden").mkdir()
    _jsonl(d / ".hidden/skip.jsonl", ["not even json"])
    (d / "notes.txt").write_text("not an annotation file")
    out = d / "shards"  # inside the source folder: its manifest.json must not be read back as annotations
    for _ in range(2):
        s = pack(d, out)
        assert (s.read, s.written, s.rejected) == (4, 3, 1)
    m = read_manifest(out)
    assert [(x["file"], x["format"], x["records"]) for x in m["sources"]] == [
        ("caps.jsonl", "caption", 1), ("llava.json", "llava", 1), ("sub/qa.jsonl", "sharegpt", 2)]
    # Ids are scoped by file in a folder: both files' "0" survive.
    assert [g["__key__"] for g in _read(out)] == ["caps-00000000", "llava_0", "sub_qa_0"]
    assert [json.loads(g["json"])["source"] for g in _read(out)] == [
        {"file": "caps.jsonl", "index": 0, "line": 1}, {"file": "llava.json", "index": 0}, {"file": "sub/qa.jsonl", "index": 0, "line": 1}]
    assert [(r["source"], r["line"], r["reason"]) for r in _rejects(out)] == [("sub/qa.jsonl", 2, "image_missing")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(VloraError, match="empty: no .json or .jsonl annotation files"):
        pack(tmp_path / "empty", tmp_path / "out")


def test_a_folder_skips_unknown_json_files_and_old_shard_folders(tmp_path, monkeypatch):
    """LLaMA-Factory's data/ holds dataset_info.json beside the annotations, and a folder may hold an earlier pack:
    both are skipped and listed, not an abort; the annotation files are opened one at a time."""
    d = tmp_path / "data"
    _png(d / "a.png")
    _jsonl(d / "a.jsonl", [_qa(id="0")])
    (d / "dataset_info.json").write_text(json.dumps({"mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt"}}, indent=2))
    (d / "b.json").write_text(json.dumps([_qa(id="0")]))
    pack(d / "a.jsonl", d / "old" / "shards")  # an earlier pack inside the folder: manifest.json + rejects.jsonl
    events = []
    real = pack_mod.read_annotations

    def spy(path, **kw):
        events.append(("open", Path(path).name))
        source = real(path, **kw)
        source.records = ((events.append(("record", Path(path).name)), r)[1] for r in source.records)
        return source

    monkeypatch.setattr(pack_mod, "read_annotations", spy)
    s = pack(d, tmp_path / "out")
    assert (s.read, s.written, s.rejected) == (2, 2, 0)
    assert s.skipped == ["old/shards/ (shard folder)", "dataset_info.json (no known annotation format)"]
    assert read_manifest(tmp_path / "out")["skipped"] == s.skipped
    assert [x["file"] for x in read_manifest(tmp_path / "out")["sources"]] == ["a.jsonl", "b.json"]
    assert ", skipped 2 (old/shards/ (shard folder); dataset_info.json (no known annotation format))" in format_summary(s)
    # a.jsonl is read to its end before the next file is opened
    assert events == [("open", "a.jsonl"), ("record", "a.jsonl"), ("open", "b.json"), ("record", "b.json"), ("open", "dataset_info.json")]
    # A .jsonl that matches no format is meant as data: still an error. So is a folder of unknown files only.
    _jsonl(d / "c.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(VloraError, match="c.jsonl: matches no known format"):
        pack(d, tmp_path / "out2")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "dataset_info.json").write_text("{}")
    with pytest.raises(VloraError, match=r"only: no annotation file in this folder matches a known format \(skipped dataset_info.json"):
        pack(tmp_path / "only", tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


@pytest.mark.parametrize("inside", ["src_file", "src_folder", "src_is_out", "image_root"])
def test_inputs_inside_the_output_folder_are_refused(tmp_path, inside):
    """Packing replaces the output folder wholesale: an input inside it would be deleted with the old pack."""
    out = tmp_path / "out"
    _png(out / "imgs/a.png")
    src = _jsonl(out / "d.jsonl", [_qa(images=["imgs/a.png"])])
    write_manifest(out, {"format": "vlora-shards/1", "shards": []})  # an earlier shard folder, as pack would accept
    args = {"src_file": (src, {}), "src_folder": (out / "imgs", {}), "src_is_out": (out, {}),
            "image_root": (_jsonl(tmp_path / "e.jsonl", [_qa()]), {"image_root": out / "imgs"})}[inside]
    with pytest.raises(VloraError, match=r"lies inside the output folder .*/out, which packing replaces") as e:
        pack(args[0], out, **args[1])
    assert "\n" not in str(e.value)
    assert (out / "d.jsonl").is_file() and (out / "imgs/a.png").is_file()


@pytest.mark.parametrize("token", ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>",
                                   "<|vision_start|>", "<|vision_end|>"])
def test_special_tokens_in_text_are_rejected(tmp_path, token):
    _png(tmp_path / "a.png")
    src = _jsonl(tmp_path / "d.jsonl", [_qa(id="ok"), _qa(a=f"A {token} B"), _qa(q=f"<image>Q {token}?"),
                                        {"system": f"Sys {token}", **_qa()},
                                        _qa(q="<|vision_start|>a.png<|vision_end|>Q?", images=())])  # a placeholder: fine
    s = pack(src, tmp_path / "out")
    assert (s.written, s.rejects_by_reason) == (2, {"special_token": 3})
    assert [(r["index"], r["detail"]) for r in _rejects(tmp_path / "out")] == [
        (i, f"message {j} ({role}) holds Qwen's special token {token}, which would cut the turn or its image tokens short; "
            "remove it or spell it differently") for i, j, role in [(1, 1, "assistant"), (2, 0, "user"), (3, 0, "system")]]


def test_summary_names_a_short_last_shard(demo_src, tmp_path):
    s = pack(demo_src / "val.jsonl", tmp_path / "out", shard_size=24)  # 64 = 24 + 24 + 16
    assert (s.shards, s.last_shard) == (3, 16)
    assert "wrote 64 in 3 shard(s), rejected 0, last shard 16 of 24 samples in " in format_summary(s)
    even = pack(demo_src / "val.jsonl", tmp_path / "even", shard_size=16)
    assert "last shard" not in format_summary(even)


def test_max_pixels_floor_is_where_smart_resize_starts_to_give_a_zero_side():
    from qwen_vl_utils import smart_resize

    def ok(w, h, max_pixels):
        rh, rw = smart_resize(h, w, factor=28, min_pixels=min(3136, max_pixels), max_pixels=max_pixels)
        return rh > 0 and rw > 0

    for w, h in [(6, 600), (50, 200), (112, 112), (1034, 28), (3000, 17), (199, 1), (640, 480)]:
        floor = pack_mod.max_pixels_floor({"type": "image"}, w, h)
        assert ok(w, h, floor) and all(ok(w, h, floor + k) for k in (1, 7, 1000, 10**6)), (w, h)
        assert not ok(w, h, floor - 2), (w, h)  # at most one pixel conservative (an exact boundary)
    assert pack_mod.max_pixels_floor({"type": "image"}, 6, 600) == 28 * 588  # fits unshrunk at 16464 pixels
    assert pack_mod.max_pixels_floor({"type": "image", "max_pixels": 784}, 6, 600) == 0  # its own limit, not the run's


# --- the real LLaMA-Factory files ---------------------------------------------------------------------


@needs_peers
def test_llamafactory_mllm_demo(tmp_path):
    s = pack(MLLM_DEMO, tmp_path / "out")
    assert (s.read, s.written, s.rejected, s.shards, s.paths_resolved_by_suffix) == (6, 6, 0, 1, 0)
    raw = json.loads(MLLM_DEMO.read_text())
    got = _read(tmp_path / "out")
    assert [g["__key__"] for g in got] == [f"mllm_demo-{i:08d}" for i in range(6)]
    images = [(g, k) for g in got for k in g if k.endswith(".jpg")]
    assert len(images) == 8
    for g, r in zip(got, raw):
        assert [g[f"{i}.jpg"] for i in range(len(r["images"]))] == [(MLLM_DEMO.parent / p).read_bytes() for p in r["images"]]
        meta = json.loads(g["json"])
        assert len(meta["images"]) == len(r["images"]) and all(im["width"] > 0 for im in meta["images"])
        assert [m["role"] for m in meta["messages"]] == [m["role"] for m in r["messages"]]
    assert json.loads(got[0]["json"])["messages"][2]["content"] == [{"type": "text", "text": "What are they doing?"}, {"type": "image"}]
    assert json.loads(got[0]["json"])["images"] == [{"width": 300, "height": 168}] * 2


@needs_peers
def test_llamafactory_v1_content_lists_with_repo_root_paths(tmp_path):
    """No flags, no edits: `data/mllm_demo_data/1.jpg` is found by dropping `data/` (counted and reported)."""
    s = pack(V1_DEMO, tmp_path / "v1", workers=2)
    # Upstream's v1 file is the six conversations four times over: 24 records, 32 image references.
    assert (s.read, s.written, s.rejected, s.shards, s.paths_resolved_by_suffix) == (24, 24, 0, 1, 32)
    assert "32 image path(s) resolved by fallback (ancestor folder or shorter path)" in format_summary(s)
    m = read_manifest(tmp_path / "v1")
    assert m["paths_resolved_by_suffix"] == m["sources"][0]["paths_resolved_by_suffix"] == 32
    assert m["sources"][0]["format"] == "openai"
    got = _read(tmp_path / "v1")
    assert sum(k.endswith(".jpg") for g in got for k in g) == 32
    pack(MLLM_DEMO, tmp_path / "sharegpt")
    demo = _read(tmp_path / "sharegpt")
    for i, g in enumerate(got):  # the same samples as the ShareGPT file, image bytes and messages alike
        same = demo[i % 6]
        assert {k: v for k, v in g.items() if k.endswith(".jpg")} == {k: v for k, v in same.items() if k.endswith(".jpg")}
        assert json.loads(g["json"])["messages"] == json.loads(same["json"])["messages"]


# --- token limit --------------------------------------------------------------------------------------


def test_max_tokens_counts_what_the_collator_encodes(tmp_path, tiny_model_dir):
    from transformers import AutoProcessor

    from vlora.data.collate import Collator

    _png(tmp_path / "wide.png", size=(300, 90))
    _png(tmp_path / "tall.png", size=(50, 200))
    src = _jsonl(tmp_path / "oa.jsonl", [{"id": "s", "system": "Look closely.", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "wide.png"}, {"type": "text", "text": "What colour is the circle?"},
                                     {"type": "image", "image": "tall.png", "max_pixels": 28 * 28 * 6},
                                     {"type": "image", "image": "wide.png", "resized_height": 60, "resized_width": 100}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The circle is red."}]},
        {"role": "user", "content": "And <image>?"}, {"role": "assistant", "content": "Blue."}], "images": ["tall.png"]}])
    limits = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
    pack(src, tmp_path / "all")
    (sample,) = _read(tmp_path / "all")
    meta = json.loads(sample["json"])
    collator = Collator(AutoProcessor.from_pretrained(tiny_model_dir), max_length=10**6, **limits)
    n = collator.encode(sample)["input_ids"].numel()
    counter = TokenCounter(str(tiny_model_dir), **limits)
    assert counter.count(meta["messages"], meta["images"]) == n
    assert [counter.image_tokens(e, im["width"], im["height"]) for e, im in zip(
        [p for m in meta["messages"] for p in m["content"] if p["type"] == "image"], meta["images"])] == [2 * 7, 4 * 1, 2 * 4, 7 * 2]
    s = pack(src, tmp_path / "fits", max_tokens=n, model=tiny_model_dir, **limits)
    assert (s.written, s.rejected) == (1, 0)
    assert read_manifest(tmp_path / "fits")["checks"] == {"max_image_pixels": 89_478_485, "max_image_bytes": 64 << 20,
                                                          "confine": False, "max_aspect_ratio": 200, "max_tokens": n,
                                                          "model": str(tiny_model_dir), **limits,
                                                          "max_pixels_floor": {"28": 28 * 28 * 200 // 50 + 1,  # tall.png: 50x200
                                                                               "32": 32 * 32 * 200 // 50 + 1}}
    assert TokenCounter(str(tiny_model_dir), **limits).factor == pack_mod.QWEN_FACTOR
    s = pack(src, tmp_path / "over", max_tokens=n - 1, model=tiny_model_dir, workers=2, **limits)
    assert (s.written, s.rejected, s.rejects_by_reason) == (0, 1, {"too_many_tokens": 1})
    assert _rejects(tmp_path / "over")[0]["detail"].startswith(f"{n} tokens (images at min_pixels 3136, max_pixels 12544) > --max-tokens {n - 1}")
    with pytest.raises(VloraError, match="--max-tokens needs --model"):
        pack(src, tmp_path / "x", max_tokens=10)
    # 50x200 under max_pixels 1568 resizes to zero width: the collator would crash on it mid-training.
    thin = _jsonl(tmp_path / "thin.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": "tall.png", "max_pixels": 28 * 28 * 2}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}])
    pack(thin, tmp_path / "thin")  # a check of its own, not only with --max-tokens
    assert [(r["reason"], r["detail"]) for r in _rejects(tmp_path / "thin")] == [
        ("bad_aspect_ratio", "a 50x200 image resizes to 0x56 under max_pixels 1568; raise max_pixels or crop it")]
    # The same for the run's limits: 6x600 fits 200704 pixels (the default) but not 12544.
    _png(tmp_path / "narrow.png", size=(6, 600))
    narrow = _jsonl(tmp_path / "narrow.jsonl", [_qa(images=["narrow.png"])])
    assert pack(narrow, tmp_path / "n1").written == 1
    assert pack(narrow, tmp_path / "n2", **limits).rejects_by_reason == {"bad_aspect_ratio": 1}


# --- the command line ---------------------------------------------------------------------------------


def _vlora(*args):
    return subprocess.run([sys.executable, "-m", "vlora.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_max_reject_sets_the_exit_status_and_names_the_first_rejects(tmp_path):
    _png(tmp_path / "a.png")
    src = _jsonl(tmp_path / "d.jsonl", [_qa(id="ok"), _qa(images=["gone.png"]), "{", _qa(a=""), _qa(q="?"), _qa(id="ok2")])
    proc = _vlora("pack", "--src", src, "--out", tmp_path / "out", "--workers", 2)
    assert proc.returncode == 1
    assert "read 6, wrote 2 in 1 shard(s), rejected 4 (empty_answer 1, image_count_mismatch 1, image_missing 1, invalid_json 1;" in proc.stdout
    lines = proc.stderr.splitlines()
    assert all(line.startswith("vlora: error: ") for line in lines) and len(lines) == 4
    assert lines[0] == (f"vlora: error: rejected 4 of 6 records (66.7%), more than --max-reject 0; the shards are written, "
                        f"every reject is in {tmp_path / 'out' / 'rejects.jsonl'}")
    assert lines[1] == f"vlora: error: d.jsonl:2 image_missing image 0 not found: {tmp_path / 'gone.png'}"
    assert lines[2].startswith("vlora: error: d.jsonl:3 invalid_json line 3: ")
    assert lines[3] == "vlora: error: d.jsonl:4 empty_answer assistant message 1 is empty; fill it in or drop the turn"
    assert len(_read(tmp_path / "out")) == 2  # written anyway, for inspection
    proc = _vlora("pack", "--src", src, "--out", tmp_path / "out", "--max-reject", 0.7, "--format", "sharegpt")
    assert proc.returncode == 0 and proc.stderr == ""
    proc = _vlora("pack", "--src", src, "--out", tmp_path / "out", "--max-tokens", 100)
    assert proc.returncode == 2 and proc.stderr.startswith("vlora: error: --max-tokens needs --model")
