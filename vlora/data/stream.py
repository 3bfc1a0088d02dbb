"""Shards -> batches: an endless, seeded, weighted mix of shard sets whose position is a few integers.

Readers. Every rank runs `max(1, num_workers)` readers (its DataLoader workers, or the main process), each
playing one reader ROLE. For every data set and epoch, the shard list is permuted by (seed, data set, epoch),
the same permutation on every rank, and reader (rank, role) takes `perm[rank::world][role::workers]`: split by
node, then by worker, so each epoch partitions the data set's shards over all readers.

In-epoch order. A reader keeps up to `open_shards` of its shards open and takes each next sample from one of
them, chosen by a seeded RNG (per seed, data set, epoch, rank and role) with probability proportional to the
samples the shard has left; a shard that runs out is replaced by the reader's next one. Each shard is read
front to back with webdataset's own tar iteration. The choice depends only on integers (the manifest's
per-shard sample counts), so the whole order, and so the offset inside every open shard, follows from
(epoch, samples emitted in that epoch) by replaying RNG draws: no sample is read for it.

Mixing. Before each sample a reader picks the data set by weight with a seeded RNG (per seed, rank and role,
drawn in blocks, so draw number n is found without replaying the n before it). Every data set runs through
its own epochs, independently of the others.

Position. A reader's state is {"mix": draws, "datasets": [{"epoch": e, "emitted": n}, ...]} (plus "rest" while it
reads what an elastic resume dealt it, below). Each batch
carries its reader's state AFTER that batch (batch["stream"]); `Loader`, in the main process, keeps the
newest state per role and the count of consumed batches C. torch's DataLoader returns batches round-robin
from workers 0..W-1, starting at worker 0 for every new iterator, so global batch number g always comes from
role g % W: on resume worker w plays role (w + C) % W, with that role's shards and state, and the stream goes
on with exactly the batch that would have come next. Restoring replays integer draws only, then opens each
open shard at its offset by reading tar headers (no sample data) and seeking there.

Elastic resume. A run resumed on other ranks or workers gets every old rank's state (`train_loader(state=[...])`).
Per data set, the unread rest of each old reader's current pass (recovered by the same replay: its open shards'
unread ends, then the shards it had not opened) is cut into equal runs of (shard, first sample, end) pieces, one
per new reader (`resplit_states`). A reader reads its run first (interleaved like an epoch, as `rest` in its
state), then the epoch after the newest interrupted pass, split for the new shape: every sample of the rests is
read exactly once before the new readers' next pass.

The held-out stream is finite and deterministic: every rank reads the same samples in the same order and
keeps every world-th one.

Transport. A worker's batch tensors reach the trainer through shared-memory buffers that the worker reuses
batch after batch (Slabs), not through a new shared-memory segment per tensor and batch (torch's default),
whose page faults cost a worker about a third of its time with 448 x 448 images. The trainer copies a batch out
before its buffer may be written again: batches are bit for bit the collated ones. Where /dev/shm has no room
for the buffers (Docker's default 64 MB), batches go torch's default way, after one warning.

Balance. Readers are pulled at the same rate, so a reader whose share of an epoch is smaller (fewer shards, or
the short last shard) starts its next epoch sooner and its samples are seen more often. `train_loader` logs a
warning (rank 0) when the shares of the first BALANCE_EPOCHS epochs differ by more than BALANCE_TOLERANCE.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from vlora.data import remote
from vlora.data.manifest import read_manifest, shard_paths
from vlora.errors import VloraError

STATE_FORMAT = "vlora-stream/1"
OPEN_SHARDS = 4  # shards a reader interleaves at once
_MIX_BLOCK = 1024  # mixing draws generated per seeded block
BALANCE_EPOCHS = 4  # epochs whose per-reader shares the start-up balance check looks at
BALANCE_TOLERANCE = 0.10  # largest share over smallest share above 1 + this: a warning

log = logging.getLogger("vlora")


def check_enough_shards(shard_dir: str, n_shards: int, world_size: int, num_workers: int) -> None:
    """Every rank's every worker needs a shard of its own; say so at start rather than crash inside a worker."""
    readers = world_size * max(1, num_workers)
    if n_shards < readers:
        raise VloraError(
            f"{shard_dir} has {n_shards} shard(s) but {world_size} rank(s) x {max(1, num_workers)} worker(s) "
            f"= {readers} readers need one each; repack with a smaller --shard-size or lower data.num_workers"
        )


# --- sources ----------------------------------------------------------------------------------------


def _weight(text: str, entry: str) -> float:
    try:
        w = float(text)
    except ValueError:
        w = math.nan
    if not math.isfinite(w) or w <= 0:
        raise VloraError(f"data.train entry '{entry}': weight '{text}' is not a positive number (use DIR or DIR:WEIGHT)")
    return w


def parse_sources(spec) -> list[tuple[str, float]]:
    """'dirA:2,dirB:1' (or a list of 'DIR[:WEIGHT]' / (dir, weight)) -> [(dir, weight)]; weight defaults to 1."""
    if isinstance(spec, str):
        entries = spec.split(",")
    elif isinstance(spec, Sequence) and spec:
        entries = list(spec)
    else:
        raise VloraError(f"data.train must be 'DIR[:WEIGHT],DIR[:WEIGHT],...', got {spec!r}")
    out = []
    for entry in entries:
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            folder, weight = str(entry[0]).strip(), _weight(str(entry[1]), f"{entry[0]}:{entry[1]}")
        elif isinstance(entry, str):
            entry = entry.strip()
            folder, sep, tail = entry.rpartition(":")
            if not sep or (remote.is_remote(entry) and (not re.fullmatch(r"\s*[0-9.eE+-]+\s*", tail)
                                                        or re.fullmatch(r"https?://[^/]*", folder))):
                folder, weight = entry, 1.0  # a URL's own colons (s3://, host:port, pipe:) are not a weight
            else:
                weight = _weight(tail.strip(), entry)
                folder = folder.strip()
        else:
            raise VloraError(f"data.train entry {entry!r} is not 'DIR[:WEIGHT]'")
        if not folder:
            raise VloraError(f"data.train {spec!r} has an empty entry; write 'DIR[:WEIGHT],DIR[:WEIGHT]'")
        if not remote.is_remote(folder) and not Path(folder).is_dir():
            raise VloraError(f"data.train shard folder '{folder}' does not exist; run `vlora pack` or fix the path")
        if any(_same_folder(folder, f) for f, _ in out):
            raise VloraError(f"data.train lists '{folder}' twice; give each shard folder once, with one weight")
        out.append((folder, weight))
    return out


def _same_folder(a: str, b: str) -> bool:
    if remote.is_remote(a) or remote.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def check_sources(spec, world_size: int, num_workers: int) -> list[tuple[str, float]]:
    """parse_sources + every folder's manifest checked + enough shards per folder: for config validation at start."""
    sources = parse_sources(spec)
    for folder, _ in sources:
        check_enough_shards(folder, len(read_manifest(folder)["shards"]), world_size, num_workers)
    return sources


@dataclass(frozen=True)
class ShardSet:
    """One shard set of the mix: its shard paths and per-shard sample counts (from the manifest), and weight."""

    folder: str
    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    weight: float = 1.0
    content: str = ""  # hash of the manifest's shard sha256 list: a repack with other data changes it
    nbytes: tuple[int | None, ...] = ()  # each shard's size in bytes (the manifest's), if listed
    offsets: tuple[tuple[int, ...] | None, ...] = ()  # each sample's byte offset in its shard, if listed

    @classmethod
    def load(cls, folder: str, weight: float = 1.0) -> ShardSet:
        manifest = read_manifest(folder)
        shards = manifest["shards"]
        if not any(s["samples"] for s in shards):
            raise VloraError(f"{remote.redact(str(folder))}: its manifest.json lists no samples; pack some data into it")
        content = hashlib.sha256(json.dumps([s.get("sha256") for s in shards]).encode()).hexdigest()[:16]
        return cls(str(folder), tuple(shard_paths(folder, manifest)), tuple(s["samples"] for s in shards),
                   float(weight), content, tuple(s.get("bytes") for s in shards),
                   tuple(tuple(s["offsets"]) if s.get("offsets") is not None else None for s in shards))

    def shard(self, index: int) -> dict:
        """What opening shard `index` needs: url, samples, bytes and offsets (None where not listed)."""
        return {"url": self.urls[index], "size": self.sizes[index],
                "nbytes": self.nbytes[index] if self.nbytes else None,
                "starts": self.offsets[index] if self.offsets else None}

    def fingerprint(self) -> dict:
        return {"folder": remote.redact(self.folder), "shards": len(self.sizes), "samples": sum(self.sizes), "weight": self.weight,
                "content": self.content}


def global_reader(rank: int, world_size: int, role: int) -> int:
    """Reader (rank, role)'s index among all ranks x workers; its shards are perm[index :: readers].

    Every random choice of a reader is keyed by this index alone, so a reader's sample stream is the same
    whether the readers are ranks or workers: 2 ranks x 1 worker read exactly what 1 rank x 2 workers read
    (which is what makes "2 ranks == 1 rank with twice the accumulation" testable).
    """
    return rank + world_size * role


def _epoch_order(n_shards: int, seed: int, dataset: int, epoch: int) -> list[int]:
    order = list(range(n_shards))
    random.Random(f"vlora-stream/{seed}/{dataset}/{epoch}").shuffle(order)
    return order


def reader_shards(n_shards: int, *, seed: int, dataset: int, epoch: int, rank: int, world_size: int, role: int,
                  workers: int) -> list[int]:
    """Shard indices of reader (rank, role) in an epoch: one permutation for all ranks, split by node then worker."""
    return _epoch_order(n_shards, seed, dataset, epoch)[rank::world_size][role::workers]


def reader_shares(sizes: Sequence[int], *, seed: int, dataset: int, world_size: int, workers: int,
                  epochs: int = BALANCE_EPOCHS) -> list[list[int]]:
    """Samples per epoch of every reader (all ranks x workers, in (rank, role) order) for the first `epochs` epochs."""
    out = []
    for epoch in range(epochs):
        order = _epoch_order(len(sizes), seed, dataset, epoch)
        out.append([sum(sizes[s] for s in order[rank::world_size][role::workers])
                    for rank in range(world_size) for role in range(workers)])
    return out


def warn_if_unbalanced(source: ShardSet, dataset: int, *, seed: int, world_size: int, workers: int) -> str | None:
    """Log (and return) a warning when readers' per-epoch shares of `source` differ by more than BALANCE_TOLERANCE."""
    shares = reader_shares(source.sizes, seed=seed, dataset=dataset, world_size=world_size, workers=workers)
    lo, hi = min(min(e) for e in shares), max(max(e) for e in shares)
    if hi <= (1 + BALANCE_TOLERANCE) * lo:
        return None
    readers = world_size * workers
    often = f"up to {hi / lo:.2f}x as often" if lo else "far more often"
    msg = (f"{remote.redact(source.folder)}: its {len(source.sizes)} shard(s) give the {readers} readers ({world_size} rank(s) x {workers} "
           f"worker(s)) uneven epochs, {lo} to {hi} samples each; readers are pulled at the same rate, so samples of "
           f"the smaller shares are seen {often}. Repack with `vlora pack --shard-size N` so that the shards are many "
           f"(several per reader) and even")
    log.warning(msg)
    return msg


# --- one reader -------------------------------------------------------------------------------------


class Interleave:
    """The sample order of one reader's pass, as integers: which piece of which shard each next sample comes from.

    A pass is a list of pieces (shard, first sample, end): the reader's whole shards in an epoch, or, after an
    elastic resume, the parts of shards it was dealt from the interrupted passes. Up to `width` pieces are open;
    each draw picks one with probability proportional to its samples left, so the open pieces run out at about
    the same pace. An exhausted piece's slot goes to the next piece in line.
    """

    def __init__(self, pieces: Sequence[tuple[int, int, int]], width: int, rng: random.Random):
        self.pieces = [tuple(p) for p in pieces if p[2] > p[1]]
        self.rng = rng
        self.queued = 0  # pieces taken from the queue
        self.slots: list[list[int]] = []  # [piece index, samples taken]
        self.left = 0  # samples left in the open pieces
        while len(self.slots) < width and self.queued < len(self.pieces):
            self.slots.append(self._take())

    def _take(self) -> list[int]:
        shard, start, end = self.pieces[self.queued]
        self.queued += 1
        self.left += end - start
        return [self.queued - 1, 0]

    def upcoming(self) -> tuple[int, int] | None:
        """(shard, first sample) of the piece that will be opened next, if any is left in this pass."""
        return self.pieces[self.queued][:2] if self.queued < len(self.pieces) else None

    def step(self) -> tuple[int, int, int, bool]:
        """(piece index, shard, the sample's index in the shard, whether it was the piece's last sample)."""
        r = self.rng.randrange(self.left)
        for i, slot in enumerate(self.slots):
            _, start, end = self.pieces[slot[0]]
            rest = end - start - slot[1]
            if r < rest:
                break
            r -= rest
        index, taken = slot
        shard, start, end = self.pieces[index]
        slot[1] += 1
        self.left -= 1
        last = start + slot[1] == end
        if last:
            if self.queued < len(self.pieces):
                self.slots[i] = self._take()
            else:
                del self.slots[i]
        return index, shard, start + taken, last

    def remaining(self) -> list[tuple[int, int, int]]:
        """What this pass has not read yet, as pieces: the open pieces' unread ends, then those not yet opened."""
        opened = [(shard, start + taken, end) for index, taken in self.slots
                  for shard, start, end in [self.pieces[index]] if start + taken < end]
        return opened + self.pieces[self.queued:]


def _samples(url: str, fileobj) -> Iterator[dict]:
    """webdataset's own tar iteration (what WebDataset runs per shard): files -> samples grouped by key."""
    return tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream": fileobj}]))


def _sample_start(url: str, index: int) -> tuple[int, str] | None:
    """(byte offset of the header that starts sample `index`, its key), read from tar headers only.

    Counts samples the way webdataset groups them (regular files, meta files skipped, a new key = a new
    sample). None when the tar cannot be scanned this way (e.g. compressed): the caller reads through instead.
    """
    try:
        tar = tarfile.open(url, "r:")
    except tarfile.ReadError:
        return None
    with tar:
        current, count = None, -1
        for info in tar:  # seeks from header to header: no member's data is read
            name = info.name
            if not info.isreg() or re.match(r"__[^/]*__($|/)", name):
                continue
            if "/" not in name and name.startswith(tariterators.meta_prefix) and name.endswith(tariterators.meta_suffix):
                continue
            prefix, _ = tariterators.base_plus_ext(name)
            if prefix is None or prefix == current:
                continue
            current, count = prefix, count + 1
            if count == index:
                return info.offset, prefix
    raise VloraError(f"{url} holds {count + 1} samples but its manifest.json lists more; repack this shard folder")


class ShardReader:
    """One open shard, read sequentially; opened at any sample offset without reading the samples before it.

    `starts` (the manifest's per-sample byte offsets) says where sample `offset` begins: a local file seeks there,
    a remote one (vlora.data.remote) asks for bytes from there on. Without them (a folder packed by an older
    vlora) a local tar is scanned header by header, and a remote one is read through from its first byte.
    """

    def __init__(self, url: str, size: int, offset: int, *, nbytes: int | None = None,
                 starts: Sequence[int] | None = None, policy: remote.RetryPolicy | None = None):
        self.url, self.size, self.taken = url, size, offset
        self.expect = None  # the key the first sample must have, where a header scan found it
        start = 0 if offset == 0 else None  # the byte where sample `offset` begins, when known
        if offset and starts is not None:
            start = starts[offset]
        elif offset and not remote.is_remote(url):
            found = _sample_start(url, offset)
            if found is not None:
                start, self.expect = found
        elif offset:
            log.warning("%s: its manifest.json lists no sample offsets (packed by an older vlora), so resuming reads "
                        "its first %d samples again; repack the folder to resume without", remote.redact(url), offset)
        if remote.is_remote(url):
            if nbytes is None:
                raise VloraError(f"{remote.redact(url)}: its manifest.json lists no byte size; repack the folder")
            self.file = remote.open_shard(url, nbytes, start or 0, policy or remote.RetryPolicy())
        else:
            self.file = open(url, "rb")
            if start:
                self.file.seek(start)
        self.samples = _samples(url, self.file)
        if offset and start is None:  # not seekable: read through the prefix (no encode)
            for _ in range(offset):
                self._next()

    def _next(self) -> dict:
        try:
            sample = next(self.samples, None)
        except tarfile.TarError as e:
            raise VloraError(f"{remote.redact(self.url)}: not a readable tar from sample {self.taken} on ({e}); the "
                             "shard or its manifest.json's offsets changed: repack this shard folder") from None
        if sample is None:
            raise VloraError(f"{remote.redact(self.url)} ends early: its manifest.json lists {self.size} samples; repack "
                             "this shard folder")
        return sample

    def next(self) -> dict:
        sample = self._next()
        if self.expect is not None:
            if sample["__key__"] != self.expect:
                raise VloraError(f"{self.url}: resumed at sample {self.taken} but read key {sample['__key__']!r}, "
                                 f"expected {self.expect!r}")
            self.expect = None
        self.taken += 1
        if self.taken == self.size:
            if next(self.samples, None) is not None:
                raise VloraError(f"{remote.redact(self.url)} holds more than the {self.size} samples its manifest.json "
                                 "lists; repack")
            self.close()
        return sample

    def close(self) -> None:  # idempotent: a piece that ends before its shard does is closed by its reader
        self.samples.close()
        self.file.close()


class DatasetReader:
    """One reader's endless passes over one data set: position = (epoch, emitted), plus `rest` while it reads what
    an elastic resume dealt it from the interrupted passes (then `epoch` is the epoch that follows)."""

    def __init__(self, source: ShardSet, index: int, *, seed: int, rank: int, world_size: int, role: int, workers: int,
                 open_shards: int, epoch: int = 0, emitted: int = 0, rest: Sequence[Sequence[int]] | None = None,
                 policy: remote.RetryPolicy | None = None):
        self.source, self.index, self.seed, self.policy = source, index, seed, policy
        self.rank, self.world_size, self.role, self.workers, self.width = rank, world_size, role, workers, open_shards
        self.open: dict[int, ShardReader] = {}  # by piece index in the pass
        # A remote set keeps its next piece opened (its first bytes on the way) before an open one runs out.
        self.ahead: tuple[tuple[int, int], ShardReader] | None = None
        self.read_ahead = remote.is_remote(source.folder)
        self._start(epoch, _checked_rest(rest, source) if rest else None)
        if not 0 <= emitted <= self.pass_len:
            raise VloraError(f"data state for {remote.redact(source.folder)} says {emitted} samples into "
                             f"{'the rest of the interrupted passes' if self.rest else f'epoch {epoch}'}, but this "
                             f"reader's share of it has {self.pass_len}: the shard folder changed")
        for _ in range(emitted):  # integers only: recovers every open piece's offset
            self.plan.step()
        self.emitted = emitted

    def _epoch_shards(self, epoch: int) -> list[int]:
        return reader_shards(len(self.source.sizes), seed=self.seed, dataset=self.index, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, role=self.role, workers=self.workers)

    def _start(self, epoch: int, rest: list[tuple[int, int, int]] | None = None) -> None:
        reader = global_reader(self.rank, self.world_size, self.role)
        if rest:
            pieces, key = rest, f"vlora-stream/{self.seed}/{self.index}/{epoch}/rest/{reader}"
        else:
            pieces = [(s, 0, self.source.sizes[s]) for s in self._epoch_shards(epoch)]
            key = f"vlora-stream/{self.seed}/{self.index}/{epoch}/{reader}"
        self.epoch, self.rest = epoch, rest or None
        self.pass_len = sum(end - start for _, start, end in pieces)
        self.plan = Interleave(pieces, self.width, random.Random(key))

    @property
    def next_epoch(self) -> int:
        """The epoch this reader's next pass reads."""
        return self.epoch if self.rest else self.epoch + 1

    def next(self) -> dict:
        while self.emitted == self.pass_len:  # a share of only empty shards gives an empty pass
            self._close_open()  # all read; a piece opened ahead for the next pass stays
            self._start(self.next_epoch)
            self.emitted = 0
        index, shard, offset, last = self.plan.step()
        reader = self.open.get(index)
        if reader is None:
            reader = self.open[index] = self._open(shard, offset)
        sample = reader.next()
        if last:
            self.open.pop(index).close()
        self.emitted += 1
        return sample

    def _open(self, shard: int, offset: int) -> ShardReader:
        if self.ahead is not None and self.ahead[0] == (shard, offset):
            reader, self.ahead = self.ahead[1], None
        else:
            reader = ShardReader(**self.source.shard(shard), offset=offset, policy=self.policy)
        if self.read_ahead and self.ahead is None:
            upcoming = self.plan.upcoming()
            if upcoming is None:  # the pass's last pieces are open: the next epoch's first shard is the next to come
                order = self._epoch_shards(self.next_epoch)
                upcoming = next(((s, 0) for s in order if self.source.sizes[s] > 0), None)
            if upcoming is not None:
                self.ahead = (upcoming, ShardReader(**self.source.shard(upcoming[0]), offset=upcoming[1],
                                                    policy=self.policy))
        return reader

    def state(self) -> dict:
        out = {"epoch": self.epoch, "emitted": self.emitted}
        if self.rest:
            out["rest"] = [list(p) for p in self.rest]
        return out

    def remaining(self) -> list[tuple[int, int, int]]:
        """The unread rest of this reader's current pass, as (shard, first sample, end) pieces."""
        return self.plan.remaining()

    def _close_open(self) -> None:
        for reader in self.open.values():
            reader.close()
        self.open.clear()

    def close(self) -> None:
        self._close_open()
        if self.ahead is not None:
            self.ahead[1].close()
            self.ahead = None


def _checked_rest(rest, source: ShardSet) -> list[tuple[int, int, int]]:
    """A saved `rest` as pieces, each inside a shard of `source`; anything else is refused in one line."""
    def piece_ok(p) -> bool:
        return (isinstance(p, (list, tuple)) and len(p) == 3 and all(type(x) is int for x in p)
                and 0 <= p[0] < len(source.sizes) and 0 <= p[1] < p[2] <= source.sizes[p[0]])

    if not isinstance(rest, (list, tuple)) or not all(map(piece_ok, rest)):
        raise VloraError(f"data state for {remote.redact(source.folder)}: its 'rest' is not a list of [shard, first "
                         "sample, end] inside the shard folder's shards; the state is damaged or the folder changed")
    return [tuple(p) for p in rest]


class Mixer:
    """Which data set each next sample comes from: a seeded draw by weight; draw n is found without replay."""

    def __init__(self, weights: Sequence[float], key: str, draws: int = 0):
        self.cumulative = list(itertools.accumulate(weights))
        self.key, self.draws, self._block, self._values = key, draws, -1, []

    def pick(self) -> int:
        block, i = divmod(self.draws, _MIX_BLOCK)
        self.draws += 1
        if len(self.cumulative) == 1:
            return 0
        if block != self._block:
            rng = random.Random(f"{self.key}/{block}")
            self._block, self._values = block, [rng.random() for _ in range(_MIX_BLOCK)]
        u = self._values[i] * self.cumulative[-1]
        return min(bisect.bisect_right(self.cumulative, u), len(self.cumulative) - 1)


def _takes(fn: Callable, name: str) -> bool:
    """Whether `fn` has a parameter `name` (Collator.collate takes `empty`; a plain collate function need not)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or other callable without a signature
        return False


def fresh_reader_state(n_sources: int) -> dict:
    return {"mix": 0, "datasets": [{"epoch": 0, "emitted": 0} for _ in range(n_sources)]}


class TrainStream(IterableDataset):
    """Endless micro-batches of one rank; each DataLoader worker (or the main process) plays one reader role.

    `states[role]` is where each role starts; worker w plays role (w + role_offset) % workers.
    """

    def __init__(self, sources: Sequence[ShardSet], *, rank: int, world_size: int, num_workers: int, seed: int,
                 micro_batch: int, encode: Callable[[dict], dict | None], collate: Callable[[list[dict]], dict],
                 open_shards: int = OPEN_SHARDS, states: list[dict] | None = None, role_offset: int = 0,
                 policy: remote.RetryPolicy | None = None):
        self.sources, self.rank, self.world_size, self.seed = list(sources), rank, world_size, seed
        self.policy = policy or remote.RetryPolicy()
        self.workers, self.micro_batch, self.open_shards = max(1, num_workers), micro_batch, open_shards
        self.encode, self.collate = encode, collate
        self.states = states or [fresh_reader_state(len(self.sources)) for _ in range(self.workers)]
        self.role_offset = role_offset
        self.slabs: Slabs | None = None  # set by Loader before it starts workers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        if n != self.workers:
            raise RuntimeError(f"TrainStream was built for {self.workers} reader(s) per rank, runs on {n}")
        role = (worker + self.role_offset) % self.workers
        if info is None or self.slabs is None:
            yield from self.role_batches(role)
        else:
            empty = functools.partial(self.slabs.empty, worker) if _takes(self.collate, "empty") else None
            yield from (self.slabs.pack(batch, worker) for batch in self.role_batches(role, empty))

    def role_batches(self, role: int, empty: Callable | None = None) -> Iterator[dict]:
        """Role `role`'s batches; `empty(shape, dtype=)`, if given, is where `collate` makes its largest tensor."""
        state = self.states[role]
        readers = [
            DatasetReader(src, d, seed=self.seed, rank=self.rank, world_size=self.world_size, role=role,
                          workers=self.workers, open_shards=self.open_shards, policy=self.policy, **state["datasets"][d])
            for d, src in enumerate(self.sources)
        ]
        reader = global_reader(self.rank, self.world_size, role)
        mixer = Mixer([s.weight for s in self.sources], f"vlora-stream/{self.seed}/mix/{reader}", state["mix"])
        # A micro-batch may straddle epochs: nothing is dropped at an epoch's end, every skip is reported.
        pending, skipped = [], 0
        try:
            while True:
                item = self.encode(readers[mixer.pick()].next())
                if item is None:
                    skipped += 1  # still a step of the position: a resumed stream does not see it again
                    continue
                pending.append(item)
                if len(pending) == self.micro_batch:
                    batch = self.collate(pending) if empty is None else self.collate(pending, empty=empty)
                    batch["skipped"] = skipped  # samples dropped since this reader's previous batch
                    batch["stream"] = {"role": role, "state": {"mix": mixer.draws,
                                                               "datasets": [r.state() for r in readers]}}
                    yield batch
                    pending, skipped = [], 0
        finally:
            for r in readers:
                r.close()


# --- from the workers to the trainer ----------------------------------------------------------------

PREFETCH = 4  # batches each worker makes ahead of the trainer (the DataLoader's prefetch_factor)
# A worker has PREFETCH batches requested and not yet taken by the trainer (torch hands requests out round-robin,
# one per batch taken), plus the one the trainer has taken but not yet unpacked: PREFETCH + 1 slots in use at
# most, one more for slack. A slot's buffer is made when first needed, so unused slots cost nothing.
SLOTS = PREFETCH + 2
SHM = "/dev/shm"  # where torch's shared memory lives on Linux (shm_open)
_ALIGN = 64  # byte alignment of each tensor inside a buffer (vectorised kernels read it in place)
_SLAB = "__slab__"  # the batch key that carries (worker, slot, buffer, layout, key order) across


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    return buf[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(tuple(shape))


def _shm_room() -> int | None:
    """Free bytes in /dev/shm; None where there is none to ask (not Linux)."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Slabs:
    """Shared-memory buffers that carry a worker's batches to the trainer, each reused batch after batch.

    Why: a tensor that leaves a DataLoader worker is moved into a new shared-memory segment, whose pages the
    kernel allocates and zeroes on first touch, and which the trainer maps, faults in and unmaps again. For
    448 x 448 images (4.8 MB of fp32 pixel_values a sample) that cost a worker about a third of its time (2
    cores, measured with vlora.data.throughput). Instead each worker writes the contiguous tensors of a batch into
    one of its SLOTS buffers, the largest (pixel_values) in place as the collate makes it (`empty`). The
    trainer copies them out (or the DataLoader's pin-memory thread already has) and only then marks the slot
    free in `busy`, a small shared array made before the workers start: a worker never writes a slot the
    trainer may still read, and the trainer, which holds a step's micro-batches together, owns its copies.

    A batch that finds no free slot, tensors that cannot be packed (not contiguous), and every batch of a
    worker whose /dev/shm has no room (Docker's default is 64 MB) travel the default way: slower, never
    different. Unpacked tensors equal the collated ones in values, dtype, shape and strides. The buffers stay
    in /dev/shm while the workers live: 1.25 x a batch for each slot a worker has had in use at once, at most
    (PREFETCH + 1) x 1.25 x a batch a worker (120 MB for 4 samples of 448 x 448 in fp32, 60 MB in bf16).
    """

    def __init__(self, workers: int, slots: int = SLOTS):
        self.busy = torch.zeros(workers, slots, dtype=torch.uint8).share_memory_()
        self.warned = torch.zeros(1, dtype=torch.uint8).share_memory_()  # one /dev/shm warning for all workers
        self.own: dict[int, torch.Tensor] = {}  # in a worker: slot -> its buffer
        self.filling: list | None = None  # in a worker: [slot, bytes handed out, their offsets] for the next batch
        self.off = False  # in a worker: True when /dev/shm had no room for its buffers
        self.mapped: dict[tuple[int, int], torch.Tensor] = {}  # in the trainer: keeps each buffer mapped
        self.plain = 0  # in the trainer: batches that came the default way

    def _filling(self, worker: int) -> list | None:
        if self.off:
            return None
        if self.filling is None:
            free = (self.busy[worker] == 0).nonzero()
            self.filling = [int(free[0]), 0, set()] if len(free) else None
        return self.filling

    def _grow(self, slot: int, nbytes: int) -> torch.Tensor | None:
        """A new, larger buffer for `slot` (rarely: batches vary little in size; the slack also leaves room for
        the small tensors after the pixels), or None when /dev/shm cannot spare it: then the batch goes the
        default way, which needs /dev/shm too. So a worker starts using buffers only if /dev/shm can hold all
        its slots at this size twice over (room for the other workers and ranks), else never (one warning
        for all workers); a later growth needs room for itself twice over, else that batch goes the default way.
        """
        size = nbytes + nbytes // 4 + (1 << 16)
        need = size if self.own else size * self.busy.shape[1]
        room = _shm_room()
        try:
            if room is not None and room < 2 * need:
                raise RuntimeError(f"{room / 2**20:.0f} MiB free, {2 * need / 2**20:.0f} MiB wanted")
            # torch reserves the pages at once (posix_fallocate): a full /dev/shm raises here, never SIGBUS later
            buf = torch.empty(size, dtype=torch.uint8).share_memory_()
        except RuntimeError as e:
            self.off = not self.own
            if not self.warned.item():
                self.warned.fill_(1)
                log.warning("data workers: %s has no room for their batch buffers (%s); batches take torch's default "
                            "transport, slower (give Docker --shm-size=2g or more)", SHM, str(e).splitlines()[0])
            return None
        self.own[slot] = buf
        return buf

    def empty(self, worker: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """In a worker, while a batch is collated: an uninitialised tensor inside the buffer that will carry the
        batch, so that `pack` need not copy it; plain memory when no slot is free or a buffer cannot grow."""
        filling = self._filling(worker)
        nbytes = math.prod(shape) * dtype.itemsize
        if filling is None:
            return torch.empty(tuple(shape), dtype=dtype)
        slot, top, handed = filling
        buf = self.own.get(slot)
        if buf is None or buf.numel() < top + nbytes:
            # What was handed out stays where it is: only the first tensor of a batch may get a new buffer.
            buf = None if top else self._grow(slot, nbytes)
            if buf is None:
                return torch.empty(tuple(shape), dtype=dtype)
        filling[1] = top + _aligned(nbytes)
        handed.add(top)
        return _view(buf, top, dtype, shape)

    def pack(self, batch: dict, worker: int) -> dict:
        """In a worker: `batch` with its contiguous CPU tensors in a free slot's buffer (copied there unless
        `empty` made them there), or `batch` as it is."""
        filling, self.filling = self._filling(worker), None
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"
                   and v.is_contiguous() and not v.requires_grad}
        if not tensors or filling is None:
            return batch
        slot, used, handed = filling
        buf = self.own.get(slot)
        storage = buf.untyped_storage().data_ptr() if buf is not None else None
        inside = {k: t.storage_offset() * t.element_size() for k, t in tensors.items()
                  if t.untyped_storage().data_ptr() == storage}
        inside = {k: offset for k, offset in inside.items() if offset in handed}  # made by `empty` for this batch
        layout = [(k, inside[k], t.dtype, tuple(t.shape)) for k, t in tensors.items() if k in inside]
        for key, t in tensors.items():
            if key not in inside:
                layout.append((key, used, t.dtype, tuple(t.shape)))
                used += _aligned(t.nbytes)
        if buf is None or buf.numel() < used:
            grown = self._grow(slot, used)
            if grown is None:  # what `empty` placed in the slot must not travel in it unmarked: copy it out
                return {k: v.clone() if k in inside else v for k, v in batch.items()}
            buf, inside = grown, {}  # a new buffer: everything is copied into it
        for key, offset, dtype, shape in layout:
            if key not in inside:
                _view(buf, offset, dtype, shape).copy_(tensors[key])
        self.busy[worker, slot] = 1  # after the writes: from here on the slot is the trainer's
        rest = {k: v for k, v in batch.items() if k not in tensors}
        return {**rest, _SLAB: (worker, slot, buf[:used], layout, list(batch))}

    def unpack(self, batch: dict) -> dict:
        """In the trainer: the batch as collated, in memory of its own, and its slot released."""
        if _SLAB not in batch:
            self.plain += 1
            return batch
        worker, slot, buf, layout, order = batch.pop(_SLAB)
        if buf.is_shared():  # the worker's own pages: copy out, so that it may reuse them
            self.mapped[worker, slot] = buf  # a mapped buffer is not mapped again for its next batch
            tensors = {key: _view(buf, *spec).clone() for key, *spec in layout}
        else:  # already a copy, made by the DataLoader's pin-memory thread (the pinned pages are the batch's own)
            tensors = {key: _view(buf, *spec) for key, *spec in layout}
        self.busy[worker, slot] = 0  # after the copy
        return {key: tensors[key] if key in tensors else batch[key] for key in order}


# --- the main process's view ------------------------------------------------------------------------


def ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGTERM / SIGUSR1 to the training process. torchrun and Slurm signal the whole process
    group; a worker that died of it would fail the step that the trainer is finishing before it saves. The
    workers end when the trainer does (DataLoader shuts them down, and they watch their parent)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class Loader:
    """Iterator over one rank's micro-batches that knows the exact position of what it has handed out.

    `state_dict()` after any `next()` is JSON-serialisable and small; `train_loader(..., state=it)` continues with
    exactly the next batch.
    """

    def __init__(self, stream: TrainStream, *, num_workers: int, consumed: int = 0, header: dict):
        self.stream, self.consumed, self.header = stream, consumed, header
        self.resplit: Resplit | None = None  # what an elastic resume did with the data (train_loader sets it)
        self.readers = [dict(s) for s in stream.states]
        # A generator of its own: starting the workers then draws nothing from the global RNG, whose state
        # (LoRA dropout) a resumed run restores and must find untouched.
        self._loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                  pin_memory=torch.cuda.is_available(),
                                  prefetch_factor=PREFETCH if num_workers > 0 else None,
                                  generator=torch.Generator().manual_seed(0),
                                  worker_init_fn=ignore_stop_signals)
        self._it = None

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict:
        if self._it is None:  # (re)start the readers where the consumed batches left them
            self.stream.states = [dict(r) for r in self.readers]
            self.stream.role_offset = self.consumed % self.stream.workers
            self.stream.slabs = Slabs(self._loader.num_workers) if self._loader.num_workers else None
            self._it = iter(self._loader)  # the workers start here, with the stream as it is now
        try:
            batch = next(self._it)
        except VloraError as e:  # from a worker: torch wraps the message in the worker's traceback
            raise VloraError(worker_error(str(e))) from None
        if self.stream.slabs is not None:
            batch = self.stream.slabs.unpack(batch)
        info = batch.pop("stream")
        expected = self.consumed % self.stream.workers
        if info["role"] != expected:
            raise RuntimeError(f"batch {self.consumed} came from reader role {info['role']}, expected {expected}: "
                               "the DataLoader did not return batches round-robin, the position would be wrong")
        self.readers[info["role"]] = info["state"]
        self.consumed += 1
        return batch

    def state_dict(self) -> dict:
        """This rank's data position: where every reader role goes on, and how many batches were consumed."""
        return {**self.header, "consumed": self.consumed,
                "readers": [{"mix": r["mix"], "datasets": [dict(d) for d in r["datasets"]]} for r in self.readers]}

    def close(self) -> None:
        """Stop the workers now. Left to the iterator's finaliser, they could outlive it until interpreter exit,
        where multiprocessing stops daemon processes with SIGTERM, which workers ignore (ignore_stop_signals),
        and then waits for them forever."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.stream.slabs = None  # the workers' buffers are unmapped with them


def worker_error(text: str) -> str:
    """The one-line message of a VloraError raised in a DataLoader worker (torch re-raises it with the worker's
    traceback as its text: "Caught VloraError in DataLoader worker process 0. Original Traceback ... Error: MSG")."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split("VloraError: ", 1)[1] if "VloraError: " in last else last
    return text


def _check_state(state: dict, header: dict, n_sources: int, *, same_readers: bool = True) -> None:
    """A saved rank's data state fits this run: format, seed, open_shards and shard folders always; with
    `same_readers` (an exact resume) the rank, world size and readers per rank as well."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise VloraError(f"data-stream state has format {state.get('format') if isinstance(state, dict) else None!r}, "
                         f"expected {STATE_FORMAT!r}; start the data stream afresh (state=None)")
    keys = (("rank", "rank"), ("world_size", "world size"), ("workers", "readers per rank (data.num_workers)"))
    for key, what in (keys if same_readers else ()) + (("seed", "seed (run.seed)"), ("open_shards", "open_shards")):
        if state.get(key) != header[key]:
            raise VloraError(f"data-stream state was saved with {what} {state.get(key)}, this run has {header[key]}; "
                             "a resume needs the same seed, open_shards and shard folders (and, for an exact one, "
                             "the same ranks and workers)")
    saved, now = state.get("sources"), header["sources"]
    if not isinstance(saved, list) or len(saved) != len(now) or any(
            not isinstance(a, dict) or (a.get("shards"), a.get("samples")) != (b["shards"], b["samples"])
            for a, b in zip(saved, now)):
        raise VloraError(f"data-stream state was saved for sources {saved}, this run reads {now}: the shard folders "
                         "changed, so the saved position means nothing; start the data stream afresh")
    for a, b in zip(saved, now):
        # A state saved before the content hash existed has none: the counts above are all it can be checked by.
        if a.get("content") is not None and a["content"] != b["content"]:
            raise VloraError(f"data-stream state was saved for other data in {b['folder']} (shard hashes {a['content']}, now "
                             f"{b['content']}): the shard folder was repacked, so the saved position means nothing; "
                             "restore the old shards or start the data stream afresh")
    readers = state.get("readers")

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    def reader_ok(r) -> bool:
        ds = r.get("datasets") if isinstance(r, dict) else None
        return (count(r.get("mix")) and isinstance(ds, list) and len(ds) == n_sources
                and all(isinstance(d, dict) and count(d.get("epoch")) and count(d.get("emitted")) for d in ds))

    if not count(state.get("consumed")) or not isinstance(readers, list) or not count(state.get("workers")) \
            or len(readers) != state["workers"] or not all(map(reader_ok, readers)):
        raise VloraError("data-stream state is damaged (consumed / readers); start the data stream afresh")


@dataclass
class Resplit:
    """What an elastic resume did with the data: the readers before and the samples of their passes left."""

    world_size: int  # ranks that wrote the states
    workers: int  # readers per rank then
    left: list[int]  # per data set: unread samples of the interrupted passes, now dealt over the new readers


def resplit_states(saved: list[dict], sources: Sequence[ShardSet], header: dict) -> tuple[list[dict], Resplit]:
    """Reader states for every reader of this run (by global reader index) from the states of every rank of a run
    with other ranks or workers.

    Per data set, the unread rest of each old reader's current pass (its open shards' unread ends, then the
    shards it had not opened) is listed in old-reader order and cut into as many contiguous runs of equal length
    (to one sample) as there are new readers: reader j reads run j first, then starts the epoch after the
    newest of the interrupted passes with the usual split for this run. Every sample of the rests is read
    exactly once (a run is a list of (shard, first sample, end) pieces, which a reader opens at their first
    sample without reading what comes before).
    """
    old_world = len(saved)
    for rank, state in enumerate(saved):
        _check_state(state, header, len(sources), same_readers=False)
        if state["rank"] != rank or state["world_size"] != old_world or state["workers"] != saved[0]["workers"]:
            raise VloraError(f"the data-stream states of a checkpoint disagree (rank {rank} of {old_world} says rank "
                             f"{state['rank']} of {state['world_size']} with {state['workers']} reader(s)); the "
                             "checkpoint is damaged")
    old_workers = saved[0]["workers"]
    old = [(rank, role, saved[rank]["readers"][role]) for role in range(old_workers) for rank in range(old_world)]
    new_readers = header["world_size"] * header["workers"]
    mix = max(r["mix"] for _, _, r in old)  # draws on, so a reader's mix does not repeat one it made already
    states = [{"mix": mix, "datasets": []} for _ in range(new_readers)]
    left = []
    for d, source in enumerate(sources):
        pieces, next_epoch = [], 0
        for rank, role, reader in old:  # global reader order: rank + world * role
            replay = DatasetReader(source, d, seed=header["seed"], rank=rank, world_size=old_world, role=role,
                                   workers=old_workers, open_shards=header["open_shards"], **reader["datasets"][d])
            pieces += replay.remaining()
            next_epoch = max(next_epoch, replay.next_epoch)
        runs = _deal(pieces, new_readers)
        for state, run in zip(states, runs):
            state["datasets"].append({"epoch": next_epoch, "emitted": 0, **({"rest": run} if run else {})})
        left.append(sum(end - start for _, start, end in pieces))
    return states, Resplit(old_world, old_workers, left)


def _deal(pieces: list[tuple[int, int, int]], readers: int) -> list[list[list[int]]]:
    """`pieces` cut into `readers` contiguous runs whose sample counts differ by at most one."""
    total = sum(end - start for _, start, end in pieces)
    bounds = [j * total // readers for j in range(1, readers + 1)]  # where run j ends
    runs: list[list[list[int]]] = [[] for _ in range(readers)]
    j = done = 0
    for shard, start, end in pieces:
        while start < end:
            while done >= bounds[j]:
                j += 1
            take = min(end - start, bounds[j] - done)
            runs[j].append([shard, start, start + take])
            start, done = start + take, done + take
    return runs


def train_loader(sources, *, rank: int, world_size: int, num_workers: int, seed: int, micro_batch: int, encode,
                 collate, state: dict | list[dict] | None = None, open_shards: int = OPEN_SHARDS,
                 policy: remote.RetryPolicy | None = None) -> Loader:
    """This rank's endless micro-batches from `sources` ([(dir, weight)], see parse_sources), from `state` if given:
    this rank's saved state (an exact resume: the same ranks and workers), or the list of every rank's saved
    states of a run with other ranks or workers (an elastic resume: `resplit_states`; `Loader.resplit` says what
    it did).

    Batches are `collate`'s dicts plus batch["skipped"] (samples `encode` rejected since the previous batch of
    the same reader). Changing weights or micro_batch on resume is allowed (the sample streams are the same);
    changing the seed, open_shards or shard folders is refused.
    """
    if isinstance(sources, str):
        sources = parse_sources(sources)
    loaded = [ShardSet.load(folder, weight) for folder, weight in sources]
    for src in loaded:
        check_enough_shards(src.folder, len(src.sizes), world_size, num_workers)
    workers = max(1, num_workers)
    if rank == 0:  # every rank would compute the same: say it once
        for d, src in enumerate(loaded):
            warn_if_unbalanced(src, d, seed=seed, world_size=world_size, workers=workers)
    header = {"format": STATE_FORMAT, "rank": rank, "world_size": world_size, "workers": workers, "seed": seed,
              "open_shards": open_shards, "sources": [s.fingerprint() for s in loaded]}
    consumed, states, resplit = 0, None, None
    if isinstance(state, list):
        every_reader, resplit = resplit_states(state, loaded, header)
        states = [every_reader[global_reader(rank, world_size, role)] for role in range(workers)]
    elif state is not None:
        _check_state(state, header, len(loaded))
        consumed, states = state["consumed"], state["readers"]
    stream = TrainStream(loaded, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
                         micro_batch=micro_batch, encode=encode, collate=collate, open_shards=open_shards,
                         states=states, role_offset=consumed % workers, policy=policy)
    loader = Loader(stream, num_workers=num_workers, consumed=consumed, header=header)
    loader.resplit = resplit
    return loader


def read_samples(shard_dir: str, max_samples: int, policy: remote.RetryPolicy | None = None) -> Iterator[dict]:
    """The first `max_samples` samples of a shard folder (or URL), in manifest order, as webdataset dicts."""
    source = ShardSet.load(shard_dir)
    left = max_samples
    for index in range(len(source.urls)):
        if left <= 0 or not source.sizes[index]:
            continue
        reader = ShardReader(**source.shard(index), offset=0, policy=policy)
        try:
            for _ in range(min(left, source.sizes[index])):
                yield reader.next()
                left -= 1
        finally:
            reader.close()


def heldout_batches(shard_dir: str, *, rank: int, world_size: int, max_samples: int, micro_batch: int,
                    encode, collate, policy: remote.RetryPolicy | None = None) -> list[dict]:
    """This rank's share of the first `max_samples` held-out samples, as batches (small; kept in memory)."""
    every_rank_reads_all = read_samples(shard_dir, max_samples, policy)
    mine = (s for i, s in enumerate(every_rank_reads_all) if i % world_size == rank)
    items = [x for x in map(encode, mine) if x is not None]
    return [collate(items[i : i + micro_batch]) for i in range(0, len(items), micro_batch)]
