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
from pathlib import Path

import torch

from vlora.config import Config, Plan, load_config, save_config, to_dict, validate
from vlora.distributed import (
    PreemptionSignal, World, all_reduce_sum, barrier, cleanup, init_distributed, world_size_from_env,
)
from vlora.errors import VloraError
from vlora.metrics import Metrics, log, peak_memory_gib, plot_curves, setup_logging


# What a pre-empted run exits with, as a process killed by SIGTERM would (128 + 15): not done, not failed.
# Under torchrun, launch/slurm.sbatch goes by runs/NAME/PREEMPTED instead (torchrun reports its own status).
EXIT_PREEMPTED = 143


class Preempted(Exception):
    """Raised after the pre-emption checkpoint is written; main() turns it into EXIT_PREEMPTED."""


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

    from vlora.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, set_rng_states
    from vlora.data.collate import Collator
    from vlora.data.stream import heldout_batches, parse_sources, train_loader
    from vlora.model import SupervisedLoss, build_model, load_processor, save_adapter
    from vlora.optim import (
        build_optimizer, describe_param_groups, lr_at, resolve_compute_dtype, resolve_precision, set_lr,
    )

    # ---- world, precision, run folder ----
    preemption = PreemptionSignal()  # from the start: a signal during loading stops the run at the first step
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
        # the constant buffers at every step; all ranks load them identically, so only what trains is its business
        # (ignored buffers are never broadcast).
        frozen = [n for n, p in loss_fn.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(loss_fn, frozen + [n for n, _ in loss_fn.named_buffers()])
        net = DDP(loss_fn, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                  gradient_as_bucket_view=True)
    optimizer = build_optimizer(peft_model, cfg.optim, world.device)
    log.info(describe_param_groups(optimizer))
    scaler = precision.grad_scaler()

    # ---- resume: adapter, optimizer, step and this rank's data position ----
    start_step, counters, data_state, rng = 0, {"skipped_samples": 0, "skipped_steps": 0}, None, None
    if resume_from is not None:
        train_state, rank_state, rng = load_checkpoint(resume_from, world=world, peft_model=peft_model,
                                                       optimizer=optimizer)
        start_step, data_state = train_state["step"], rank_state["data"]
        counters = {k: train_state.get(k, 0) for k in counters}
        if scaler is not None and "grad_scaler" in train_state:
            scaler.load_state_dict(train_state["grad_scaler"])
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

    skipped = torch.full((), counters["skipped_samples"], dtype=torch.float64, device=world.device)  # all ranks'
    skipped_steps = counters["skipped_steps"]  # non-finite or fp16-overflow steps whose update was not applied

    def checkpoint(step: int, data_position: dict | None = None) -> Path:
        train_state = {"skipped_samples": int(skipped), "skipped_steps": skipped_steps}
        if scaler is not None:
            train_state["grad_scaler"] = scaler.state_dict()
        return save_checkpoint(run_dir, step, world=world, peft_model=peft_model, optimizer=optimizer,
                               train_state=train_state, rank_state={"data": data_position or batches.state_dict()},
                               keep_last=cfg.run.keep_last, config_text=(run_dir / "config.yaml").read_text())

    # ---- the loop ----
    loss_fn.train()  # from_pretrained returns eval mode: LoRA dropout and gradient checkpointing need train mode
    bad_in_a_row = 0
    nan_steps = {int(x) for x in os.environ.get("VLORA_DEBUG_NAN_STEPS", "").split(",") if x}  # tests only
    if rng is not None:
        set_rng_states(rng)  # now, after the loaders drew their seeds: dropout continues exactly where it stopped
    # Sums since the last log line; reading them (.item()) syncs with the device, so only on log steps.
    window_loss = torch.zeros((), dtype=torch.float64, device=world.device)
    window_counts = torch.zeros(2, dtype=torch.float64, device=world.device)  # supervised tokens, all tokens
    window_steps = 0
    window_start = time.perf_counter()
    for step in range(start_step, cfg.optim.max_steps):
        lr = lr_at(step, cfg.optim)
        set_lr(optimizer, lr)
        position = batches.state_dict()  # where this step's data starts: what a pre-emption save must record
        micro_batches = [next(batches) for _ in range(plan.grad_accum)]

        # The step's global counts, known before any forward: the loss divisor, the throughput numerator, the
        # samples skipped (too long) and whether any rank was told to stop, all in one all-reduce.
        counts = torch.tensor([sum(b["loss_index"].numel() for b in micro_batches),
                               sum(b["n_tokens"] for b in micro_batches),
                               sum(b.pop("skipped") for b in micro_batches),
                               float(preemption.received is not None)],
                              dtype=torch.float64, device=world.device)
        all_reduce_sum(counts)
        if counts[3] > 0:  # every rank sees the same sum, so all stop after the same completed step
            path = checkpoint(step, data_position=position)
            if world.is_main:
                (run_dir / "PREEMPTED").write_text(f"{step}\n")
            log.warning("pre-empted (%s) after step %d: checkpoint %s; continue with run.resume=auto",
                        preemption.name or "another rank", step, path)
            metrics.close()
            trace.close()
            raise Preempted(step)
        trace.write("keys", {"step": step + 1, "keys": [k for b in micro_batches for k in b["keys"]]})
        global_supervised = counts[0].clamp(min=1)
        step_loss = torch.zeros((), dtype=torch.float64, device=world.device)

        for i, batch in enumerate(micro_batches):
            last = i == plan.grad_accum - 1
            # Non-final micro-batches accumulate locally; DDP all-reduces gradients once, on the last.
            sync_ctx = contextlib.nullcontext() if (last or not world.distributed) else net.no_sync()
            with sync_ctx:
                with precision.autocast():
                    loss_sum = net(to_device(batch, world.device))
                # DDP averages gradients over ranks; multiplying by world size turns that into a sum,
                # so the result is sum(loss) / global_supervised exactly.
                if step + 1 in nan_steps:
                    loss_sum = loss_sum * float("nan")
                loss = loss_sum * (world.size / global_supervised)
                (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss_sum.detach()

        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        # The step's one host sync. Gradients are all-reduced, so every rank computes the same norm and takes the
        # same decision; a rank's own loss may be finite while another's is not, so the loss goes by the norm too.
        loss_ok, norm_ok = torch.isfinite(torch.stack([step_loss, grad_norm.double()])).tolist()
        done = step + 1
        if scaler is not None and loss_ok and not norm_ok:
            # fp16 overflow: GradScaler skips this update and lowers its scale; normal early in a run.
            scaler.step(optimizer)
            scaler.update()
            skipped_steps += 1
        elif not (loss_ok and norm_ok):
            bad_in_a_row += 1
            skipped_steps += 1
            if scaler:
                scaler.update()
            log.warning("step %d: non-finite %s; update skipped (%d in a row)", done,
                        "loss" if not loss_ok else "gradient norm", bad_in_a_row)
            if bad_in_a_row >= cfg.run.max_bad_steps:
                optimizer.zero_grad(set_to_none=True)
                path = checkpoint(done)
                raise VloraError(
                    f"{bad_in_a_row} non-finite steps in a row (steps {done - bad_in_a_row + 1}-{done}): stopped, "
                    f"checkpoint {path}; lower optim.lr, raise optim.warmup_steps or check the data, then resume"
                )
        else:
            bad_in_a_row = 0
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if loss_ok:
            window_loss += step_loss
            window_counts += counts[:2]
            window_steps += 1
        skipped += counts[2]
        metrics.tick()
        if trace.digests:
            trace.write("digests", {"step": done, "digest": param_digest(params)})

        if done % cfg.run.log_every == 0 or done == cfg.optim.max_steps:
            all_reduce_sum(window_loss)
            elapsed = time.perf_counter() - window_start
            supervised, tokens = window_counts.tolist()
            metrics.step({
                "step": done, "loss": window_loss.item() / supervised if supervised else float("nan"), "lr": lr,
                "grad_norm": grad_norm.item(), "tokens_per_s": tokens / elapsed,
                "samples_per_s": window_steps * cfg.optim.global_batch / elapsed,
                "peak_mem_gib": peak_memory_gib(world.device), "skipped_samples": int(skipped),
                "skipped_steps": skipped_steps,
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
    preemption.restore()
    adapter_dir = run_dir / "adapter"
    if world.is_main:
        save_adapter(peft_model, adapter_dir)
        processor.save_pretrained(str(adapter_dir))  # the adapter folder is self-contained for inference
        (run_dir / "PREEMPTED").unlink(missing_ok=True)
    barrier()
    metrics.close()
    trace.close()
    if world.is_main and cfg.run.plot:
        plot_curves(run_dir)
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
    except Preempted:
        return EXIT_PREEMPTED
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
