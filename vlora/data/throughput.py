"""How fast the training stream feeds one rank: samples/s in the main process and with N data workers.

`loader_throughput` runs the stream that training runs (`train_loader` with a `Collator`'s encode and collate,
as vlora.train's `_build_data` wires them) and reports, per worker count, samples/s, samples/s per worker, the CPU a sample
costs the processes that make it (and so samples/s per core, which other load on the machine barely moves)
and the trainer that receives it, and the bytes per sample that cross from a worker to the trainer.
`workers_needed` turns that into the data workers one GPU needs (`vlora bench` prints both). `make_jpeg_shards` writes a small, seeded set
of real JPEG image-text records and packs them with `vlora pack`'s packer, so that the number is reproducible.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import time
from pathlib import Path

import torch

# Words of the demo's world (vlora.data.synth): all in the tiny model's vocabulary, so the text costs about as
# many tokens per word there as real text does in Qwen's.
_WORDS = ("a", "the", "small", "large", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square",
          "triangle", "on", "left", "right", "top", "bottom", "of", "image", "picture", "shape", "shapes", "two",
          "three", "four", "and", "is", "are", "in", "at", "grey", "white", "black", "background", "corner")


def _jpeg(rng: random.Random, size: int, quality: int) -> bytes:
    """A photo-like image: a smooth colour gradient, a few shapes and sensor-like noise (JPEG decodes it at the
    cost of a real photo; flat synthetic images decode several times faster)."""
    from PIL import Image, ImageDraw, ImageFilter

    g = torch.Generator().manual_seed(rng.randrange(2**31))
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([c0 + (c1 - c0) * (x if k % 2 else y) for k, (c0, c1) in
                        enumerate((rng.random(), rng.random()) for _ in range(3))], dim=-1) * 255
    noise = torch.randn(size, size, 3, generator=g) * 12
    img = Image.fromarray((base + noise).clamp(0, 255).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        box = (x0, y0, x0 + rng.randrange(8, size // 2), y0 + rng.randrange(8, size // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buf = io.BytesIO()
    img.filter(ImageFilter.GaussianBlur(0.6)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_jpeg_shards(out_dir, n: int, *, size: int = 448, words: int = 200, seed: int = 0, shard_size: int = 16,
                     quality: int = 90) -> Path:
    """Write `n` seeded image-text records (one size x size JPEG, a question and a `words`-word answer each) to
    out_dir/src and pack them into out_dir/train (shards of `shard_size`); returns the shard folder.

    At 448 x 448 (256 image tokens at data.max_pixels' default) and 200 words (about 250 text tokens with the
    tiny model's tokenizer), a sample is the 512-token sample the loader is sized for.
    """
    from vlora.data.pack import DEFAULT_MAX_PIXELS, pack

    out = Path(out_dir)
    (out / "src" / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"vlora-throughput/{seed}")
    lines = []
    for i in range(n):
        name = f"images/{i:06d}.jpg"
        (out / "src" / name).write_bytes(_jpeg(rng, size, quality))
        answer = " ".join(rng.choice(_WORDS) for _ in range(words))
        lines.append(json.dumps({"id": f"jpeg-{i:06d}", "images": [name], "messages": [
            {"role": "user", "content": "<image>Describe the image in detail."},
            {"role": "assistant", "content": answer.capitalize() + "."}]}))
    (out / "src" / "train.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    pack(out / "src" / "train.jsonl", out / "train", shard_size=shard_size,
         max_pixels=max(DEFAULT_MAX_PIXELS, size * size))
    return out / "train"


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process (Linux /proc); None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def shipped_bytes(batch: dict) -> int:
    """Bytes of the tensors' storages in a batch: what a worker hands the trainer through shared memory (a view
    ships its whole storage; the rest of the batch is a few pickled integers and strings)."""
    seen, total = set(), 0
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _read(batch: dict) -> None:
    """Read every tensor of the batch once, as a training step's copy to the device would: pages of shared
    memory that a worker filled cost the reader when first touched, and belong in the trainer's time."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.numel():
            value.reshape(-1).view(torch.uint8).max()


def _timed(loader, n_batches: int) -> dict:
    """Take n_batches; samples, tokens, shipped bytes, seconds, CPU seconds of the trainer (this process), of
    its reads (part of that) and of the workers (None if unreadable)."""
    out = {"samples": 0, "tokens": 0, "bytes": 0, "read_s": 0.0}
    workers = [w.pid for w in getattr(loader._it, "_workers", [])]
    cpu0, t0 = [_cpu_seconds(pid) for pid in workers], time.perf_counter()
    main0 = time.process_time()
    for batch in itertools.islice(loader, n_batches):
        out["samples"] += batch["n_samples"]
        out["tokens"] += batch["n_tokens"]
        out["bytes"] += shipped_bytes(batch) if workers else 0
        r0 = time.process_time()
        _read(batch)
        out["read_s"] += time.process_time() - r0
    out["main_s"], out["seconds"] = time.process_time() - main0, time.perf_counter() - t0
    cpu1 = [_cpu_seconds(pid) for pid in workers]
    out["workers_s"] = None if None in cpu0 + cpu1 else sum(cpu1) - sum(cpu0)
    return out


def loader_throughput(shards_dir, collator, *, workers: list[int], samples: int, micro_batch: int,
                      seed: int = 0) -> list[dict]:
    """Measure the training stream over `shards_dir`, made by `collator` (a vlora.data.collate.Collator built as
    training builds it), for each worker count in `workers` (0 = in the main process).

    Each row: workers; samples timed; seconds; samples_s; per_worker (samples_s over the worker count, or over 1
    in the main process); reader_cpu_ms (CPU ms a sample costs the processes that read, encode and collate it:
    the main process for 0 workers, else the workers together) and so per_core (1000 / reader_cpu_ms: samples/s
    of one fully used core, which other load on the machine barely moves) and vs_main (per_core over the main
    process's, where `workers` has a 0); trainer_cpu_ms (what receiving a sample and reading its tensors once
    costs the main process); bytes_per_sample (tensor bytes crossing from a worker; 0 in the main process);
    tokens_per_sample. Worker CPU is None without /proc. The first batches (worker start-up, the prefetch queue
    filling) are not timed. The main process runs one torch thread meanwhile, as every DataLoader worker does:
    idle threads spinning beside a busy core would count as the main process's work, not a worker's.
    """
    from vlora.data.stream import PREFETCH, train_loader

    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in workers:
            loader = train_loader([(str(shards_dir), 1.0)], rank=0, world_size=1, num_workers=n, seed=seed,
                                  micro_batch=micro_batch, encode=collator.encode, collate=collator.collate)
            try:
                # Until every worker's prefetched batches are taken, batches come faster than they are made.
                for _ in itertools.islice(loader, 1 + PREFETCH * n):
                    pass
                rows.append(_row(n, _timed(loader, max(1, samples // micro_batch))))
            finally:
                loader.close()
    finally:
        torch.set_num_threads(threads)
    main = next((r["per_core"] for r in rows if r["workers"] == 0), None)
    for r in rows:
        r["vs_main"] = r["per_core"] / main if main and r["per_core"] else None
    return rows


def _row(n: int, t: dict) -> dict:
    k = 1e3 / t["samples"]
    if n == 0:  # the main process does both: its reads are the trainer's part
        reader_ms, trainer_ms = (t["main_s"] - t["read_s"]) * k, t["read_s"] * k
    else:
        reader_ms, trainer_ms = None if t["workers_s"] is None else t["workers_s"] * k, t["main_s"] * k
    rate = t["samples"] / t["seconds"]
    return {"workers": n, "samples": t["samples"], "seconds": t["seconds"], "samples_s": rate,
            "per_worker": rate / max(1, n), "reader_cpu_ms": reader_ms,
            "per_core": 1e3 / reader_ms if reader_ms else None, "trainer_cpu_ms": trainer_ms,
            "bytes_per_sample": t["bytes"] / t["samples"], "tokens_per_sample": t["tokens"] / t["samples"]}


def workers_needed(rows: list[dict], samples_s: float) -> int | None:
    """Data workers (a core each) that make `samples_s` at the per-core speed measured with workers; None if
    no row with workers has its CPU time."""
    timed = [r for r in rows if r["workers"] and r["reader_cpu_ms"]]
    if not timed:
        return None
    ms = sum(r["reader_cpu_ms"] * r["samples"] for r in timed) / sum(r["samples"] for r in timed)
    return math.ceil(samples_s * ms / 1e3)


def format_throughput(rows: list[dict], targets: tuple[float, ...] = (25.0, 40.0)) -> str:
    """The rows as a table, one line per worker count, then the workers each of `targets` samples/s needs."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = [f"{'workers':>7} {'samples/s':>9} {'/worker':>7} {'/core':>6} {'vs main':>7} {'cpu ms':>6} "
             f"{'trainer ms':>10} {'MB/sample':>9} {'tokens':>6}"]
    for r in rows:
        lines.append(f"{r['workers']:>7} {r['samples_s']:9.1f} {r['per_worker']:7.1f} {num(r['per_core'], '6.1f'):>6} "
                     f"{pct(r.get('vs_main')):>7} {num(r['reader_cpu_ms'], '6.1f'):>6} "
                     f"{r['trainer_cpu_ms']:10.1f} {r['bytes_per_sample'] / 1e6:9.2f} {r['tokens_per_sample']:6.0f}")
    for target in targets:
        need = workers_needed(rows, target)
        if need is not None:
            lines.append(f"{target:g} samples/s need {need} data worker(s), a core each")
    return "\n".join(lines)
