"""Shards -> batches: rank/worker split, seeded orders, weighted mixing, exact resume, shard checks, held-out split."""

import functools
import itertools
import json
import logging
import os
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import get_worker_info

from vlora.data import stream
from vlora.data.manifest import read_manifest, shard_paths
from vlora.data.stream import (ShardSet, TrainStream, check_enough_shards, check_sources, heldout_batches,
                               parse_sources, reader_shards, train_loader)
from vlora.errors import VloraError

PER_SHARD = 32
REF_BATCHES = 70  # per rank, micro-batch 4: 35 batches = 140 samples per reader, past two 64-sample epochs


def _encode(sample: dict) -> dict:
    """Stands in for Collator.encode: keeps what identifies the sample and who read it."""
    info = get_worker_info()
    return {"key": sample["__key__"], "shard": Path(sample["__url__"]).name,
            "source": Path(sample["__url__"]).parent.name, "worker": info.id if info else -1}


def _rejects(key: str) -> bool:
    return zlib.crc32(key.encode()) % 6 == 0


def _encode_some_rejected(sample: dict) -> dict | None:
    return None if _rejects(sample["__key__"]) else _encode(sample)


def _collate(items: list[dict]) -> dict:
    return {"keys": [x["key"] for x in items], "shards": [x["shard"] for x in items],
            "sources": [x["source"] for x in items], "worker": items[0]["worker"]}


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


def _loader(sources, *, rank=0, world=1, workers=0, seed=0, mb=4, encode=_encode, state=None, open_shards=4):
    return train_loader(sources, rank=rank, world_size=world, num_workers=workers, seed=seed, micro_batch=mb,
                        encode=encode, collate=_collate, state=state, open_shards=open_shards)


def _take(loader, n):
    batches = list(itertools.islice(loader, n))
    assert len(batches) == n
    return batches


@pytest.fixture(scope="module")
def train_dir(demo_shards):
    return str(demo_shards / "train")


@pytest.fixture(scope="module")
def vqa_dir(demo_src, tmp_path_factory):
    """A second data set for mixing: the 64 demo val samples in 4 shards of 16."""
    from vlora.data.pack import pack

    out = tmp_path_factory.mktemp("vqa") / "vqa"
    pack(demo_src / "val.jsonl", out, shard_size=16)
    return str(out)


@pytest.fixture(scope="module")
def configs(train_dir, vqa_dir):
    """name -> (sources, encode): one data set; and caption:vqa = 2:1 with some samples rejected by encode."""
    return {"one": (((train_dir, 1.0),), _encode), "mix": (((train_dir, 2.0), (vqa_dir, 1.0)), _encode_some_rejected)}


@functools.cache
def _reference(sources, encode, rank: int, seed: int = 0, n: int = REF_BATCHES) -> list[dict]:
    """Rank `rank` of 2, 2 workers, micro-batch 4, read without a break."""
    loader = _loader(list(sources), rank=rank, world=2, workers=2, seed=seed, encode=encode)
    batches = _take(loader, n)
    loader.close()
    return batches


@pytest.fixture(scope="module")
def readers(configs):
    """(rank, role) -> per-epoch [(key, shard)] for 2 ranks x 2 workers, seed 0 (a fresh loader: worker = role)."""
    sources, encode = configs["one"]
    out = {}
    for rank in (0, 1):
        for b in _reference(sources, encode, rank):
            assert b["skipped"] == 0 and len(b["keys"]) == 4
            out.setdefault((rank, b["worker"]), []).extend(zip(b["keys"], b["shards"]))
    per_epoch = 2 * PER_SHARD  # 8 shards / 4 readers
    assert sorted(out) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    return {r: [seq[e * per_epoch : (e + 1) * per_epoch] for e in range(2)] for r, seq in out.items()}


# --- exact resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config,splits", [
    ("one", (20, 20)),      # C % W == 0, the second half crosses every reader's first epoch end
    ("one", (21, 21)),      # C % W == 1: worker w plays role (w + 1) % 2
    ("one", (35, 35)),      # saved inside epoch 1, resumed across the next epoch end
    ("one", (7, 13, 15)),   # resumed twice: the consumed count accumulates
    ("mix", (21, 21)),      # two data sets by weight, rejected samples: batches do not align with samples
    ("mix", (4, 31, 35)),
])
def test_resume_continues_with_exactly_the_next_batch(configs, config, splits):
    sources, encode = configs[config]
    for rank in (0, 1):
        reference = _reference(sources, encode, rank)
        got, state = [], None
        for n in splits:
            loader = _loader(list(sources), rank=rank, world=2, workers=2, encode=encode, state=state)
            got += _take(loader, n)
            state = json.loads(json.dumps(loader.state_dict()))
            loader.close()
        assert state["consumed"] == sum(splits)
        want = reference[: sum(splits)]
        assert [b["keys"] for b in got] == [b["keys"] for b in want]
        assert [b["skipped"] for b in got] == [b["skipped"] for b in want]
        if splits == (35, 35):
            assert {d["epoch"] for r in state["readers"] for d in r["datasets"]} == {2}  # wrapped twice
    if config == "mix":
        assert sum(b["skipped"] for b in reference) > 0


def test_resumed_workers_take_over_the_roles_in_round_robin_order(configs):
    sources, encode = configs["one"]
    loader = _loader(list(sources), world=2, workers=2, encode=encode)
    _take(loader, 3)
    state = loader.state_dict()
    loader.close()
    resumed = _loader(list(sources), world=2, workers=2, encode=encode, state=state)
    batches = _take(resumed, 4)
    resumed.close()
    # The 4th batch overall is due from role 1: worker 0 now plays role 1, worker 1 plays role 0.
    assert [b["worker"] for b in batches] == [0, 1, 0, 1]
    assert [b["keys"] for b in batches] == [b["keys"] for b in _reference(sources, encode, 0)[3:7]]


def test_state_dict_is_small_json(configs):
    sources, encode = configs["mix"]
    loader = _loader(list(sources), rank=1, world=2, workers=2, encode=encode)
    before = loader.state_dict()
    assert before["consumed"] == 0 and all(r == {"mix": 0, "datasets": [{"epoch": 0, "emitted": 0}] * 2}
                                           for r in before["readers"])
    _take(loader, 9)
    state = loader.state_dict()
    loader.close()
    text = json.dumps(state)
    assert json.loads(text) == state and len(text) < 1000
    assert state["consumed"] == 9 and state["rank"] == 1 and state["world_size"] == 2 and state["workers"] == 2
    assert [(s["shards"], s["samples"], s["weight"]) for s in state["sources"]] == [(8, 256, 2.0), (4, 64, 1.0)]
    # Role 0 made batches 0, 2, 4, 6, 8 (20 items); every sample drawn is in the position, rejected ones too.
    role0 = state["readers"][0]
    drawn = sum(d["emitted"] for d in role0["datasets"])
    assert role0["mix"] == drawn >= 20


def test_restoring_reads_no_sample_twice(train_dir, monkeypatch):
    """The position is integers: restoring replays RNG draws, reads tar headers only, and encodes nothing extra."""
    reference = _take(_loader([(train_dir, 1)]), 151)
    first = _loader([(train_dir, 1)])
    _take(first, 150)  # 600 samples: epoch 2, 88 samples in, 4 shards open
    state = first.state_dict()
    assert state["readers"][0]["datasets"][0] == {"epoch": 2, "emitted": 88}

    yielded, encoded = [], []
    real_samples = stream._samples

    def counting_samples(url, fileobj):
        for sample in real_samples(url, fileobj):
            yielded.append(sample["__key__"])
            yield sample

    def counting_encode(sample):
        encoded.append(sample["__key__"])
        return _encode(sample)

    monkeypatch.setattr(stream, "_samples", counting_samples)
    resumed = _loader([(train_dir, 1)], encode=counting_encode, state=state)
    batch = next(resumed)
    assert batch["keys"] == reference[150]["keys"]
    assert encoded == batch["keys"] and yielded == batch["keys"]  # not one sample read before the position


def test_resume_reads_through_shards_it_cannot_seek(train_dir, monkeypatch):
    loader = _loader([(train_dir, 1)], open_shards=2)
    _take(loader, 11)
    state, want = loader.state_dict(), _take(loader, 3)
    monkeypatch.setattr(stream, "_sample_start", lambda url, index: None)  # e.g. a compressed tar
    assert [b["keys"] for b in _take(_loader([(train_dir, 1)], open_shards=2, state=state), 3)] == [b["keys"] for b in want]


def test_state_from_another_run_shape_is_refused(configs, train_dir, vqa_dir):
    sources, _ = configs["one"]
    loader = _loader(list(sources), rank=0, world=2, workers=2)
    state = loader.state_dict()
    for kwargs, words in [({"rank": 1}, "rank 0"), ({"workers": 1}, "readers per rank"), ({"seed": 3}, "seed"),
                          ({"open_shards": 2}, "open_shards")]:
        args = {"rank": 0, "world": 2, "workers": 2, **kwargs}
        with pytest.raises(VloraError, match=words):
            _loader(list(sources), state=state, **args)
    with pytest.raises(VloraError, match="shard folders changed"):
        _loader([(vqa_dir, 1)], rank=0, world=2, workers=2, state=state)  # 4 shards of 16, not 8 of 32
    with pytest.raises(VloraError, match="shard folders changed"):
        _loader(list(sources), rank=0, world=2, workers=2, state={**state, "sources": state["sources"] * 2})
    with pytest.raises(VloraError, match="format"):
        _loader(list(sources), rank=0, world=2, workers=2, state={"consumed": 3})
    damaged = json.loads(json.dumps(state))
    damaged["readers"][1]["datasets"][0]["emitted"] = "3"
    with pytest.raises(VloraError, match="damaged"):
        _loader(list(sources), rank=0, world=2, workers=2, state=damaged)
    alone = _loader(list(sources)).state_dict()  # one rank, the main process as the one reader: 256 a epoch
    alone["readers"][0]["datasets"][0]["emitted"] = 10_000
    with pytest.raises(VloraError, match="10000 samples into epoch 0.*has 256"):  # raised where the reader starts
        next(_loader(list(sources), state=alone))
    # A new micro-batch size or weights are fine: the samples' order does not depend on them.
    _loader([(train_dir, 5.0)], rank=0, world=2, workers=2, mb=3, state=state).close()


def test_resume_onto_a_folder_repacked_with_other_data_is_refused(demo_src, tmp_path):
    """Same shard and sample counts, other samples: the saved position would silently point at other data."""
    from vlora.data.pack import pack

    folder = tmp_path / "shards"
    pack(demo_src / "val.jsonl", folder, shard_size=32)
    loader = _loader([(str(folder), 1)])
    _take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    content = state["sources"][0]["content"]
    assert len(content) == 16 and content == ShardSet.load(str(folder)).content
    pack(demo_src / "val.jsonl", folder, shard_size=32)  # a repack of the same data: the same bytes, resumable
    _loader([(str(folder), 1)], state=state).close()
    other = tmp_path / "other.jsonl"
    other.write_text("".join((demo_src / "train.jsonl").read_text().splitlines(keepends=True)[:64]))
    pack(other, folder, shard_size=32, image_root=demo_src)  # 2 shards of 32 again, other samples
    assert ShardSet.load(str(folder)).sizes == (32, 32)
    with pytest.raises(VloraError) as e:
        _loader([(str(folder), 1)], state=state)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "repacked" in msg and content in msg
    legacy = {**state, "sources": [{k: v for k, v in src.items() if k != "content"} for src in state["sources"]]}
    _loader([(str(folder), 1)], state=legacy).close()  # a state from before the hash: counts are all it has


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    handler, logger = _Warnings(), logging.getLogger("vlora")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_uneven_reader_shares_are_warned_about_at_start(train_dir, vqa_dir, demo_src, tmp_path, warnings_logged):
    from vlora.data.pack import pack

    # 8 shards of 32 over 2 x 2 readers: 64 each, every epoch.
    assert stream.reader_shares(ShardSet.load(train_dir).sizes, seed=0, dataset=0, world_size=2, workers=2) == [[64] * 4] * 4
    _loader([(train_dir, 1)], world=2, workers=2).close()
    assert warnings_logged == []
    # 4 shards of 16 over 3 readers: one reader gets 2 shards every epoch, its samples are seen half as often.
    shares = stream.reader_shares(ShardSet.load(vqa_dir).sizes, seed=0, dataset=0, world_size=1, workers=3)
    assert [sorted(e) for e in shares] == [[16, 16, 32]] * 4
    _loader([(vqa_dir, 1)], rank=1, world=1, workers=3).close()  # only rank 0 says it
    _loader([(vqa_dir, 1)], world=1, workers=3).close()
    (msg,) = warnings_logged
    assert msg.startswith(f"{vqa_dir}: its 4 shard(s) give the 3 readers (1 rank(s) x 3 worker(s)) uneven epochs, 16 to 32 "
                          "samples each; ") and "up to 2.00x as often" in msg and "vlora pack --shard-size" in msg
    # A short last shard: 24 + 24 + 16 over 3 readers.
    pack(demo_src / "val.jsonl", tmp_path / "short", shard_size=24)
    assert stream.warn_if_unbalanced(ShardSet.load(str(tmp_path / "short")), 0, seed=0, world_size=1, workers=3) is not None
    assert "16 to 24 samples each" in warnings_logged[-1]
    # Within 10 %: quiet (7 shards of 19 and one of 18, over 8 readers).
    assert stream.warn_if_unbalanced(ShardSet("x", ("u",) * 8, (19,) * 7 + (18,)), 0, seed=0, world_size=2, workers=4) is None


# --- what each epoch reads ------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 1])
def test_each_epoch_partitions_the_samples_over_ranks_and_workers(readers, train_dir, epoch):
    all_keys = _tar_keys(train_dir)
    assert len(all_keys) == len(set(all_keys)) == 256
    seen = {reader: [k for k, _ in epochs[epoch]] for reader, epochs in readers.items()}
    for keys in seen.values():
        assert len(keys) == len(set(keys)) == 64
    for a, b in itertools.combinations(seen.values(), 2):
        assert not set(a) & set(b)
    assert set().union(*map(set, seen.values())) == set(all_keys)
    # Each reader holds exactly two whole shards, the ones reader_shards assigns it.
    names = [Path(p).name for p in shard_paths(train_dir)]
    for (rank, role), epochs in readers.items():
        shards = [s for _, s in epochs[epoch]]
        assert all(shards.count(s) == PER_SHARD for s in set(shards))
        mine = reader_shards(8, seed=0, dataset=0, epoch=epoch, rank=rank, world_size=2, role=role, workers=2)
        assert sorted(shards) == sorted(names[i] for i in mine for _ in range(PER_SHARD))


def test_epochs_reshuffle_shards_and_samples(readers):
    shards = {e: {r: frozenset(s for _, s in ep[e]) for r, ep in readers.items()} for e in (0, 1)}
    assert shards[0] != shards[1]  # a new shard order, so a new assignment of shards to readers
    for epochs in readers.values():
        assert [k for k, _ in epochs[0]] != [k for k, _ in epochs[1]]


def test_samples_of_open_shards_are_interleaved(readers):
    for epochs in readers.values():
        keys = [k for k, _ in epochs[0]]
        assert keys != sorted(keys)
        shards = [s for _, s in epochs[0]]
        switches = sum(a != b for a, b in itertools.pairwise(shards))
        assert switches > 16  # two shards drawn in proportion to what is left: well mixed, not one after the other


def test_same_seed_same_order_other_seed_other_order(configs, readers):
    sources, encode = configs["one"]
    loader = _loader(list(sources), rank=0, world=2, workers=2, encode=encode)
    again = _take(loader, 8)
    loader.close()
    assert [b["keys"] for b in again] == [b["keys"] for b in _reference(sources, encode, 0)[:8]]
    other = _reference(sources, encode, 0, seed=1, n=8)
    assert [b["keys"] for b in other] != [b["keys"] for b in again]


def _single(train_dir, *, n, mb=1, encode=_encode, open_shards=1, seed=0):
    return _take(_loader([(train_dir, 1)], mb=mb, encode=encode, open_shards=open_shards, seed=seed), n)


def test_single_reader_reads_every_shard_once_per_epoch_in_a_seeded_order(train_dir, monkeypatch):
    _env(monkeypatch, RANK=1, WORLD_SIZE=2)  # ignored: rank and world size are arguments
    batches = _single(train_dir, n=3 * 256)  # one shard open at a time: whole shards in a row
    names = [Path(p).name for p in shard_paths(train_dir)]
    orders = []
    for e in range(3):
        epoch = batches[e * 256 : (e + 1) * 256]
        assert sorted(b["keys"][0] for b in epoch) == sorted(_tar_keys(train_dir))
        shard_seq = [b["shards"][0] for b in epoch]
        order = shard_seq[::PER_SHARD]
        assert shard_seq == [s for s in order for _ in range(PER_SHARD)]
        assert sorted(order) == names
        orders.append(order)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != names


# --- mixing ---------------------------------------------------------------------------------------


def test_mixing_follows_the_weights_and_each_data_set_cycles_its_own_epochs(train_dir, vqa_dir):
    batches = _take(_loader([(train_dir, 2), (vqa_dir, 1)]), 150)  # 600 samples
    picks = [(src, k) for b in batches for src, k in zip(b["sources"], b["keys"])]
    share = sum(src == Path(train_dir).name for src, _ in picks) / len(picks)
    assert abs(share - 2 / 3) < 0.04
    vqa = [k for src, k in picks if src == Path(vqa_dir).name]
    assert len(vqa) >= 3 * 64  # the small set went through 3 epochs while the big one did not finish 2
    epochs = [vqa[i : i + 64] for i in range(0, 3 * 64, 64)]
    assert all(sorted(e) == sorted(_tar_keys(vqa_dir)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    caption = [k for src, k in picks if src == Path(train_dir).name]
    assert sorted(caption[:256]) == sorted(_tar_keys(train_dir))
    assert len(set(caption[256:])) == len(caption) - 256  # epoch 1 of its own, nothing repeated yet


# --- rejected samples -----------------------------------------------------------------------------


def _skip(keys):
    calls = []

    def encode(sample):
        calls.append(sample["__key__"])
        return None if sample["__key__"] in keys else _encode(sample)

    return encode, calls


def test_skipped_counts_the_samples_dropped_since_the_previous_batch(train_dir):
    order = [b["keys"][0] for b in _single(train_dir, n=256)]
    skip = {order[5], order[6], order[100]}
    encode, calls = _skip(skip)
    batches = _single(train_dir, mb=2, encode=encode, n=60)
    # micro_batch 2: the 3rd batch holds order[4], order[7] and reports the two skipped between them.
    assert batches[2]["keys"] == [order[4], order[7]] and batches[2]["skipped"] == 2
    assert sum(b["skipped"] for b in batches) == 3
    assert not skip & {k for b in batches for k in b["keys"]}
    assert len(calls) == sum(len(b["keys"]) + b["skipped"] for b in batches)  # every read sample accounted for


def test_skips_at_an_epoch_end_are_still_reported_and_batches_straddle_epochs(train_dir):
    order = [b["keys"][0] for b in _single(train_dir, n=259)]
    encode, calls = _skip({order[255]})  # the last sample of epoch 0
    batches = _single(train_dir, mb=3, encode=encode, n=86)  # 259 samples read, one rejected
    assert batches[84]["keys"] == order[252:255]
    assert batches[85]["keys"] == order[256:259]  # the first three of epoch 1
    assert batches[85]["skipped"] == 1
    assert len(calls) == sum(len(b["keys"]) + b["skipped"] for b in batches)


# --- shard sets -----------------------------------------------------------------------------------


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


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_train_loader_refuses_too_few_shards_per_data_set(train_dir, vqa_dir):
    with pytest.raises(VloraError) as e:
        _loader([(train_dir, 1)], world=3, workers=3)
    msg = str(e.value)
    assert "\n" not in msg and train_dir in msg and "8 shard" in msg and "3 rank" in msg and "9" in msg
    _loader([(train_dir, 1)], world=2, workers=4).close()  # 8 shards for 8 readers (no worker starts)
    with pytest.raises(VloraError, match=rf"{vqa_dir} has 4 shard.*2 rank.*3 worker"):
        _loader([(train_dir, 1), (vqa_dir, 1)], world=2, workers=3)


def test_a_shard_shorter_than_its_manifest_is_named(train_dir):
    src = ShardSet.load(train_dir)
    longer = ShardSet(src.folder, src.urls, (PER_SHARD + 1, *src.sizes[1:]))
    ts = TrainStream([longer], rank=0, world_size=1, num_workers=0, seed=0, micro_batch=1, encode=_encode,
                     collate=_collate, open_shards=1)
    with pytest.raises(VloraError, match=r"shard-000000.tar ends early: its manifest.json lists 33"):
        list(itertools.islice(ts.role_batches(0), 300))


def test_check_sources_checks_every_folder(train_dir, vqa_dir):
    assert check_sources(f"{train_dir}:2,{vqa_dir}", 2, 2) == [(train_dir, 2.0), (vqa_dir, 1.0)]
    with pytest.raises(VloraError, match=rf"{vqa_dir} has 4 shard"):
        check_sources(f"{train_dir}:2,{vqa_dir}", 2, 3)


def test_parse_sources(train_dir, vqa_dir, tmp_path):
    assert parse_sources(train_dir) == [(train_dir, 1.0)]
    assert parse_sources(f" {train_dir}:2 , {vqa_dir}:0.5") == [(train_dir, 2.0), (vqa_dir, 0.5)]
    assert parse_sources([f"{train_dir}:3", (vqa_dir, 1)]) == [(train_dir, 3.0), (vqa_dir, 1.0)]
    for spec, words in [
        (f"{train_dir}:", "weight '' is not a positive number"),
        (f"{train_dir}:x", "weight 'x' is not a positive number"),
        (f"{train_dir}:0", "weight '0'"),
        (f"{train_dir}:-1", "weight '-1'"),
        (f"{train_dir}:nan", "weight 'nan'"),
        (f"{train_dir},", "empty entry"),
        (f"{train_dir},,{vqa_dir}", "empty entry"),
        ("", "empty entry"),
        ([], "must be"),
        (f"{train_dir}:1,{train_dir}:2", "twice"),
        (f"{tmp_path / 'nope'}:2", "does not exist"),
    ]:
        with pytest.raises(VloraError, match=words) as e:
            parse_sources(spec)
        assert "\n" not in str(e.value)


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


def test_close_stops_the_workers_at_once(configs):
    """Workers ignore SIGTERM (ignore_stop_signals), which is how multiprocessing stops daemon processes at
    interpreter exit: a worker still running then would hang the exit forever. close() ends them itself."""
    import multiprocessing

    sources, encode = configs["one"]
    before = set(multiprocessing.active_children())
    loader = _loader(list(sources), workers=2, encode=encode)
    _take(loader, 3)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2 and all(p.is_alive() for p in workers)
    held = loader._it  # as a reference cycle or a traceback's frame would: the iterator's finaliser does not run
    loader.close()
    assert not any(p.is_alive() for p in workers)
    assert set(multiprocessing.active_children()) - before == set()
    del held


# --- from the workers to the trainer ---------------------------------------------------------------


def _tensor_collate(items: list[dict], empty=torch.empty) -> dict:
    """_collate plus tensors of every kind a batch may hold, all derived from the keys; the large one made by
    `empty`, as Collator.collate makes pixel_values."""
    batch = _collate(items)
    codes = torch.tensor([zlib.crc32(k.encode()) for k in batch["keys"]], dtype=torch.int64)
    pixels = empty((len(items), 1000), dtype=torch.float32)
    batch.update({
        "codes": codes,
        "pixels": torch.add((codes[:, None] % 977).float() / 7, torch.arange(1000.0), out=pixels),
        "half": (codes % 1000).to(torch.bfloat16)[:, None].repeat(1, 3),
        "even": codes % 2 == 0,
        "count": torch.tensor(len(items), dtype=torch.int32),  # 0-dim
        "none": torch.zeros(0, 3),  # empty
        "strided": codes[:, None].expand(-1, 3),  # not contiguous: travels the default way, strides kept
        "n": len(items),
    })
    return batch


def _items(*keys):
    return [{"key": k, "shard": "s", "source": "d", "worker": 0} for k in keys]


def _assert_same_batch(got: dict, want: dict, skip=()) -> None:
    assert [k for k in got if k not in skip] == [k for k in want if k not in skip]  # same keys, same order
    for k, w in want.items():
        if k in skip:
            continue
        g = got[k]
        if isinstance(w, torch.Tensor):
            assert (g.dtype, g.shape, g.stride()) == (w.dtype, w.shape, w.stride()), k
            assert torch.equal(g, w), k
        else:
            assert g == w, k


def test_slabs_carry_every_tensor_exactly_and_reuse_their_buffers():
    batch = _tensor_collate(_items("a", "b", "c"))
    slabs = stream.Slabs(workers=2, slots=2)
    packed = slabs.pack(batch, worker=1)
    assert slabs.busy.tolist() == [[0, 0], [1, 0]]
    assert {k for k, v in packed.items() if isinstance(v, torch.Tensor)} == {"strided"}
    worker, slot, buf, layout, order = packed[stream._SLAB]
    assert (worker, slot, order) == (1, 0, list(batch)) and buf.is_shared()
    assert all(offset % 64 == 0 for _, offset, _, _ in layout)
    out = slabs.unpack(dict(packed))
    _assert_same_batch(out, batch)
    assert slabs.busy.tolist() == [[0, 0], [0, 0]]
    # Copied out: the worker may overwrite its buffer now, the batch keeps its values.
    assert all(v.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
               for v in out.values() if isinstance(v, torch.Tensor))
    buf.fill_(0)
    _assert_same_batch(out, batch)

    again = slabs.pack(batch, worker=1)  # the released slot, its buffer reused
    assert again[stream._SLAB][1] == 0 and again[stream._SLAB][2].data_ptr() == buf.data_ptr()
    other = slabs.pack(batch, worker=1)
    assert other[stream._SLAB][1] == 1 and slabs.busy.tolist() == [[0, 0], [1, 1]]
    assert slabs.pack(batch, worker=1) is batch  # no slot free: the batch travels as it is
    assert slabs.pack({"keys": ["a"]}, worker=0) == {"keys": ["a"]}  # nothing to carry: no slot taken
    assert slabs.busy[0].tolist() == [0, 0]



def test_a_batch_pinned_by_the_dataloader_unpacks_to_the_same_batch(monkeypatch):
    """With pin_memory (a GPU) the DataLoader's pin thread runs torch's own pin_memory over the batch before the
    trainer sees it: it copies the buffer (pinned, not shared) and rebuilds the tuples and lists around it. The
    trainer then takes views of that copy, releases the slot, and keeps nothing of the worker's mapped."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = _tensor_collate(_items("a", "b", "c"))
    slabs = stream.Slabs(workers=1, slots=2)
    packed = slabs.pack(batch, worker=0)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())  # no CUDA here to pin
    pinned = pin_memory(packed)
    assert pinned[stream._SLAB][2].data_ptr() != packed[stream._SLAB][2].data_ptr()
    out = slabs.unpack(pinned)
    _assert_same_batch(out, batch, skip=("strided",))  # not in the slab: pinned by torch (here: cloned) on its own
    assert torch.equal(out["strided"], batch["strided"])
    assert slabs.busy.tolist() == [[0, 0]] and not slabs.mapped and slabs.plain == 0
    assert len({v.untyped_storage().data_ptr() for v in out.values() if isinstance(v, torch.Tensor)}) == 2  # + strided


def test_what_empty_makes_is_carried_in_place():
    slabs = stream.Slabs(workers=1, slots=2)
    empty = functools.partial(slabs.empty, 0)
    batch = _tensor_collate(_items("a", "b"), empty=empty)
    spare = empty((5,), dtype=torch.int64)  # handed out but not in the batch: its room is skipped, not reused
    packed = slabs.pack(batch, worker=0)
    _, slot, buf, layout, _ = packed[stream._SLAB]
    offsets = {key: offset for key, offset, _, _ in layout}
    assert slot == 0 and offsets["pixels"] == 0 and buf.data_ptr() == batch["pixels"].data_ptr()  # not copied
    assert spare.data_ptr() - buf.data_ptr() == 2 * 1000 * 4
    assert min(o for k, o in offsets.items() if k != "pixels") >= 2 * 1000 * 4 + 64
    _assert_same_batch(slabs.unpack(packed), _tensor_collate(_items("a", "b")))

    big = _tensor_collate(_items(*"abcdefgh"), empty=empty)  # larger than slot 0's buffer: it grows, first
    out = slabs.unpack(slabs.pack(big, worker=0))
    _assert_same_batch(out, _tensor_collate(_items(*"abcdefgh")))
    assert slabs.own[0].numel() >= 8 * 1000 * 4

    slabs.busy.fill_(1)  # no slot free: plain memory, and the batch travels as it is
    plain = _tensor_collate(_items("a"), empty=empty)
    assert not plain["pixels"].is_shared() and slabs.pack(plain, worker=0) is plain


def test_batches_from_workers_equal_the_readers_own_and_resume_exactly(train_dir):
    """Two workers: batch g is role g % 2's batch, tensors bit for bit, made in this process for reference."""
    def loader(state=None):
        return train_loader([(train_dir, 1)], rank=0, world_size=1, num_workers=2, seed=0, micro_batch=4,
                            encode=_encode, collate=_tensor_collate, state=state)

    reference = TrainStream([ShardSet.load(train_dir)], rank=0, world_size=1, num_workers=2, seed=0, micro_batch=4,
                            encode=_encode, collate=_tensor_collate)
    roles = [reference.role_batches(role) for role in (0, 1)]
    want = [next(roles[g % 2]) for g in range(12)]
    for b in want:
        b.pop("stream")

    first = loader()
    got = _take(first, 7)
    assert {worker for worker, _ in first.stream.slabs.mapped} == {0, 1}  # both workers' batches came in slabs
    assert first.stream.slabs.plain == 0  # PREFETCH + 2 slots: a worker never finds all of its slots busy
    assert all(not b["pixels"].is_shared() for b in got)  # copied out of them
    state = first.state_dict()
    first.close()
    resumed = loader(state)  # new workers, new slabs; worker 0 now plays role 1
    got += _take(resumed, 5)
    resumed.close()
    for g, w in zip(got, want):
        _assert_same_batch(g, w, skip=("worker",))


# --- /dev/shm too small: the default transport, one warning -----------------------------------------


def _pixels_batch(slabs, n_pixels: int, extra: int = 0) -> dict:
    """A batch whose pixels `empty` makes (in a slot when it can), and `extra` int64s made by the collate."""
    pixels = slabs.empty(0, (n_pixels,), dtype=torch.float32)
    torch.arange(float(n_pixels), out=pixels)
    return {"pixels": pixels, "extra": torch.arange(extra), "keys": ["a"]}


def test_no_room_in_dev_shm_leaves_every_batch_to_the_default_transport(monkeypatch, caplog):
    asked = []
    monkeypatch.setattr(stream, "_shm_room", lambda: asked.append(1) or 10 * 2**20)  # 10 MiB free
    slabs = stream.Slabs(workers=1, slots=2)
    with caplog.at_level(logging.WARNING, logger="vlora"):
        for _ in range(3):  # 4 MB of pixels: 2 slots x 5 MB, twice over, do not fit in 10 MiB
            batch = _pixels_batch(slabs, 2**20)
            assert not batch["pixels"].is_shared()
            assert slabs.pack(batch, worker=0) is batch
            assert slabs.unpack(batch) is batch
    assert slabs.off and not slabs.own and slabs.busy.tolist() == [[0, 0]] and slabs.plain == 3
    assert len(asked) == 1  # decided once, at the first buffer
    warnings = [r.getMessage() for r in caplog.records if "/dev/shm" in r.getMessage()]
    assert len(warnings) == 1 and "10 MiB free" in warnings[0] and "default transport" in warnings[0]
    assert slabs.warned.item() == 1


def test_a_full_dev_shm_that_torch_reports_falls_back_too(monkeypatch, caplog):
    """torch reserves a shared buffer's pages at once and raises when /dev/shm is full (no SIGBUS later)."""
    slabs = stream.Slabs(workers=1, slots=2)  # its shared flags are made before /dev/shm fills up

    def full(self):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_3>: No space left on device (28)")

    monkeypatch.setattr(stream, "_shm_room", lambda: None)  # as where /dev/shm cannot be asked
    monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    with caplog.at_level(logging.WARNING, logger="vlora"):
        batch = _pixels_batch(slabs, 1000)
        assert slabs.pack(batch, worker=0) is batch and slabs.off
    assert "No space left on device" in caplog.text


def test_a_buffer_that_cannot_grow_sends_that_batch_the_default_way(monkeypatch, caplog):
    room = [2**30]
    monkeypatch.setattr(stream, "_shm_room", lambda: room[0])
    slabs = stream.Slabs(workers=1, slots=2)
    first = slabs.pack(_pixels_batch(slabs, 1000), worker=0)  # slot 0: 4,000 bytes + a quarter + 64 KiB
    _, slot, buf, _, _ = first[stream._SLAB]
    size = slabs.own[0].numel()
    assert slot == 0 and size == 4000 + 1000 + 65536
    slabs.unpack(first)
    room[0] = 0
    with caplog.at_level(logging.WARNING, logger="vlora"):
        # The pixels fit in slot 0 and are made there; the 8 KB made beside them do not, and it cannot grow.
        batch = _pixels_batch(slabs, (size - 4096) // 4, extra=1024)
        assert batch["pixels"].untyped_storage().data_ptr() == slabs.own[0].untyped_storage().data_ptr()
        sent = slabs.pack(batch, worker=0)
    # The pixels leave the slot (it is not marked busy, the worker will write it again), equal; the rest as it was.
    assert stream._SLAB not in sent and sent["extra"] is batch["extra"]
    assert sent["pixels"].untyped_storage().data_ptr() != slabs.own[0].untyped_storage().data_ptr()
    assert torch.equal(sent["pixels"], torch.arange(float((size - 4096) // 4)))
    assert slabs.busy.tolist() == [[0, 0]] and not slabs.off and slabs.own[0].numel() == size
    assert "0 MiB free" in caplog.text
    again = slabs.pack(_pixels_batch(slabs, 1000), worker=0)  # a batch that fits still takes the slot
    assert again[stream._SLAB][1] == 0 and again[stream._SLAB][2].data_ptr() == buf.data_ptr()


def test_workers_without_room_in_dev_shm_give_the_same_batches(train_dir, monkeypatch):
    monkeypatch.setattr(stream, "_shm_room", lambda: 0)  # the workers are forked with it
    want = _take(_loader([(train_dir, 1)], workers=0, mb=4), 6)
    loader = train_loader([(train_dir, 1)], rank=0, world_size=1, num_workers=2, seed=0, micro_batch=4,
                          encode=_encode, collate=_tensor_collate)
    got = _take(loader, 6)
    assert loader.stream.slabs.plain == 6 and not loader.stream.slabs.mapped
    loader.close()
    assert [b["keys"] for b in got] != [b["keys"] for b in want]  # 2 readers, not 1: other batches
    reference = TrainStream([ShardSet.load(train_dir)], rank=0, world_size=1, num_workers=2, seed=0, micro_batch=4,
                            encode=_encode, collate=_tensor_collate)
    roles = [reference.role_batches(role) for role in (0, 1)]
    for g, batch in enumerate(got):
        w = next(roles[g % 2])
        w.pop("stream")
        _assert_same_batch(batch, w, skip=("worker",))


_SMALL_SHM = """
import logging, sys, torch
from vlora.data import stream
logging.basicConfig(level=logging.WARNING, format="%(message)s")
def encode(sample):
    return {"key": sample["__key__"]}
def collate(items, empty=torch.empty):  # MB MiB of pixels a batch, made where the worker says
    pixels = empty((len(items), MB * 2**20 // 4 // len(items)), dtype=torch.float32)
    pixels.copy_(torch.arange(pixels.shape[1], dtype=torch.float32) + len(items))
    return {"keys": [x["key"] for x in items], "pixels": pixels}
for MB in map(int, sys.argv[2:]):
    loader = stream.train_loader([(sys.argv[1], 1)], rank=0, world_size=1, num_workers=2, seed=0, micro_batch=4,
                                 encode=encode, collate=collate)
    try:
        for _ in range(12):  # each dropped at once: the default transport's batches hold /dev/shm while they live
            pixels = next(loader)["pixels"]
            assert torch.equal(pixels, torch.arange(pixels.shape[1], dtype=torch.float32).expand(4, -1) + 4)
        print(loader.stream.slabs.plain, len(loader.stream.slabs.mapped), flush=True)
    finally:
        loader.close()
"""


def test_a_64_mib_dev_shm_as_docker_gives_it(train_dir, tmp_path):
    """Docker's default /dev/shm (64 MiB), mounted for real in a mount namespace where the system allows one:
    5 MB batches (6 slots x 6.3 MB, twice over, do not fit) go the default way with one warning; 1 MB
    batches take the buffers."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user and mount namespaces here to mount a small /dev/shm in")
    script = tmp_path / "small_shm.py"
    script.write_text(_SMALL_SHM)
    env = {**os.environ, "PYTHONPATH": str(Path(stream.__file__).resolve().parents[2])}
    mount = "mount -t tmpfs -o size=64m tmpfs /dev/shm"
    run = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && {sys.executable} {script} {train_dir} 5 1"],
                         capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    (plain, mapped), (plain_small, mapped_small) = [map(int, line.split()) for line in run.stdout.splitlines()]
    assert (plain, mapped, plain_small) == (12, 0, 0) and mapped_small >= 2, run.stdout
    assert run.stderr.count("has no room") == 1, run.stderr[-3000:]


# --- elastic resume: other ranks or workers -------------------------------------------------------


def _pre_empt(sources, encode, *, world, workers, batches, mb=4, states=None):
    """Every rank of a (world x workers) run reads `batches` batches; (its keys by source, every rank's state)."""
    read, saved = {}, []
    for rank in range(world):
        loader = _loader(list(sources), rank=rank, world=world, workers=workers, mb=mb, encode=encode,
                         state=states)
        for b in _take(loader, batches):
            for key, source in zip(b["keys"], b["sources"]):
                read.setdefault(source, []).append(key)
        saved.append(json.loads(json.dumps(loader.state_dict())))
        loader.close()
    return read, saved


def _resume_readers(sources, encode, saved, *, world, workers, batches, mb=4):
    """Each reader of the new (world x workers) run: [(key, source)] in the order it read them, and the lengths of
    the rests it was dealt per source."""
    out = {}
    for rank in range(world):
        loader = _loader(list(sources), rank=rank, world=world, workers=workers, mb=mb, encode=encode, state=saved)
        assert loader.resplit is not None and loader.state_dict()["consumed"] == 0
        dealt = [[sum(e - s for _, s, e in d.get("rest", [])) for d in r["datasets"]] for r in loader.stream.states]
        for b in _take(loader, batches):
            role = b["worker"] if workers else 0
            out.setdefault((rank, role), ([], dealt[role]))[0].extend(zip(b["keys"], b["sources"]))
        loader.close()
    assert len(out) == world * max(1, workers)
    return out, loader.resplit


def _rests_read(readers, names) -> dict[str, list[str]]:
    """Per source: the keys each new reader read before it was done with the rest it was dealt."""
    got = {name: [] for name in names}
    for order, dealt in readers.values():
        for d, name in enumerate(names):
            mine = [key for key, source in order if source == name]
            assert len(mine) >= dealt[d]  # read far enough to be done with it
            got[name] += mine[: dealt[d]]
    return got


@pytest.mark.parametrize("old,new", [((2, 2), (1, 0)), ((1, 0), (2, 2)), ((2, 2), (3, 1)), ((1, 2), (1, 0))])
def test_elastic_resume_reads_the_rest_of_every_interrupted_pass_exactly_once(configs, train_dir, old, new):
    """Pre-empted mid-pass on one shape (ranks x workers), resumed on another: the samples read before, and those
    the new readers read first, are every sample of the data set once; then each new reader reads its share of
    the next epoch as a run of the new shape would."""
    sources, encode = configs["one"]
    all_keys = _tar_keys(train_dir)
    before, saved = _pre_empt(sources, encode, world=old[0], workers=old[1], batches=8 // old[0])
    name = Path(train_dir).name
    assert len(before[name]) == 32 and len(set(before[name])) == 32  # every old reader is inside its first pass
    per_reader = -(-(224 // (new[0] * max(1, new[1])) + 16) // 4)  # batches: its rest, then some of epoch 1
    readers, resplit = _resume_readers(sources, encode, saved, world=new[0], workers=new[1],
                                       batches=per_reader * max(1, new[1]))
    assert (resplit.world_size, resplit.workers, resplit.left) == (old[0], max(1, old[1]), [224])
    dealt = sorted(d[0] for _, d in readers.values())
    assert sum(dealt) == 224 and dealt[-1] - dealt[0] <= 1  # dealt evenly
    rest = _rests_read(readers, [name])[name]
    assert sorted(before[name] + rest) == sorted(all_keys)  # each sample of the interrupted passes exactly once
    # Then the usual split of the next epoch for the new shape: each reader reads its shards of epoch 1.
    key_shard = {k: p.name for p in map(Path, shard_paths(train_dir)) for k in _tar_keys_of(p)}
    shard_names = [p.name for p in map(Path, shard_paths(train_dir))]
    for (rank, role), (order, d) in readers.items():
        after = [key for key, _ in order[d[0]:]]
        mine = reader_shards(8, seed=0, dataset=0, epoch=1, rank=rank, world_size=new[0], role=role,
                             workers=max(1, new[1]))
        assert after and {key_shard[k] for k in after} <= {shard_names[s] for s in mine}


def _tar_keys_of(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name[: -len(".json")] for m in tar.getmembers() if m.name.endswith(".json")]


def test_elastic_resume_with_two_data_sets_and_a_second_change_inside_the_rest(configs, train_dir, vqa_dir):
    """Two data sets by weight, each with its own interrupted passes; a second change of shape while the first
    rest is being read: still every sample of the interrupted passes once, per data set."""
    sources, _ = configs["mix"]
    names = [Path(train_dir).name, Path(vqa_dir).name]
    before, saved = _pre_empt(sources, _encode, world=2, workers=2, batches=3)
    assert all(len(set(before[n])) == len(before[n]) for n in names) and len(before[names[1]]) < 64
    # One rank reads a little of the rest, is pre-empted again, and two ranks of one reader each take over.
    middle, saved = _pre_empt(sources, _encode, world=1, workers=0, batches=5, states=saved)
    assert saved[0]["readers"][0]["datasets"][0]["rest"]  # still inside the rest
    readers, resplit = _resume_readers(sources, _encode, saved, world=2, workers=0, batches=80)
    rests = _rests_read(readers, names)
    for d, n in enumerate(names):
        total = 256 if d == 0 else 64
        assert resplit.left[d] == total - len(before[n]) - len(middle.get(n, []))
        assert sorted(before[n] + middle.get(n, []) + rests[n]) == sorted(_tar_keys([train_dir, vqa_dir][d]))


def test_an_exact_resume_inside_the_rest_continues_with_the_next_batch(configs):
    sources, encode = configs["one"]
    _, saved = _pre_empt(sources, encode, world=2, workers=2, batches=4)
    whole = _loader(list(sources), encode=encode, state=saved)
    want = _take(whole, 30)
    whole.close()
    first = _loader(list(sources), encode=encode, state=saved)
    got = _take(first, 11)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["readers"][0]["datasets"][0]["rest"]
    got += _take(_loader(list(sources), encode=encode, state=state), 19)
    assert [b["keys"] for b in got] == [b["keys"] for b in want]


def test_elastic_states_that_disagree_or_a_damaged_rest_are_refused(configs):
    sources, encode = configs["one"]
    _, saved = _pre_empt(sources, encode, world=2, workers=0, batches=2)
    with pytest.raises(VloraError, match="disagree"):
        _loader(list(sources), state=[saved[0], saved[0]])
    with pytest.raises(VloraError, match="seed"):
        _loader(list(sources), seed=1, state=saved)
    _, mid = _pre_empt(sources, encode, world=1, workers=0, batches=1, states=saved)
    mid[0]["readers"][0]["datasets"][0]["rest"][0][2] = 10_000  # past the shard's end
    with pytest.raises(VloraError, match="'rest' is not a list"):
        next(_loader(list(sources), encode=encode, state=mid[0]))
