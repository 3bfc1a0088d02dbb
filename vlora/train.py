"""The training loop, top to bottom: config -> world -> model + data -> steps -> adapter.

One optimizer step = `grad_accum` micro-batches on every rank. Before the forward passes, the step's supervised
tokens are counted over all micro-batches and ranks; each micro-batch's summed loss is divided by that count,
so the gradient is the mean over every supervised token of the step, whatever the accumulation or world size.
Gradients are synchronised (DDP all-reduce) only on the last micro-batch.

Run it as `torchrun --nproc_per_node N train.py --config FILE key=value ...` or, for one process, `python train.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch

from vlora.config import Config, Plan, load_config, save_config, to_dict, validate
from vlora.distributed import World, all_reduce_sum, barrier, cleanup, init_distributed, world_size_from_env
from vlora.errors import VloraError
from vlora.metrics import Metrics, log, peak_memory_gib, setup_logging


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}




@torch.no_grad()
def evaluate(loss_fn, batches: list[dict], world: World, precision) -> float:
    """Mean held-out loss per supervised token over all ranks' shares of the held-out set."""
    loss_fn.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=world.device)
    for batch in batches:
        with precision.autocast():
            sums[0] += loss_fn(to_device(batch, world.device)).double()
        sums[1] += batch["loss_index"].numel()
    all_reduce_sum(sums)
    loss_fn.train()
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


class Trace:
    """Per-rank files for replica and data-order checks (`run.param_digest`, `run.trace_keys`); off by default."""

    def __init__(self, run_dir, rank: int, *, digests: bool, keys: bool):
        self.files = {}
        for name, on in (("digests", digests), ("keys", keys)):
            if on:
                (run_dir / name).mkdir(exist_ok=True)
                self.files[name] = open(run_dir / name / f"rank{rank}.jsonl", "a")

    def write(self, name: str, record: dict) -> None:
        if name in self.files:
            self.files[name].write(json.dumps(record) + "\n")
            self.files[name].flush()

    @property
    def digests(self) -> bool:
        return "digests" in self.files

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def param_digest(params: list[torch.Tensor]) -> str:
    """A hash of the trainable weights' bytes: equal on every rank iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(cfg: Config, plan: Plan) -> dict:
    """Train under the current process group (or alone) and return what tests and the demo report."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vlora.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
    from vlora.data.collate import Collator
    from vlora.data.stream import heldout_batches, parse_sources, train_loader
    from vlora.model import SupervisedLoss, build_model, load_processor, save_adapter
    from vlora.optim import build_optimizer, lr_at, resolve_compute_dtype, resolve_precision, set_lr

    # ---- world, precision, run folder ----
    world = init_distributed(cfg.run.dist_timeout_s)
    setup_logging(world.rank, world.size)
    precision = resolve_precision(cfg, world.device)
    compute_dtype = resolve_compute_dtype(cfg, precision)
    run_dir = cfg.run_dir
    if world.is_main:
        if cfg.run.overwrite and run_dir.is_dir():
            shutil.rmtree(run_dir)  # validate() refused a used folder unless the user asked for this
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    barrier()
    resume_from = resolve_resume(run_dir, cfg.run.resume)
    log.info("world %d | device %s | precision %s | 4-bit %s | grad_accum %d | global batch %d",
             world.size, world.device, precision.name, cfg.model.quant, plan.grad_accum, cfg.optim.global_batch)

    # ---- model: the same seed on every rank gives the same LoRA init; dropout then differs per rank ----
    torch.manual_seed(cfg.run.seed)
    processor = load_processor(cfg.model.path)
    peft_model = build_model(cfg, world.device, compute_dtype)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    n_train, n_total = peft_model.get_nb_trainable_parameters()  # counts 4-bit weights at their real size
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{n_train:,}", f"{n_total:,}", 100 * n_train / n_total)
    torch.manual_seed(cfg.run.seed + world.rank)
    loss_fn = SupervisedLoss(peft_model)
    net = loss_fn
    if world.distributed:
        # DDP would broadcast every frozen weight from rank 0 at start (the whole 4-bit base, across nodes) and
        # the constant buffers at every step; all ranks load them identically, so only what trains is its business.
        frozen = [n for n, p in loss_fn.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(loss_fn, frozen + [n for n, _ in loss_fn.named_buffers()])
        net = DDP(loss_fn, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                  broadcast_buffers=False, gradient_as_bucket_view=True)
    optimizer = build_optimizer(params, cfg.optim, world.device)
    scaler = precision.grad_scaler()

    # ---- resume: adapter, optimizer, step and this rank's data position ----
    start_step, skipped_before, data_state = 0, 0, None
    if resume_from is not None:
        train_state, rank_state = load_checkpoint(resume_from, world=world, peft_model=peft_model, optimizer=optimizer)
        start_step, skipped_before, data_state = train_state["step"], train_state["skipped_samples"], rank_state["data"]
        log.info("resumed from %s at step %d", resume_from, start_step)

    # ---- data ----
    collator = Collator(processor, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                        max_length=cfg.data.max_length, train_on=cfg.data.train_on, pixel_dtype=compute_dtype,
                        pack_length=cfg.data.pack_length)
    batches = train_loader(parse_sources(cfg.data.train), rank=world.rank, world_size=world.size,
                           num_workers=cfg.data.num_workers, seed=cfg.run.seed, micro_batch=cfg.optim.micro_batch,
                           encode=collator.encode, collate=collator.collate, state=data_state,
                           open_shards=cfg.data.open_shards)
    heldout = heldout_batches(cfg.data.val, rank=world.rank, world_size=world.size, max_samples=cfg.data.val_samples,
                              micro_batch=cfg.optim.micro_batch, encode=collator.encode,
                              collate=collator.collate) if cfg.data.val else []

    metrics = Metrics(run_dir, enabled=world.is_main, total_steps=cfg.optim.max_steps, progress=cfg.run.progress,
                      wandb_config=to_dict(cfg) if cfg.run.wandb else None)
    trace = Trace(run_dir, world.rank, digests=cfg.run.param_digest, keys=cfg.run.trace_keys)

    # Decided by the config, not by this rank's share: every rank must join evaluate()'s all-reduce,
    # also a rank whose share of the held-out set is empty.
    evaluating = bool(cfg.data.val)
    val_losses = {}
    if evaluating and start_step == 0:
        val_losses[0] = evaluate(loss_fn, heldout, world, precision)
        metrics.write({"step": 0, "val_loss": val_losses[0]})
        metrics.info(f"step     0 | held-out loss {val_losses[0]:.4f}")

    skipped = torch.full((), skipped_before, dtype=torch.float64, device=world.device)  # all ranks' too-long samples

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, world=world, peft_model=peft_model, optimizer=optimizer,
                        train_state={"skipped_samples": int(skipped)}, rank_state={"data": batches.state_dict()},
                        keep_last=cfg.run.keep_last)

    # ---- the loop ----
    loss_fn.train()  # from_pretrained returns eval mode: LoRA dropout and gradient checkpointing need train mode
    # Sums since the last log line; reading them (.item()) syncs with the device, so only on log steps.
    window_loss = torch.zeros((), dtype=torch.float64, device=world.device)
    window_counts = torch.zeros(2, dtype=torch.float64, device=world.device)  # supervised tokens, all tokens
    window_steps = 0
    window_start = time.perf_counter()
    for step in range(start_step, cfg.optim.max_steps):
        lr = lr_at(step, cfg.optim)
        set_lr(optimizer, lr)
        micro_batches = [next(batches) for _ in range(plan.grad_accum)]
        trace.write("keys", {"step": step + 1, "keys": [k for b in micro_batches for k in b["keys"]]})

        # The step's global counts, known before any forward: the loss divisor, the throughput numerator and
        # the samples skipped (too long) on every rank, in one all-reduce.
        counts = torch.tensor([sum(b["loss_index"].numel() for b in micro_batches),
                               sum(b["n_tokens"] for b in micro_batches),
                               sum(b.pop("skipped") for b in micro_batches)],
                              dtype=torch.float64, device=world.device)
        all_reduce_sum(counts)
        global_supervised = counts[0].clamp(min=1)

        for i, batch in enumerate(micro_batches):
            last = i == plan.grad_accum - 1
            # Non-final micro-batches accumulate locally; DDP all-reduces gradients once, on the last.
            sync_ctx = contextlib.nullcontext() if (last or not world.distributed) else net.no_sync()
            with sync_ctx:
                with precision.autocast():
                    loss_sum = net(to_device(batch, world.device))
                # DDP averages gradients over ranks; multiplying by world size turns that into a sum,
                # so the result is sum(loss) / global_supervised exactly.
                loss = loss_sum * (world.size / global_supervised)
                (scaler.scale(loss) if scaler else loss).backward()
            window_loss += loss_sum.detach()

        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window_steps += 1
        window_counts += counts[:2]
        skipped += counts[2]
        metrics.tick()
        if trace.digests:
            trace.write("digests", {"step": done, "digest": param_digest(params)})

        if done % cfg.run.log_every == 0 or done == cfg.optim.max_steps:
            all_reduce_sum(window_loss)
            elapsed = time.perf_counter() - window_start
            supervised, tokens = window_counts.tolist()
            metrics.step({
                "step": done, "loss": window_loss.item() / max(supervised, 1), "lr": lr,
                "grad_norm": grad_norm.item(), "tokens_per_s": tokens / elapsed,
                "samples_per_s": window_steps * cfg.optim.global_batch / elapsed,
                "peak_mem_gib": peak_memory_gib(world.device), "skipped_samples": int(skipped),
            })
            window_loss.zero_()
            window_counts.zero_()
            window_steps = 0
            window_start = time.perf_counter()

        if evaluating and cfg.run.eval_every and done % cfg.run.eval_every == 0 and done != cfg.optim.max_steps:
            val_losses[done] = evaluate(loss_fn, heldout, world, precision)
            metrics.write({"step": done, "val_loss": val_losses[done]})
            metrics.info(f"step {done:>5} | held-out loss {val_losses[done]:.4f}")
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done != cfg.optim.max_steps:
            checkpoint(done)

    # ---- the end: evaluate, save, report ----
    last_step = cfg.optim.max_steps
    if evaluating:
        val_losses[last_step] = evaluate(loss_fn, heldout, world, precision)
        metrics.write({"step": last_step, "val_loss": val_losses[last_step]})
    checkpoint(last_step)
    adapter_dir = run_dir / "adapter"
    if world.is_main:
        save_adapter(peft_model, adapter_dir)
        processor.save_pretrained(str(adapter_dir))  # the adapter folder is self-contained for inference
    barrier()
    metrics.close()
    trace.close()
    result = {"val_losses": val_losses, "adapter_dir": adapter_dir, "skipped_samples": int(skipped),
              "peft_model": peft_model, "collator": collator, "world": world}
    if world.is_main and 0 in val_losses:
        print(f"held-out loss: {val_losses[0]:.4f} at step 0 -> {val_losses[last_step]:.4f} at step {last_step}",
              flush=True)
    if world.is_main:
        print(f"adapter saved to {adapter_dir}", flush=True)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="QLoRA fine-tuning of Qwen2.5-VL on WebDataset shards.")
    p.add_argument("--config", help="YAML file with sections model, lora, data, optim, run")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the file (e.g. optim.lr=1e-4)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = False
    try:
        cfg = load_config(args.config, args.overrides)
        plan = validate(cfg, world_size_from_env())  # before any model loads or process group forms
        started = True
        train(cfg, plan)
    except VloraError as e:
        rank = int(os.environ.get("RANK", "0"))
        # Config errors are the same on every rank: one line, from rank 0. Later ones may differ per rank.
        if rank == 0 or started:
            tag = f"[rank {rank}] " if started and world_size_from_env() > 1 else ""
            print(f"vlora: error: {tag}{e}", file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup()
    return 0
