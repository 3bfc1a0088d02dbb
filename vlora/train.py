"""The training loop, top to bottom: `build` (world, engine, model, data, state) -> `fit` (the loop: one
`train_step` per optimizer step, then log, evaluate, save, stop) -> `finish` (last evaluation, checkpoint,
adapter). `train(cfg, plan)` does all three and closes what it opened on every way out.

One optimizer step = `grad_accum` micro-batches on every rank. Before the forward passes, the step's supervised
tokens are counted over all micro-batches and ranks; each micro-batch's summed loss is divided by that count,
so the gradient is the mean over every supervised token of the step, whatever the accumulation or world size.
Gradients are synchronised only on the last micro-batch. How (plain DDP or DeepSpeed ZeRO-2/3) is the engine's
business (vlora/engine.py, `run.engine`); the loop is the same for both.

Run it as `torchrun --nproc_per_node N train.py --config FILE key=value ...` or, for one process, `python train.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlora import families
from vlora.checkpoint import TrainState
from vlora.config import Config, Plan, load_config, save_config, to_dict
from vlora.distributed import (
    Heartbeat, PreemptionSignal, World, all_reduce_max, all_reduce_sum, barrier, cleanup, collective_failure,
    init_distributed, limit_cpu_threads, world_size_from_env,
)
from vlora.errors import VloraError
from vlora.failpoints import failpoint
from vlora.metrics import Metrics, log, peak_memory_gib, plot_curves, setup_logging
from vlora.preflight import preflight


# What a pre-empted run exits with, as a process killed by SIGTERM would (128 + 15): not done, not failed.
# Under torchrun, launch/slurm.sbatch goes by runs/NAME/PREEMPTED instead (torchrun reports its own status).
EXIT_PREEMPTED = 143
CONFIG_ERROR_GRACE_S = 10.0  # how long a rank other than 0 waits before it reports a config error itself


class Preempted(Exception):
    """Raised after the pre-emption checkpoint is written; main() turns it into EXIT_PREEMPTED."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}




@torch.no_grad()
def evaluate(loss_model, batches: list[dict], world: World, precision, lockstep: bool = False) -> float:
    """Mean held-out loss per supervised token over all ranks' shares of the held-out set.

    `lockstep` (ZeRO-3: every forward gathers weights with collectives): every rank runs as many forwards as the
    rank with the most batches, repeating its own last batch (not counted) where its share is shorter.
    """
    loss_model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=world.device)
    n = len(batches)
    if lockstep:
        n = int(all_reduce_max(torch.tensor([n], device=world.device)).item())
    for i in range(n):
        batch = batches[min(i, len(batches) - 1)]
        with precision.autocast():
            loss = loss_model(to_device(batch, world.device)).double()
        if i < len(batches):
            sums[0] += loss
            sums[1] += batch["loss_index"].numel()
    all_reduce_sum(sums)
    loss_model.train()
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


def _dump_trained_state(run: Run, name: str) -> None:
    """Collective (`run.param_digest`): the trained weights and their AdamW moments as the engine holds them,
    gathered, into digests/NAME.safetensors; a checkpoint's ("saved_...") and a resume's ("resumed_...") must be
    equal bit for bit on any number of ranks."""
    held = run.engine.trained_state()
    if run.world.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in held.items()}, str(run.dir / "digests" / f"{name}.safetensors"))


def param_digest(params: list[torch.Tensor]) -> str:
    """A hash of the trainable weights' bytes: equal on every rank iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Run:
    """Everything a run is made of, as `build` makes it. Also the way in for code that drives a run itself (a
    notebook, the tests): `build`, then `fit`, then read `model`, `collator`, `val_losses`, `state`."""

    cfg: Config
    plan: Plan
    world: World
    precision: object  # vlora.optim.Precision
    engine: object  # vlora.engine.Engine
    processor: object
    model: torch.nn.Module  # the peft model
    loss_model: torch.nn.Module  # the peft model under the supervised-token loss (what the engine wraps)
    optimizer: torch.optim.Optimizer
    collator: object
    batches: object  # the resumable training stream (vlora.data.stream)
    heldout: list
    metrics: Metrics
    trace: Trace
    heartbeat: Heartbeat
    preemption: PreemptionSignal
    state: TrainState
    saved_step: int | None = None  # the step whose checkpoint this run holds (saved, or resumed from)
    val_losses: dict = field(default_factory=dict)
    answerer: object = None  # vlora.generate.Answerer over `model`, when run.eval_generate asks for answers
    answer_items: list = field(default_factory=list)  # this rank's share of the held-out samples it answers
    val_exact_match: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.cfg.run_dir


def build(cfg: Config, plan: Plan, resources: contextlib.ExitStack) -> Run:
    """World, run folder, model, optimizer, engine, the state to resume and the data; what needs closing is
    registered on `resources`."""
    from vlora.checkpoint import load_checkpoint, resolve_resume
    from vlora.engine import make_engine
    from vlora.optim import resolve_compute_dtype, resolve_precision

    preemption = PreemptionSignal()  # from the start: a signal during loading stops the run at the first step
    resources.callback(preemption.restore)
    world = init_distributed(cfg.run.dist_timeout_s, always_group=cfg.run.engine == "deepspeed")
    setup_logging(world.rank, world.size)
    resources.callback(torch.set_num_threads, torch.get_num_threads())  # an in-process run leaves it as it was
    threads = limit_cpu_threads(world.device, cfg.data.num_workers)
    if threads is not None:
        log.info("CPU: %d torch thread(s) per rank beside %d data worker(s) (set OMP_NUM_THREADS to choose)",
                 threads, cfg.data.num_workers)
    precision = resolve_precision(cfg, world.device)
    compute_dtype = resolve_compute_dtype(cfg, precision)
    engine = make_engine(cfg, plan, world, precision)  # ddp | deepspeed-zeroN: how gradients and updates are shared
    resources.callback(engine.close)
    _prepare_run_dir(cfg, world)
    resume_from = resolve_resume(cfg.run_dir, cfg.run.resume)
    if resume_from is None and cfg.run.resume == "auto":
        log.info("run.resume=auto: no checkpoint in %s yet; starting at step 0", cfg.run_dir)
    log.info("world %d | device %s | engine %s | precision %s | 4-bit %s | grad_accum %d | global batch %d",
             world.size, world.device, engine.name, precision.name, cfg.model.quant, plan.grad_accum,
             cfg.optim.global_batch)

    processor, model, loss_model, optimizer = _build_model(cfg, world, engine, compute_dtype)
    state = TrainState()
    if resume_from is not None:  # trained weights, optimizer, step, this rank's data position and RNG states
        load_checkpoint(resume_from, state, world=world, peft_model=model, engine=engine,
                        data_workers=cfg.data.num_workers, seed=cfg.run.seed)
        log.info("resumed from %s at step %d", resume_from, state.step)

    collator, batches, heldout = _build_data(cfg, world, processor, compute_dtype, state.data, engine.lockstep)
    resources.callback(batches.close)  # the data workers stop with the run, not at interpreter exit
    if batches.resplit is not None:
        _log_elastic_resume(world, cfg.data.num_workers, batches.resplit)
    metrics = Metrics(cfg.run_dir, enabled=world.is_main, total_steps=cfg.optim.max_steps,
                      progress=cfg.run.progress, wandb_config=to_dict(cfg) if cfg.run.wandb else None)
    resources.callback(metrics.close)
    trace = Trace(cfg.run_dir, world.rank, digests=cfg.run.param_digest, keys=cfg.run.trace_keys)
    resources.callback(trace.close)
    run = Run(cfg=cfg, plan=plan, world=world, precision=precision, engine=engine, processor=processor,
              model=model, loss_model=loss_model, optimizer=optimizer, collator=collator, batches=batches,
              heldout=heldout, metrics=metrics, trace=trace, heartbeat=Heartbeat(world), preemption=preemption,
              state=state, saved_step=state.step if resume_from is not None else None)
    if resume_from is not None and cfg.run.param_digest:
        _dump_trained_state(run, f"resumed_step{state.step:08d}")
    if cfg.run.eval_generate and cfg.data.val:
        from vlora.evaluate import heldout_items
        from vlora.generate import Answerer

        # Boxes as the collator converted them for training, answers' boxes mapped back to the references' pixels.
        boxes = families.of_model_path(cfg.model.path).box_convention(cfg.data.boxes)
        run.answer_items = heldout_items(cfg.data.val, cfg.run.eval_generate, rank=world.rank, world_size=world.size,
                                         check_boxes=boxes is not None)
        run.answerer = Answerer(model, processor, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                                synced_gpus=engine.lockstep, boxes=boxes)
    return run


def _log_elastic_resume(world: World, num_workers: int, resplit) -> None:
    """Say what a resume on other ranks or workers changed (rank 0; every rank computed the same)."""
    def shape(processes: int, readers: int) -> str:
        return f"{processes} process{'es' if processes > 1 else ''}" + (f" x {readers} data workers" if readers > 1 else "")

    before, now = (resplit.world_size, resplit.workers), (world.size, max(1, num_workers))
    left = sum(resplit.left)
    line = (f"resumed on {shape(*now)} from a checkpoint of {shape(*before)}: {left:,} sample{'s' * (left != 1)} of "
            f"the interrupted passes left, dealt over the {now[0] * now[1]} new reader(s) before the next epoch")
    if before[0] != now[0]:
        line += ("; the trained weights and optimizer state continue exactly, dropout cannot continue bit for bit "
                 "across a change of world size" + (" (ranks that did not exist start from fresh RNG states)"
                                                   if now[0] > before[0] else ""))
    if world.is_main:
        log.warning(line)


def _prepare_run_dir(cfg: Config, world: World) -> None:
    if world.is_main:
        if cfg.run.overwrite and cfg.run_dir.is_dir():
            shutil.rmtree(cfg.run_dir)  # the config check refused a used folder unless the user asked for this
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
    barrier()


def _build_model(cfg: Config, world: World, engine, compute_dtype: torch.dtype):
    """(processor, peft model, loss module, optimizer), the engine prepared around them."""
    from vlora.model import SupervisedLoss, build_model, load_processor
    from vlora.optim import build_optimizer, describe_param_groups

    # The same seed on every rank gives the same LoRA init; dropout then differs per rank.
    torch.manual_seed(cfg.run.seed)
    processor = load_processor(cfg.model.path)
    with engine.model_init():  # ZeRO-3 with run.zero3_init: created already partitioned
        model = build_model(cfg, world.device, compute_dtype, quant_storage=engine.quant_storage(compute_dtype))
    n_train, n_total = model.get_nb_trainable_parameters()  # counts 4-bit weights at their real size
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{n_train:,}", f"{n_total:,}", 100 * n_train / n_total)
    torch.manual_seed(cfg.run.seed + world.rank)
    loss_model = SupervisedLoss(model, vision_lockstep=engine.lockstep)
    optimizer = build_optimizer(model, cfg.optim, world.device)
    log.info(describe_param_groups(optimizer))
    engine.prepare(loss_model, optimizer)  # DDP wrapping, or deepspeed.initialize (ZeRO partitions what it owns)
    return processor, model, loss_model, optimizer


def _build_data(cfg: Config, world: World, processor, compute_dtype: torch.dtype, position: dict | list | None,
                lockstep: bool):
    """(collator, the training stream from `position`, this rank's held-out batches)."""
    from vlora.data.collate import Collator
    from vlora.data.remote import RetryPolicy
    from vlora.data.stream import heldout_batches, parse_sources, train_loader

    family = families.of_model_path(cfg.model.path)
    collator = Collator(processor, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                        max_length=cfg.data.max_length, train_on=cfg.data.train_on, pixel_dtype=compute_dtype,
                        pack_length=cfg.data.pack_length, boxes=family.box_convention(cfg.data.boxes),
                        boundaries=family.linear_attention and cfg.data.pack_length > 0)
    batches = train_loader(parse_sources(cfg.data.train), rank=world.rank, world_size=world.size,
                           num_workers=cfg.data.num_workers, seed=cfg.run.seed, micro_batch=cfg.optim.micro_batch,
                           encode=collator.encode, collate=collator.collate, state=position,
                           open_shards=cfg.data.open_shards, policy=RetryPolicy(retries=cfg.data.retries))
    heldout = heldout_batches(cfg.data.val, rank=world.rank, world_size=world.size, max_samples=cfg.data.val_samples,
                              micro_batch=cfg.optim.micro_batch, encode=collator.encode, collate=collator.collate,
                              policy=RetryPolicy(retries=cfg.data.retries)) if cfg.data.val else []
    if cfg.data.val and lockstep:
        # Lockstep evaluation repeats a rank's own last batch to keep up with the others: it needs one.
        fewest = -all_reduce_max(torch.tensor([-len(heldout)], device=world.device)).item()
        if fewest == 0:
            raise VloraError(f"data.val_samples={cfg.data.val_samples} leaves a rank without a held-out batch; "
                             f"under ZeRO-3 every rank evaluates in step: give at least {world.size} samples")
    return collator, batches, heldout


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepCounts:
    """One step's counts over every rank, known before any forward (one all-reduce): the loss divisor, the
    throughput numerator, the samples skipped as too long, and whether any rank was told to stop."""

    supervised: float
    tokens: float
    skipped: float
    stop: bool


def step_counts(run: Run, micro_batches: list[dict]) -> StepCounts:
    counts = torch.tensor([sum(b["loss_index"].numel() for b in micro_batches),
                           sum(b["n_tokens"] for b in micro_batches),
                           sum(b.pop("skipped") for b in micro_batches),
                           float(run.preemption.received is not None)],
                          dtype=torch.float64, device=run.world.device)
    supervised, tokens, skipped, stop = all_reduce_sum(counts).tolist()  # a host sync the stop decision needs
    return StepCounts(supervised, tokens, skipped, stop > 0)


def train_step(run: Run, micro_batches: list[dict], supervised: float):
    """One optimizer step: forward and backward per micro-batch, then clip and update (or skip). Returns the
    engine's StepResult and the step's summed loss over all ranks."""
    engine, world, step = run.engine, run.world, run.state.step + 1
    step_loss = torch.zeros((), dtype=torch.float64, device=world.device)
    for i, batch in enumerate(micro_batches):
        # Non-final micro-batches accumulate locally; gradients are reduced over ranks once, on the last.
        with engine.micro_step(boundary=i == len(micro_batches) - 1):
            with run.precision.autocast():
                loss_sum = engine(to_device(batch, world.device))
            if failpoint("loss", step):
                loss_sum = loss_sum * float("nan")
            # Both engines average gradients over ranks; multiplying by world size turns that into a sum, so the
            # result is sum(loss) / supervised tokens of the whole step exactly.
            engine.backward(loss_sum * (world.size / max(supervised, 1.0)))
        step_loss += loss_sum.detach()
    if failpoint("grad", step):
        next(p for p in engine.params if p.grad is not None).grad.fill_(float("inf"))
    # The step's loss over all ranks: whether it is finite is decided for all ranks at once (one rank's own loss
    # may be finite while another's is not; under fp16 they would then disagree on what to skip, and hang).
    all_reduce_sum(step_loss)
    # Clip, then update unless the loss or the gradient norm is not finite: the same decision on every rank.
    return engine.step(step_loss), step_loss


def fit(run: Run) -> None:
    """The loop, from the state's step to optim.max_steps, then `finish`."""
    from vlora.checkpoint import set_rng_states
    from vlora.optim import lr_at, set_lr

    cfg, state = run.cfg, run.state
    run.loss_model.train()  # from_pretrained returns eval mode: LoRA dropout and gradient checkpointing need train mode
    if cfg.data.val and state.step == 0:
        _evaluate_and_log(run)
    if state.rng is not None:
        set_rng_states(state.rng)  # now, after the loaders drew their seeds: dropout continues where it stopped
    window = Window(run.world.device)
    bad_in_a_row = 0
    try:
        while state.step < cfg.optim.max_steps:
            lr = lr_at(state.step, cfg.optim)
            set_lr(run.optimizer, lr)
            position = run.batches.state_dict()  # where this step's data starts: what a pre-emption must record
            micro_batches = [next(run.batches) for _ in range(run.plan.grad_accum)]
            failpoint("step", state.step + 1)
            run.heartbeat.beat(state.step + 1)
            counts = step_counts(run, micro_batches)
            if counts.stop:  # every rank sees the same sum, so all stop after the same completed step
                _preempt(run, position)
            run.trace.write("keys", {"step": state.step + 1, "keys": [k for b in micro_batches for k in b["keys"]]})

            result, step_loss = train_step(run, micro_batches, counts.supervised)
            state.step += 1
            state.skipped_samples += int(counts.skipped)
            bad_in_a_row = _count_skips(run, result, bad_in_a_row)
            if result.loss_ok:
                window.add(step_loss, counts)
            run.metrics.tick()
            if run.trace.digests:
                with run.engine.full_weights():  # ZeRO-3: the whole weights, not this rank's partition
                    run.trace.write("digests", {"step": state.step, "digest": param_digest(run.engine.params)})

            last = state.step == cfg.optim.max_steps
            if state.step % cfg.run.log_every == 0 or last:
                _log_step(run, window, lr, result.grad_norm)
            if cfg.data.val and cfg.run.eval_every and state.step % cfg.run.eval_every == 0 and not last:
                _evaluate_and_log(run)
            if cfg.run.save_every and state.step % cfg.run.save_every == 0 and not last:
                save(run)
    except RuntimeError as e:
        # A collective that timed out (run.dist_timeout_s) or lost a peer: say which step, and which rank did not
        # get there, in one line, instead of a gloo/NCCL traceback (or a silent hang).
        message = collective_failure(e, step=state.step + 1, timeout_s=cfg.run.dist_timeout_s,
                                     heartbeat=run.heartbeat)
        if message is None:
            raise
        raise VloraError(message) from None
    finish(run)


class Window:
    """Sums since the last log line, kept on the device: reading them syncs, so only on log steps."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.supervised = self.tokens = 0.0
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, step_loss: torch.Tensor, counts: StepCounts) -> None:
        self.loss += step_loss
        self.supervised += counts.supervised
        self.tokens += counts.tokens
        self.steps += 1


def _log_step(run: Run, window: Window, lr: float, grad_norm: torch.Tensor) -> None:
    elapsed = time.perf_counter() - window.started
    run.metrics.step({
        "step": run.state.step, "loss": window.loss.item() / window.supervised if window.supervised else float("nan"),
        "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": window.tokens / elapsed,
        "samples_per_s": window.steps * run.cfg.optim.global_batch / elapsed,
        "peak_mem_gib": peak_memory_gib(run.world.device), "skipped_samples": run.state.skipped_samples,
        "skipped_steps": run.state.skipped_steps,
    })
    window.reset()


def _count_skips(run: Run, result, bad_in_a_row: int) -> int:
    """Count a skipped step; stop the run (with a checkpoint) after run.max_bad_steps non-finite ones in a row."""
    done = run.state.step
    if result.applied:
        return 0
    run.state.skipped_steps += 1
    if result.overflow:  # fp16 overflow: the loss scale was lowered; normal early in a run
        return bad_in_a_row
    bad_in_a_row += 1
    log.warning("step %d: non-finite %s; update skipped (%d in a row)", done,
                "loss" if not result.loss_ok else "gradient norm", bad_in_a_row)
    if bad_in_a_row >= run.cfg.run.max_bad_steps:
        path = save(run)
        raise VloraError(f"{bad_in_a_row} non-finite steps in a row (steps {done - bad_in_a_row + 1}-{done}): "
                         f"stopped, checkpoint {path}; lower optim.lr, raise optim.warmup_steps or check the data, "
                         "then resume")
    return bad_in_a_row


def _evaluate_and_log(run: Run) -> None:
    """Held-out loss, and with run.eval_generate the exact match of greedy answers: logged and kept."""
    from vlora.evaluate import heldout_exact_match

    step = run.state.step
    run.val_losses[step] = evaluate(run.loss_model, run.heldout, run.world, run.precision, run.engine.lockstep)
    record = {"step": step, "val_loss": run.val_losses[step]}
    line = f"step {step:>5} | held-out loss {run.val_losses[step]:.4f}"
    if run.answerer is not None:
        run.loss_model.eval()  # no LoRA dropout; and no activation checkpointing, so generate keeps its cache
        with run.precision.autocast():
            em, boxes = heldout_exact_match(run.answerer, run.answer_items, batch_size=eval_batch(run.cfg),
                                            lockstep=run.engine.lockstep)
        run.loss_model.train()
        run.val_exact_match[step] = record["val_exact_match"] = em
        line += f" | exact match {em:.1f}% ({run.cfg.run.eval_generate} answers)"
        if boxes is not None:  # grounding answers: exact match on coordinates is strict, the overlap is the figure
            record["val_box_acc50"] = boxes
            line += f" | boxes at IoU 0.5 {boxes:.1f}%"
    run.metrics.write(record)
    if step < run.cfg.optim.max_steps:
        run.metrics.info(line)


def save(run: Run, data_position: dict | None = None, preempted: bool = False) -> Path:
    """Collective: a checkpoint of the run at its current step (a step this run holds already is reused)."""
    from vlora.checkpoint import save_checkpoint

    run.state.data = data_position or run.batches.state_dict()
    if run.cfg.run.param_digest:  # what the checkpoint holds, for the checks of a resume on other ranks (build)
        _dump_trained_state(run, f"saved_step{run.state.step:08d}")
    path = save_checkpoint(run.dir, run.state, world=run.world, peft_model=run.model, engine=run.engine,
                           keep_last=run.cfg.run.keep_last, config_text=(run.dir / "config.yaml").read_text(),
                           reuse=run.state.step == run.saved_step, preempted=preempted)
    run.saved_step = run.state.step
    return path


def _preempt(run: Run, position: dict) -> None:
    """Save the state before this step (its data not consumed), mark the run pre-empted, and stop."""
    path = save(run, data_position=position, preempted=True)
    log.warning("pre-empted (%s) after step %d: checkpoint %s; continue with run.resume=auto",
                run.preemption.name or "another rank", run.state.step, path)
    raise Preempted(run.state.step)


def finish(run: Run) -> None:
    """The end: the last evaluation, the last checkpoint, the adapter (with the processor) for inference."""
    cfg, world = run.cfg, run.world
    last = cfg.optim.max_steps
    if cfg.data.val:
        _evaluate_and_log(run)
    save(run)
    run.preemption.restore()
    adapter_dir = run.dir / "adapter"
    run.engine.export_adapter(run.model, adapter_dir)  # collective under ZeRO-3: gathered to rank 0
    if world.is_main:
        run.processor.save_pretrained(str(adapter_dir))  # the adapter folder is self-contained for inference
        (run.dir / "PREEMPTED").unlink(missing_ok=True)
    barrier()
    if world.is_main and cfg.run.plot:
        run.metrics.close()  # flushed before it is read
        plot_curves(run.dir)
    if world.is_main and 0 in run.val_losses:
        print(f"held-out loss: {run.val_losses[0]:.4f} at step 0 -> {run.val_losses[last]:.4f} at step {last}",
              flush=True)
    if world.is_main and 0 in run.val_exact_match:
        print(f"held-out exact match: {run.val_exact_match[0]:.1f}% at step 0 -> {run.val_exact_match[last]:.1f}% "
              f"at step {last}", flush=True)
    if world.is_main:
        print(f"adapter saved to {adapter_dir}", flush=True)


def eval_batch(cfg: Config) -> int:
    return cfg.run.eval_batch or cfg.optim.micro_batch


def final_report(cfg: Config) -> None:
    """run.report_samples: score the adapter as saved against the base and the majority answer, as `vlora eval`
    would (the same report), on rank 0 after the other ranks are done: the saved folder is what is handed over,
    and one process spares a new Python start and its imports (~15 s on the CPU)."""
    import gc

    from vlora.evaluate import evaluate, print_report

    gc.collect()  # the training model is gone once train() returned; give its memory back before loading
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = cfg.run_dir / "eval"
    report = evaluate(cfg.model.path, str(cfg.run_dir / "adapter"), cfg.data.val, str(out),
                      max_samples=cfg.run.report_samples, quant=cfg.model.quant, batch_size=eval_batch(cfg),
                      min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, boxes=cfg.data.boxes)
    print_report(report, cfg.data.val, out)


def train(cfg: Config, plan: Plan) -> None:
    """Train under the current process group (or alone): build, fit, finish; everything opened is closed on every
    way out (success, pre-emption, bad steps, a failed collective)."""
    with contextlib.ExitStack() as resources:
        fit(build(cfg, plan, resources))


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
        plan = preflight(cfg, world_size_from_env())  # before any model loads or process group forms
        started = True
        train(cfg, plan)
        cleanup()  # the other ranks are done; rank 0 scores the saved adapter alone
        if cfg.run.report_samples and cfg.data.val and int(os.environ.get("RANK", "0")) == 0:
            final_report(cfg)
    except Preempted:
        return EXIT_PREEMPTED
    except VloraError as e:
        rank = int(os.environ.get("RANK", "0"))
        # Config errors are the same on every rank: one line, from rank 0. Later ones may differ per rank.
        # Another rank waits before it exits: torchrun stops the others as soon as one exits, and a rank that
        # exited at once could have rank 0 stopped before it said why. Rank 0 failing alike ends the wait (torchrun
        # stops this rank); past it, rank 0 did not fail alike (node-local files), and this rank says its own.
        if not started and rank != 0:
            time.sleep(CONFIG_ERROR_GRACE_S)
        tag = f"[rank {rank}] " if world_size_from_env() > 1 and (started or rank != 0) else ""
        # One write with its newline: ranks share the log, and a line must not be split by another's.
        sys.stderr.write(f"vlora: error: {tag}{e}\n")
        sys.stderr.flush()
        return 2
    finally:
        cleanup()
    return 0
