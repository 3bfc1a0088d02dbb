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
