"""Shards -> batches: split by rank and worker, seeded shuffles, the shard-count check, the held-out split."""

import functools
import itertools
import os
import tarfile
from pathlib import Path

import pytest
from torch.utils.data import get_worker_info

from vlora.data.manifest import read_manifest, shard_paths
from vlora.data.stream import TrainStream, check_enough_shards, heldout_batches, train_loader
from vlora.errors import VloraError

PER_SHARD = 32


def _encode(sample: dict) -> dict:
    """Stands in for Collator.encode: keeps what identifies the sample and who read it."""
    info = get_worker_info()
    return {"key": sample["__key__"], "shard": Path(sample["__url__"]).name, "worker": info.id if info else -1}


def _collate(items: list[dict]) -> dict:
    return {"keys": [x["key"] for x in items], "shards": [x["shard"] for x in items],
            "worker": items[0]["worker"]}


def _tar_keys(shard_dir) -> list[str]:
    """Every sample key in manifest order, read straight from the tars (no webdataset)."""
    keys = []
    for path in shard_paths(shard_dir):
        with tarfile.open(path) as tar:
            keys += [m.name[: -len(".json")] for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


def _env(monkeypatch, **env):
    for name in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))


@functools.cache
def _read_rank(shard_dir: str, rank: int, seed: int, epochs: int = 2) -> dict:
    """{worker: [[(key, shard) of epoch 0], [... epoch 1], ...]} for one rank of 2, through a 2-worker loader."""
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, RANK=rank, WORLD_SIZE=2)  # what torchrun sets; webdataset's split_by_node reads it
        it = train_loader(shard_dir, rank=rank, world_size=2, num_workers=2, seed=seed, shuffle_buffer=16,
                          micro_batch=1, encode=_encode, collate=_collate)
        per_reader = 2 * PER_SHARD  # 8 shards / 4 readers
        batches = list(itertools.islice(it, 2 * epochs * per_reader))
        del it
    out = {}
    for b in batches:
        assert len(b["keys"]) == 1 and b["skipped"] == 0
        out.setdefault(b["worker"], []).append((b["keys"][0], b["shards"][0]))
    assert sorted(out) == [0, 1] and all(len(v) == epochs * per_reader for v in out.values())
    return {w: [seq[e * per_reader : (e + 1) * per_reader] for e in range(epochs)] for w, seq in out.items()}


@pytest.fixture(scope="module")
def train_dir(demo_shards):
    return str(demo_shards / "train")


@pytest.fixture(scope="module")
def readers(train_dir):
    """(rank, worker) -> per-epoch [(key, shard)] for 2 ranks x 2 workers, seed 0."""
    return {(r, w): epochs for r in (0, 1) for w, epochs in _read_rank(train_dir, r, 0).items()}


# --- the training stream --------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 1])
def test_each_epoch_partitions_the_samples_over_ranks_and_workers(readers, train_dir, epoch):
    all_keys = _tar_keys(train_dir)
    assert len(all_keys) == len(set(all_keys)) == 256
    seen = {reader: [k for k, _ in epochs[epoch]] for reader, epochs in readers.items()}
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for keys in seen.values():
        assert len(keys) == len(set(keys)) == 64
    for a, b in itertools.combinations(seen.values(), 2):
        assert not set(a) & set(b)
    assert set().union(*map(set, seen.values())) == set(all_keys)
    # Each reader holds exactly two whole shards.
    for epochs in readers.values():
        shards = [s for _, s in epochs[epoch]]
        assert len(set(shards)) == 2 and all(shards.count(s) == PER_SHARD for s in set(shards))


def test_epochs_reshuffle_shards_and_samples(readers):
    shards = {e: {r: frozenset(s for _, s in ep[e]) for r, ep in readers.items()} for e in (0, 1)}
    assert shards[0] != shards[1]  # a new shard order, so a new assignment of shards to readers
    for epochs in readers.values():
        assert [k for k, _ in epochs[0]] != [k for k, _ in epochs[1]]


def test_samples_are_shuffled_within_a_reader(readers):
    for epochs in readers.values():
        keys = [k for k, _ in epochs[0]]
        assert keys != sorted(keys)  # the tars hold keys in sorted order; a 16-sample buffer mixes them


def test_same_seed_same_order_other_seed_other_order(train_dir, readers):
    again = _read_rank.__wrapped__(train_dir, 0, 0, epochs=1)
    assert {w: e[0] for w, e in again.items()} == {w: readers[(0, w)][0] for w in (0, 1)}
    other = _read_rank(train_dir, 0, 1, epochs=1)
    for w in (0, 1):
        assert [k for k, _ in other[w][0]] != [k for k, _ in readers[(0, w)][0]]


def _single_reader(train_dir, *, seed, shuffle_buffer, micro_batch=1, encode=_encode, n=None):
    urls = shard_paths(train_dir)
    stream = TrainStream(urls, rank=0, world_size=1, seed=seed, shuffle_buffer=shuffle_buffer, micro_batch=micro_batch,
                         encode=encode, collate=_collate)
    return list(itertools.islice(iter(stream), n))


def test_single_reader_reads_every_shard_once_per_epoch_in_a_seeded_order(train_dir, monkeypatch):
    _env(monkeypatch)
    batches = _single_reader(train_dir, seed=0, shuffle_buffer=0, n=3 * 256)
    names = [Path(p).name for p in shard_paths(train_dir)]
    orders = []
    for e in range(3):
        epoch = batches[e * 256 : (e + 1) * 256]
        assert sorted(b["keys"][0] for b in epoch) == sorted(_tar_keys(train_dir))
        shard_seq = [b["shards"][0] for b in epoch]
        order = shard_seq[::PER_SHARD]  # no sample shuffle: each shard is read whole, in a row
        assert shard_seq == [s for s in order for _ in range(PER_SHARD)]
        assert sorted(order) == names
        orders.append(order)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != names


def _skip(keys):
    calls = []

    def encode(sample):
        calls.append(sample["__key__"])
        return None if sample["__key__"] in keys else _encode(sample)

    return encode, calls


def test_skipped_counts_the_samples_dropped_since_the_previous_batch(train_dir, monkeypatch):
    _env(monkeypatch)
    order = [b["keys"][0] for b in _single_reader(train_dir, seed=0, shuffle_buffer=0, n=256)]
    skip = {order[5], order[6], order[100]}
    encode, calls = _skip(skip)
    batches = _single_reader(train_dir, seed=0, shuffle_buffer=0, micro_batch=2, encode=encode, n=60)
    # micro_batch 2: the 3rd batch holds order[4], order[7] and reports the two skipped between them.
    assert batches[2]["keys"] == [order[4], order[7]] and batches[2]["skipped"] == 2
    assert sum(b["skipped"] for b in batches) == 3
    assert not skip & {k for b in batches for k in b["keys"]}
    assert len(calls) == sum(len(b["keys"]) + b["skipped"] for b in batches)  # every read sample accounted for


def test_skips_at_an_epoch_end_are_still_reported(train_dir, monkeypatch):
    _env(monkeypatch)
    order = [b["keys"][0] for b in _single_reader(train_dir, seed=0, shuffle_buffer=0, n=256)]
    encode, calls = _skip({order[-1]})  # the last sample read in epoch 0
    batches = _single_reader(train_dir, seed=0, shuffle_buffer=0, encode=encode, n=256)  # 255 + 1 of epoch 1
    assert len(calls) == sum(len(b["keys"]) + b["skipped"] for b in batches)


# --- enough shards --------------------------------------------------------------------------------


def test_check_enough_shards_names_folder_and_numbers():
    check_enough_shards("/data/train", 8, 2, 4)  # exactly one shard per reader is enough
    check_enough_shards("/data/train", 1, 1, 0)  # no workers: the main process is the one reader
    with pytest.raises(VloraError) as e:
        check_enough_shards("/data/train", 8, 2, 5)
    msg = str(e.value)
    assert "\n" not in msg
    assert "/data/train" in msg and "8 shard" in msg and "2 rank" in msg and "5 worker" in msg and "10" in msg
    with pytest.raises(VloraError, match=r"1 shard.*2 rank.*1 worker"):
        check_enough_shards("/data/x", 1, 2, 0)


def test_train_loader_refuses_too_few_shards(train_dir, monkeypatch):
    _env(monkeypatch, RANK=0, WORLD_SIZE=3)
    with pytest.raises(VloraError) as e:
        train_loader(train_dir, rank=0, world_size=3, num_workers=3, seed=0, shuffle_buffer=16, micro_batch=1,
                     encode=_encode, collate=_collate)
    msg = str(e.value)
    assert "\n" not in msg and train_dir in msg and "8 shard" in msg and "3 rank" in msg and "9" in msg


# --- held-out -------------------------------------------------------------------------------------


def test_heldout_ranks_split_the_first_samples(demo_shards, monkeypatch):
    val = str(demo_shards / "val")
    first = _tar_keys(val)[:40]  # crosses from the first val shard into the second
    got = {}
    for rank in (0, 1):
        _env(monkeypatch, RANK=rank, WORLD_SIZE=2)  # must not split the held-out shards by node
        batches = heldout_batches(val, rank=rank, world_size=2, max_samples=40, micro_batch=3,
                                  encode=_encode, collate=_collate)
        assert [len(b["keys"]) for b in batches] == [3] * 6 + [2]
        got[rank] = [k for b in batches for k in b["keys"]]
        again = heldout_batches(val, rank=rank, world_size=2, max_samples=40, micro_batch=3,
                                encode=_encode, collate=_collate)
        assert again == batches
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(first)
    assert got[0] == first[0::2] and got[1] == first[1::2]


def test_heldout_skips_what_encode_drops(demo_shards, monkeypatch):
    _env(monkeypatch)
    val = str(demo_shards / "val")
    first = _tar_keys(val)[:10]
    encode, _ = _skip({first[0], first[3]})
    batches = heldout_batches(val, rank=0, world_size=1, max_samples=10, micro_batch=4, encode=encode,
                              collate=_collate)
    assert [b["keys"] for b in batches] == [[first[1], first[2], first[4], first[5]], first[6:10]]


# --- manifest -------------------------------------------------------------------------------------


@pytest.mark.parametrize("read", [read_manifest, shard_paths])
def test_missing_shard_folder_is_named(tmp_path, read):
    missing = tmp_path / "no" / "such-shards"
    with pytest.raises(VloraError) as e:
        read(missing)
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "not found" in msg


def test_shard_paths_are_absolute_in_manifest_order(train_dir, monkeypatch):
    monkeypatch.chdir(Path(train_dir).parent)
    paths = shard_paths("train")
    assert paths == [os.path.join(train_dir, s["name"]) for s in read_manifest(train_dir)["shards"]]
    assert [Path(p).name for p in paths] == [f"shard-{i:06d}.tar" for i in range(8)]
