"""The training loop, top to bottom: config -> world -> model + data -> steps -> adapter.

One optimizer step = `grad_accum` micro-batches on every rank. Before the forward passes, the step's supervised
tokens are counted over all micro-batches and ranks; each micro-batch's summed loss is divided by that count,
so the gradient is the mean over every supervised token of the step, whatever the accumulation or world size.
Gradients are synchronised only on the last micro-batch. How (plain DDP or DeepSpeed ZeRO-2/3) is the engine's
business (vlora/engine.py, `run.engine`); the loop is the same for both.

Run it as `torchrun --nproc_per_node N train.py --config FILE key=value ...` or, for one process, `python train.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from vlora.config import Config, Plan, load_config, save_config, to_dict, validate
from vlora.distributed import (
    Heartbeat, PreemptionSignal, World, all_reduce_max, all_reduce_sum, barrier, cleanup, collective_failure,
    init_distributed, world_size_from_env,
)
from vlora.errors import VloraError
from vlora.failpoints import failpoint
from vlora.metrics import Metrics, log, peak_memory_gib, plot_curves, setup_logging


# What a pre-empted run exits with, as a process killed by SIGTERM would (128 + 15): not done, not failed.
# Under torchrun, launch/slurm.sbatch goes by runs/NAME/PREEMPTED instead (torchrun reports its own status).
EXIT_PREEMPTED = 143


class Preempted(Exception):
    """Raised after the pre-emption checkpoint is written; main() turns it into EXIT_PREEMPTED."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}




@torch.no_grad()
def evaluate(loss_fn, batches: list[dict], world: World, precision, lockstep: bool = False) -> float:
    """Mean held-out loss per supervised token over all ranks' shares of the held-out set.

    `lockstep` (ZeRO-3: every forward gathers weights with collectives): every rank runs as many forwards as the
    rank with the most batches, repeating its own last batch (not counted) where its share is shorter.
    """
    loss_fn.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=world.device)
    n = len(batches)
    if lockstep:
        n = int(all_reduce_max(torch.tensor([n], device=world.device)).item())
    for i in range(n):
        batch = batches[min(i, len(batches) - 1)]
        with precision.autocast():
            loss = loss_fn(to_device(batch, world.device)).double()
        if i < len(batches):
            sums[0] += loss
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
    from vlora.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, set_rng_states
    from vlora.data.collate import Collator
    from vlora.data.stream import heldout_batches, parse_sources, train_loader
    from vlora.engine import make_engine
    from vlora.model import SupervisedLoss, build_model, load_processor
    from vlora.optim import (
        build_optimizer, describe_param_groups, lr_at, resolve_compute_dtype, resolve_precision, set_lr,
    )

    # ---- world, precision, engine, run folder ----
    preemption = PreemptionSignal()  # from the start: a signal during loading stops the run at the first step
    world = init_distributed(cfg.run.dist_timeout_s, always_group=cfg.run.engine == "deepspeed")
    setup_logging(world.rank, world.size)
    precision = resolve_precision(cfg, world.device)
    compute_dtype = resolve_compute_dtype(cfg, precision)
    engine = make_engine(cfg, plan, world, precision)  # ddp | deepspeed-zeroN: how gradients and updates are shared
    run_dir = cfg.run_dir
    if world.is_main:
        if cfg.run.overwrite and run_dir.is_dir():
            shutil.rmtree(run_dir)  # validate() refused a used folder unless the user asked for this
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    barrier()
    resume_from = resolve_resume(run_dir, cfg.run.resume)
    if resume_from is None and cfg.run.resume == "auto":
        log.info("run.resume=auto: no checkpoint in %s yet; starting at step 0", run_dir)
    log.info("world %d | device %s | engine %s | precision %s | 4-bit %s | grad_accum %d | global batch %d",
             world.size, world.device, engine.name, precision.name, cfg.model.quant, plan.grad_accum,
             cfg.optim.global_batch)

    # ---- model: the same seed on every rank gives the same LoRA init; dropout then differs per rank ----
    torch.manual_seed(cfg.run.seed)
    processor = load_processor(cfg.model.path)
    with engine.model_init():  # ZeRO-3 with run.zero3_init: created already partitioned
        peft_model = build_model(cfg, world.device, compute_dtype, quant_storage=engine.quant_storage(compute_dtype))
    n_train, n_total = peft_model.get_nb_trainable_parameters()  # counts 4-bit weights at their real size
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{n_train:,}", f"{n_total:,}", 100 * n_train / n_total)
    torch.manual_seed(cfg.run.seed + world.rank)
    loss_fn = SupervisedLoss(peft_model, vision_lockstep=engine.lockstep)
    optimizer = build_optimizer(peft_model, cfg.optim, world.device)
    log.info(describe_param_groups(optimizer))
    engine.prepare(loss_fn, optimizer)  # DDP wrapping, or deepspeed.initialize (ZeRO partitions what it owns)

    # ---- resume: trained weights, optimizer, step and this rank's data position ----
    start_step, counters, data_state, rng = 0, {"skipped_samples": 0, "skipped_steps": 0}, None, None
    if resume_from is not None:
        train_state, rank_state, rng = load_checkpoint(resume_from, world=world, peft_model=peft_model, engine=engine)
        start_step, data_state = train_state["step"], rank_state.get("data")
        counters = {k: train_state.get(k, 0) for k in counters}
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
    if cfg.data.val and engine.lockstep:
        # Lockstep evaluation repeats a rank's own last batch to keep up with the others: it needs one.
        fewest = -all_reduce_max(torch.tensor([-len(heldout)], device=world.device)).item()
        if fewest == 0:
            raise VloraError(f"data.val_samples={cfg.data.val_samples} leaves a rank without a held-out batch; "
                             f"under ZeRO-3 every rank evaluates in step: give at least {world.size} samples")

    metrics = Metrics(run_dir, enabled=world.is_main, total_steps=cfg.optim.max_steps, progress=cfg.run.progress,
                      wandb_config=to_dict(cfg) if cfg.run.wandb else None)
    trace = Trace(run_dir, world.rank, digests=cfg.run.param_digest, keys=cfg.run.trace_keys)

    # Decided by the config, not by this rank's share: every rank must join evaluate()'s all-reduce,
    # also a rank whose share of the held-out set is empty.
    evaluating = bool(cfg.data.val)
    val_losses = {}
    if evaluating and start_step == 0:
        val_losses[0] = evaluate(loss_fn, heldout, world, precision, engine.lockstep)
        metrics.write({"step": 0, "val_loss": val_losses[0]})
        metrics.info(f"step     0 | held-out loss {val_losses[0]:.4f}")

    skipped = torch.full((), counters["skipped_samples"], dtype=torch.float64, device=world.device)  # all ranks'
    skipped_steps = counters["skipped_steps"]  # non-finite or fp16-overflow steps whose update was not applied

    # The step whose checkpoint this run holds already (saved, or resumed from): saving it again reuses it.
    saved_step = start_step if resume_from is not None else None

    def checkpoint(step: int, data_position: dict | None = None, preempted: bool = False) -> Path:
        nonlocal saved_step
        train_state = {"skipped_samples": int(skipped), "skipped_steps": skipped_steps}
        path = save_checkpoint(run_dir, step, world=world, peft_model=peft_model, engine=engine,
                               train_state=train_state, rank_state={"data": data_position or batches.state_dict()},
                               keep_last=cfg.run.keep_last, config_text=(run_dir / "config.yaml").read_text(),
                               reuse=step == saved_step, preempted=preempted)
        saved_step = step
        return path

    # ---- the loop ----
    loss_fn.train()  # from_pretrained returns eval mode: LoRA dropout and gradient checkpointing need train mode
    bad_in_a_row = 0
    heartbeat = Heartbeat(world)  # so that a timed-out collective can name the rank that did not get there
    if rng is not None:
        set_rng_states(rng)  # now, after the loaders drew their seeds: dropout continues exactly where it stopped
    # Sums since the last log line; reading them (.item()) syncs with the device, so only on log steps.
    window_loss = torch.zeros((), dtype=torch.float64, device=world.device)
    window_counts = torch.zeros(2, dtype=torch.float64, device=world.device)  # supervised tokens, all tokens
    window_steps = 0
    window_start = time.perf_counter()
    step = start_step
    try:
        for step in range(start_step, cfg.optim.max_steps):
            lr = lr_at(step, cfg.optim)
            set_lr(optimizer, lr)
            position = batches.state_dict()  # where this step's data starts: what a pre-emption save must record
            micro_batches = [next(batches) for _ in range(plan.grad_accum)]
            failpoint("step", step + 1)
            heartbeat.beat(step + 1)

            # The step's global counts, known before any forward: the loss divisor, the throughput numerator, the
            # samples skipped (too long) and whether any rank was told to stop, all in one all-reduce.
            counts = torch.tensor([sum(b["loss_index"].numel() for b in micro_batches),
                                   sum(b["n_tokens"] for b in micro_batches),
                                   sum(b.pop("skipped") for b in micro_batches),
                                   float(preemption.received is not None)],
                                  dtype=torch.float64, device=world.device)
            all_reduce_sum(counts)
            if counts[3] > 0:  # every rank sees the same sum, so all stop after the same completed step
                path = checkpoint(step, data_position=position, preempted=True)
                log.warning("pre-empted (%s) after step %d: checkpoint %s; continue with run.resume=auto",
                            preemption.name or "another rank", step, path)
                metrics.close()
                trace.close()
                raise Preempted(step)
            trace.write("keys", {"step": step + 1, "keys": [k for b in micro_batches for k in b["keys"]]})
            global_supervised = counts[0].clamp(min=1)
            step_loss = torch.zeros((), dtype=torch.float64, device=world.device)

            for i, batch in enumerate(micro_batches):
                # Non-final micro-batches accumulate locally; gradients are reduced over ranks once, on the last.
                with engine.micro_step(boundary=i == plan.grad_accum - 1):
                    with precision.autocast():
                        loss_sum = engine(to_device(batch, world.device))
                    if failpoint("loss", step + 1):
                        loss_sum = loss_sum * float("nan")
                    # Both engines average gradients over ranks; multiplying by world size turns that into a sum,
                    # so the result is sum(loss) / global_supervised exactly.
                    engine.backward(loss_sum * (world.size / global_supervised))
                step_loss += loss_sum.detach()

            if failpoint("grad", step + 1):
                next(p for p in engine.params if p.grad is not None).grad.fill_(float("inf"))
            # The step's loss over all ranks: whether it is finite is decided for all ranks at once (one rank's own
            # loss may be finite while another's is not; under fp16 they would then disagree on what to skip).
            all_reduce_sum(step_loss)
            # Clip, then update unless the loss or the gradient norm is not finite: the same decision on every rank.
            result = engine.step(step_loss)
            grad_norm = result.grad_norm
            done = step + 1
            if result.applied:
                bad_in_a_row = 0
            elif result.overflow:
                skipped_steps += 1  # fp16 overflow: the loss scale was lowered; normal early in a run
            else:
                bad_in_a_row += 1
                skipped_steps += 1
                log.warning("step %d: non-finite %s; update skipped (%d in a row)", done,
                            "loss" if not result.loss_ok else "gradient norm", bad_in_a_row)
                if bad_in_a_row >= cfg.run.max_bad_steps:
                    path = checkpoint(done)
                    raise VloraError(
                        f"{bad_in_a_row} non-finite steps in a row (steps {done - bad_in_a_row + 1}-{done}): "
                        f"stopped, checkpoint {path}; lower optim.lr, raise optim.warmup_steps or check the data, "
                        "then resume"
                    )
            if result.loss_ok:
                window_loss += step_loss
                window_counts += counts[:2]
                window_steps += 1
            skipped += counts[2]
            metrics.tick()
            if trace.digests:
                with engine.full_weights():  # ZeRO-3: the whole weights, not this rank's partition
                    trace.write("digests", {"step": done, "digest": param_digest(engine.params)})

            if done % cfg.run.log_every == 0 or done == cfg.optim.max_steps:
                elapsed = time.perf_counter() - window_start
                supervised, tokens = window_counts.tolist()
                metrics.step({
                    "step": done, "loss": window_loss.item() / supervised if supervised else float("nan"),
                    "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens / elapsed,
                    "samples_per_s": window_steps * cfg.optim.global_batch / elapsed,
                    "peak_mem_gib": peak_memory_gib(world.device), "skipped_samples": int(skipped),
                    "skipped_steps": skipped_steps,
                })
                window_loss.zero_()
                window_counts.zero_()
                window_steps = 0
                window_start = time.perf_counter()

            if evaluating and cfg.run.eval_every and done % cfg.run.eval_every == 0 and done != cfg.optim.max_steps:
                val_losses[done] = evaluate(loss_fn, heldout, world, precision, engine.lockstep)
                metrics.write({"step": done, "val_loss": val_losses[done]})
                metrics.info(f"step {done:>5} | held-out loss {val_losses[done]:.4f}")
            if cfg.run.save_every and done % cfg.run.save_every == 0 and done != cfg.optim.max_steps:
                checkpoint(done)
    except RuntimeError as e:
        # A collective that timed out (run.dist_timeout_s) or lost a peer: say which step, and which rank did not
        # get there, in one line, instead of a gloo/NCCL traceback (or a silent hang).
        message = collective_failure(e, step=step + 1, timeout_s=cfg.run.dist_timeout_s, heartbeat=heartbeat)
        if message is None:
            raise
        raise VloraError(message) from None

    # ---- the end: evaluate, save, report ----
    last_step = cfg.optim.max_steps
    if evaluating:
        val_losses[last_step] = evaluate(loss_fn, heldout, world, precision, engine.lockstep)
        metrics.write({"step": last_step, "val_loss": val_losses[last_step]})
    checkpoint(last_step)
    preemption.restore()
    adapter_dir = run_dir / "adapter"
    engine.export_adapter(peft_model, adapter_dir)  # collective under ZeRO-3: gathered to rank 0
    if world.is_main:
        processor.save_pretrained(str(adapter_dir))  # the adapter folder is self-contained for inference
        (run_dir / "PREEMPTED").unlink(missing_ok=True)
    barrier()
    metrics.close()
    trace.close()
    engine.close()
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
