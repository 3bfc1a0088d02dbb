"""Shards -> batches, streamed with WebDataset: split by node, then by worker; shuffled by seed + epoch.

The training stream is endless (epoch after epoch), so every rank takes exactly `max_steps` steps however
its shards are sized; the run's length is counted in optimizer steps, not epochs. The held-out stream is
finite and deterministic: every rank reads the same samples in the same order and keeps every world-th one.
"""

from __future__ import annotations

import itertools
import random
from functools import partial
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlora.data.manifest import shard_paths
from vlora.errors import VloraError


def check_enough_shards(shard_dir: str, n_shards: int, world_size: int, num_workers: int) -> None:
    """Every rank's every worker needs a shard of its own; say so at start rather than crash inside a worker."""
    readers = world_size * max(1, num_workers)
    if n_shards < readers:
        raise VloraError(
            f"{shard_dir} has {n_shards} shard(s) but {world_size} rank(s) x {max(1, num_workers)} worker(s) "
            f"= {readers} readers need one each; repack with a smaller --shard-size or lower data.num_workers"
        )


def take_every(items, *, start: int, step: int):
    """This rank's shards: every `step`-th from `start` (rank and world size are explicit, not read from the env)."""
    return itertools.islice(items, start, None, step)


class TrainStream(IterableDataset):
    """Endless micro-batches for this rank; each DataLoader worker reads its own share of this rank's shards."""

    def __init__(
        self,
        urls: list[str],
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        micro_batch: int,
        encode: Callable[[dict], dict | None],
        collate: Callable[[list[dict]], dict],
    ):
        self.urls, self.rank, self.world_size, self.seed = urls, rank, world_size, seed
        self.shuffle_buffer, self.micro_batch = shuffle_buffer, micro_batch
        self.encode, self.collate = encode, collate

    def epoch(self, epoch: int) -> wds.WebDataset:
        order = list(self.urls)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)  # the same on every rank: the split is a partition
        worker = get_worker_info()
        # The sample shuffle differs per rank and worker (they hold different shards) but repeats run to run.
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker.id if worker else 0}")
        return (
            wds.WebDataset(
                order,
                shardshuffle=False,  # shuffled above, by seed + epoch, before the split
                nodesplitter=partial(take_every, start=self.rank, step=self.world_size),
                workersplitter=wds.split_by_worker,
                empty_check=False,  # check_enough_shards already guaranteed a shard per reader
            )
            .shuffle(self.shuffle_buffer, rng=rng)
        )

    def __iter__(self) -> Iterator[dict]:
        # A micro-batch may straddle two epochs: nothing is dropped at an epoch's end, every skip is reported.
        pending, skipped = [], 0
        for epoch in itertools.count():
            for sample in self.epoch(epoch):
                item = self.encode(sample)
                if item is None:
                    skipped += 1
                    continue
                pending.append(item)
                if len(pending) == self.micro_batch:
                    batch = self.collate(pending)
                    batch["skipped"] = skipped  # samples dropped since the previous batch of this worker
                    yield batch
                    pending, skipped = [], 0


def train_loader(shard_dir: str, *, rank: int, world_size: int, num_workers: int, seed: int, shuffle_buffer: int,
                 micro_batch: int, encode, collate) -> Iterator[dict]:
    urls = shard_paths(shard_dir)
    check_enough_shards(shard_dir, len(urls), world_size, num_workers)
    stream = TrainStream(urls, rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, micro_batch=micro_batch,
                         encode=encode, collate=collate)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
    return iter(loader)


def heldout_batches(shard_dir: str, *, rank: int, world_size: int, max_samples: int, micro_batch: int,
                    encode, collate) -> list[dict]:
    """This rank's share of the first `max_samples` held-out samples, as batches (small; kept in memory)."""
    every_rank_reads_all = wds.WebDataset(
        shard_paths(shard_dir), shardshuffle=False, nodesplitter=lambda urls: urls, empty_check=False
    )
    mine = (s for i, s in enumerate(itertools.islice(every_rank_reads_all, max_samples)) if i % world_size == rank)
    items = [x for x in map(encode, mine) if x is not None]
    return [collate(items[i : i + micro_batch]) for i in range(0, len(items), micro_batch)]
