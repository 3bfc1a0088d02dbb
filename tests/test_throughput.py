"""The loader benchmark: samples/s in the main process and with workers; workers change no batch."""

import io
import itertools
import json

import pytest
import torch
from PIL import Image

from vlora.data.collate import Collator
from vlora.data.manifest import read_manifest, shard_paths
from vlora.data.stream import PREFETCH, train_loader
from vlora.data.throughput import (format_throughput, loader_throughput, make_jpeg_shards, shipped_bytes,
                                   workers_needed)

PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}  # 112 x 112 images: 16 image tokens


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from vlora.model import load_processor

    return load_processor(str(tiny_model_dir))


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    return make_jpeg_shards(tmp_path_factory.mktemp("jpeg"), 12, size=112, words=20, shard_size=3)


def _loader(shards, collator, workers: int):
    return train_loader([(str(shards), 1.0)], rank=0, world_size=1, num_workers=workers, seed=0, micro_batch=2,
                        encode=collator.encode, collate=collator.collate)


def _take(loader, n: int) -> list[dict]:
    try:
        return list(itertools.islice(loader, n))
    finally:
        loader.close()


def test_jpeg_shards_are_seeded_jpeg_records(jpeg_shards, tmp_path):
    manifest = read_manifest(jpeg_shards)
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 3, 3]
    again = make_jpeg_shards(tmp_path, 12, size=112, words=20, shard_size=3)
    assert [s["sha256"] for s in read_manifest(again)["shards"]] == [s["sha256"] for s in manifest["shards"]]
    other = make_jpeg_shards(tmp_path / "other", 3, size=112, words=20, shard_size=3, seed=1)
    assert read_manifest(other)["shards"][0]["sha256"] != manifest["shards"][0]["sha256"]

    import webdataset as wds

    sample = next(iter(wds.WebDataset(shard_paths(jpeg_shards)[:1], shardshuffle=False, empty_check=False)))
    image = Image.open(io.BytesIO(sample["0.jpg"]))
    assert (image.format, image.size) == ("JPEG", (112, 112))
    messages = json.loads(sample["json"])["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert len(messages[1]["content"][0]["text"].split()) == 20


@pytest.mark.parametrize("pack_length,dtype", [(0, torch.float32), (160, torch.bfloat16)])
def test_batches_through_a_worker_equal_those_made_in_process(processor, jpeg_shards, pack_length, dtype):
    """One worker reads the one reader's stream: every batch bit for bit, pixel_values made in shared memory."""
    collator = Collator(processor, **PIXELS, max_length=512, pixel_dtype=dtype, pack_length=pack_length)
    want = _take(_loader(jpeg_shards, collator, 0), 8)  # 16 samples: past the 12-sample epoch
    loader = _loader(jpeg_shards, collator, 1)
    got = list(itertools.islice(loader, 8))
    assert loader.stream.slabs.mapped  # the tensors came through the reused buffers
    loader.close()
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        for key, value in w.items():
            if isinstance(value, torch.Tensor):
                assert (g[key].dtype, g[key].shape, g[key].stride()) == (value.dtype, value.shape, value.stride())
                assert torch.equal(g[key], value), key
            else:
                assert g[key] == value, key
    assert all(b["pixel_values"].dtype == dtype and b["pixel_values"].shape == (2 * 64, 1176) for b in got)
    assert ("spans" in got[0]) == (pack_length > 0)


def test_loader_throughput_counts(processor, jpeg_shards):
    collator = Collator(processor, **PIXELS, max_length=512)
    threads = torch.get_num_threads()
    rows = loader_throughput(jpeg_shards, collator, workers=[0, 1], samples=8, micro_batch=2)
    assert torch.get_num_threads() == threads  # one thread while measuring, the caller's count again after
    assert [r["workers"] for r in rows] == [0, 1]
    # The timed batches: after 1 (in process) or 1 + PREFETCH (one worker's prefetch) untimed ones, of the
    # same stream.
    stream = _take(_loader(jpeg_shards, collator, 0), 5 + PREFETCH)
    with_worker = stream[1 + PREFETCH :]
    for row, timed in zip(rows, (stream[1:5], with_worker)):
        assert row["samples"] == 8 and row["seconds"] > 0
        assert row["samples_s"] == pytest.approx(8 / row["seconds"])
        assert row["per_worker"] == row["samples_s"]  # one reader either way
        assert row["tokens_per_sample"] == sum(b["n_tokens"] for b in timed) / 8
        assert row["trainer_cpu_ms"] > 0  # reading the tensors, and with a worker receiving them
    # CPU time: this process's exactly, a worker's from /proc in clock ticks (its few samples may take none).
    assert rows[0]["reader_cpu_ms"] > 0 and rows[0]["per_core"] == pytest.approx(1e3 / rows[0]["reader_cpu_ms"])
    assert rows[1]["reader_cpu_ms"] >= 0
    assert rows[0]["vs_main"] == 1.0
    assert rows[1]["vs_main"] == (rows[1]["per_core"] / rows[0]["per_core"] if rows[1]["per_core"] else None)
    assert rows[0]["bytes_per_sample"] == 0
    # What crossed from the worker: every tensor of the batch, 64 fp32 pixel rows of 1176 a sample the largest.
    assert rows[1]["bytes_per_sample"] == sum(shipped_bytes(b) for b in with_worker) / 8
    assert rows[1]["bytes_per_sample"] > 64 * 1176 * 4

    rows[1].update(reader_cpu_ms=25.0, per_core=40.0, vs_main=0.915)  # as if measured: 40 samples/s a core
    assert workers_needed(rows, 25) == 1 and workers_needed(rows, 40) == 1 and workers_needed(rows, 41) == 2
    assert workers_needed(rows[:1], 25) is None  # no worker row
    table = format_throughput(rows).splitlines()
    assert len(table) == 5 and "samples/s" in table[0] and "vs main" in table[0]
    assert table[1].split()[4] == "100%"
    assert table[2].split()[:6] == ["1", f"{rows[1]['samples_s']:.1f}", f"{rows[1]['per_worker']:.1f}", "40.0", "92%",
                                    "25.0"]
    assert table[3:] == ["25 samples/s need 1 data worker(s), a core each", "40 samples/s need 1 data worker(s), a core each"]


def test_shipped_bytes_counts_each_storage_once():
    x = torch.zeros(10, 4)
    batch = {"a": x, "view": x[2:5], "b": torch.zeros(3, dtype=torch.int64), "keys": ["k"], "n": 3}
    assert shipped_bytes(batch) == 10 * 4 * 4 + 3 * 8
