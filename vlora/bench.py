"""`vlora bench`: what vlora's training step costs, beside the recipe people run today.

It runs vlora's own step (vlora.train.train_step, the same engine, model build and collator as train.py) on
synthetic batches of a stated shape (default: one 448x448 image = 256 image tokens, plus 256 text tokens, per
sample), after a warm-up, and reports per optimizer step:
- tokens/s, samples/s, peak memory (all timed steps uncounted: counting slows the host);
- MFU: 4 x the LLM's matmul parameters per token (the forward, plus the backward's input-gradient half: frozen
  weights get no weight gradient), lm_head at the supervised positions only, recomputation not counted, over the
  device's dense bf16 peak (`PEAK_TFLOPS`; `--peak-tflops` for other devices);
- operator calls and FLOPs per step, split into vision tower, LLM, loss and optimizer (vlora.counters), on one
  extra step: the counts are the same on any machine, so they are the figure to compare on a CPU.
- the data loader (vlora.data.throughput; `--no-loader` skips it): samples/s of the real stream + collate on
  seeded JPEG shards of the same shape, in the main process and with 1 and 2 workers, per worker and per core,
  and the data workers (`data.num_workers`) that one rank at the timed step's samples/s needs.
`--reference` runs the seeds' recipe (vlora.reference: HF Trainer + prepare_model_for_kbit_training) on the same
model and batches in the same process and prints both side by side; `--check` compares vlora's loss and LoRA
gradients with the stock model's own forward and loss on one batch.

Models: a folder, `tiny` (the demo's tiny model), `tiny-3b` (the 3B structure at toy width with the real
vocabulary), or `3b` / `7b` (the public Qwen2.5-VL configs with random weights, written once under .cache/).
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import logging
import random
import time
import types
from pathlib import Path

import torch

log = logging.getLogger("vlora")

# Dense bf16 peak of the devices we meet, in TFLOP/s (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "A10G": 125.0, "RTX 4090": 165.0, "B200": 2250.0}
CACHE = Path(".cache")
_WORDS = ("the a small large red green blue image picture shows shape circle square left right top bottom of in on "
          "with and two three four is are there what where which colour photo scene object person dog cat car tree "
          "house sky water road street table window door light dark white black near far behind front side").split()

# `3b` / `7b`: the architecture fields the hub publishes for Qwen/Qwen2.5-VL-{3B,7B}-Instruct (kept in the repo).
HUB_CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "hub_configs"
PUBLIC_MODELS = {"3b": "Qwen2.5-VL-3B-Instruct", "7b": "Qwen2.5-VL-7B-Instruct"}


# ---------------------------------------------------------------------------------------------------------------
# Models and batches


def bench_model(name: str) -> Path:
    """The model folder for `name`, built once under .cache/ where it is one of ours."""
    if name == "tiny":
        from vlora.tiny import build_tiny_model

        out = CACHE / "tiny-qwen2.5-vl"
        return out if (out / "config.json").is_file() else Path(build_tiny_model(out))
    if name == "tiny-3b":
        from vlora.tiny import build_bench_model

        out = CACHE / "bench-tiny-3b"
        return out if (out / "config.json").is_file() else Path(build_bench_model(out))
    if name in PUBLIC_MODELS:
        out = CACHE / f"bench-qwen2.5-vl-{name}"
        return out if (out / "config.json").is_file() else write_public_model(name, out)
    return Path(name)


def write_public_model(name: str, out: Path) -> Path:
    """The public config with random weights (bf16, on the GPU when there is one), and the real-vocabulary
    processor: a model that loads and trains exactly like the downloaded one, minus what it knows."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlora.tiny import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, build_processor, build_qwen_tokenizer

    fields = json.loads((HUB_CONFIGS / f"{PUBLIC_MODELS[name]}.json").read_text())
    fields.pop("_comment")
    fields["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}  # as the hub's config.json has it
    config = Qwen2_5_VLConfig(**fields)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="4GB")
    build_processor(build_qwen_tokenizer(), min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS).save_pretrained(out)
    return out


def synthetic_samples(n: int, *, image_px: int, text_tokens: int, tokenizer, seed: int = 0) -> list[dict]:
    """Shard-like samples (what Collator.encode reads): one random RGB image of image_px x image_px and about
    text_tokens tokens of text, 85 % of what the chat template leaves the answer (at the default shape: 2,048
    tokens, about 776 supervised, per batch of 4, as in the seeds' measurement)."""
    from PIL import Image

    rng = random.Random(seed)
    template = 30  # system turn, role headers, vision start/end: the chat template's own tokens
    answer_n = max(1, (text_tokens - template) * 85 // 100)
    question_n = max(1, text_tokens - template - answer_n)

    def text_of(n_tokens: int) -> str:  # random English words, cut to n_tokens tokens of this tokenizer
        words = " ".join(rng.choice(_WORDS) for _ in range(2 * n_tokens))
        return tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:n_tokens]).strip()

    samples = []
    for i in range(n):
        pixels = bytes(rng.getrandbits(8) for _ in range(image_px * image_px * 3))
        buf = io.BytesIO()
        Image.frombytes("RGB", (image_px, image_px), pixels).save(buf, format="PNG")
        question, answer = text_of(question_n), text_of(answer_n)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        samples.append({"__key__": f"bench-{i:06d}", "json": json.dumps({"messages": messages}), "0.png": buf.getvalue()})
    return samples


# ---------------------------------------------------------------------------------------------------------------
# vlora's step


def bench_config(model_dir: Path, args):
    """A run config for the bench: the recipe's LoRA (r 64, alpha 16, dropout 0.05 on all LLM linears), one
    micro-batch per step, no warm-up of the learning rate, the shapes' pixel budget."""
    from vlora.config import load_config

    pixels = args.image * args.image
    return load_config(None, [
        f"model.path={model_dir}", f"model.gradient_checkpointing={str(args.gc).lower()}", "lora.r=64", "lora.alpha=16",
        "lora.dropout=0.05", "lora.targets=[llm_attn,llm_mlp]", f"optim.micro_batch={args.batch}",
        f"optim.global_batch={args.batch}", "optim.warmup_steps=0", f"optim.max_steps={args.warmup + args.steps + 1}",
        f"data.min_pixels={pixels}", f"data.max_pixels={pixels}", "data.train=unused", "run.name=bench",
        *args.overrides])


def build_vlora(cfg):
    """(step runner, peft model, collator) of vlora's own training path."""
    from vlora.checkpoint import TrainState
    from vlora.config import validate
    from vlora.data.collate import Collator
    from vlora.distributed import init_distributed
    from vlora.engine import make_engine
    from vlora.optim import resolve_compute_dtype, resolve_precision
    from vlora.train import _build_model

    plan = validate(cfg)
    world = init_distributed(cfg.run.dist_timeout_s, always_group=cfg.run.engine == "deepspeed")
    precision = resolve_precision(cfg, world.device)
    compute_dtype = resolve_compute_dtype(cfg, precision)
    engine = make_engine(cfg, plan, world, precision)
    processor, model, loss_model, optimizer = _build_model(cfg, world, engine, compute_dtype)
    loss_model.train()
    collator = Collator(processor, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                        max_length=cfg.data.max_length, pixel_dtype=compute_dtype)
    # What vlora.train.train_step reads of a Run.
    run = types.SimpleNamespace(engine=engine, world=world, state=TrainState(), precision=precision,
                                loss_model=loss_model, optimizer=optimizer, model=model)
    return run, collator, processor


def vlora_step(run, batch: dict):
    """One optimizer step through vlora.train.train_step; returns the loss per supervised token."""
    from vlora.train import train_step

    supervised = float(batch["loss_index"].numel())
    result, step_loss = train_step(run, [batch], supervised)
    run.state.step += 1
    return result, step_loss


def timed_steps(step, batches: list[dict], *, warmup: int, steps: int, device: torch.device) -> dict:
    """Wall seconds per step after `warmup` steps, and peak memory."""
    from vlora.metrics import peak_memory_gib

    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[(warmup + i) % len(batches)])
    _sync(device)
    return {"seconds_per_step": (time.perf_counter() - start) / steps, "peak_mem_gib": peak_memory_gib(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted_step(run, batch: dict) -> dict:
    """Operator calls and FLOPs of one more step, by part."""
    from vlora.counters import StepCounter

    counter = StepCounter(run.model)
    engine_step = run.engine.step

    def step_as_optimizer(*a, **k):  # the update runs outside every module: name its part explicitly
        with counter.phase("optimizer"):
            return engine_step(*a, **k)

    run.engine.step = step_as_optimizer
    try:
        with counter.counting():
            vlora_step(run, batch)
    finally:
        run.engine.step = engine_step
    return counter.table()


# ---------------------------------------------------------------------------------------------------------------
# Figures


def llm_matmul_params(model) -> tuple[int, int]:
    """(parameters of the LLM's decoder-layer matmuls, hidden x vocab of lm_head) from the config."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q = c.hidden_size * c.num_attention_heads * head_dim
    kv = 2 * c.hidden_size * c.num_key_value_heads * head_dim
    o = c.num_attention_heads * head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (q + kv + o + mlp), c.hidden_size * c.vocab_size


def model_flops_per_step(model, tokens: int, supervised: int) -> float:
    """4 x matmul parameters per token (forward 2, input-gradient backward 2); lm_head at supervised positions."""
    layers, head = llm_matmul_params(model)
    return 4.0 * layers * tokens + 4.0 * head * supervised


def device_peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def vlora_figures(args, model_dir: Path) -> tuple[dict, list[dict], object]:
    """vlora's figures on the shapes of `args`, the batches it used (for the reference), and the run."""
    cfg = bench_config(model_dir, args)
    run, collator, processor = build_vlora(cfg)
    samples = synthetic_samples(args.batch * 2, image_px=args.image, text_tokens=args.text,
                                tokenizer=processor.tokenizer, seed=args.seed)
    batches = [collator.collate([collator.encode(s) for s in samples[i:i + args.batch]])
               for i in range(0, len(samples), args.batch)]
    timing = timed_steps(lambda b: vlora_step(run, b), batches, warmup=args.warmup, steps=args.steps,
                         device=run.world.device)
    figures = shape_figures(run.model, batches[0], args.batch, timing, run.world.device, args.peak_tflops)
    figures["counts"] = counted_step(run, batches[0])
    run.collator = collator  # for the data loader's figures
    return figures, batches, run


def shape_figures(model, batch: dict, samples: int, timing: dict, device: torch.device,
                  peak_tflops: float | None) -> dict:
    """tokens/s, samples/s, peak memory and MFU of a step on `batch`."""
    tokens, supervised = int(batch["n_tokens"]), int(batch["loss_index"].numel())
    seconds = timing["seconds_per_step"]
    peak = device_peak_tflops(device, peak_tflops)
    flops = model_flops_per_step(model, tokens, supervised)
    return {"tokens_per_step": tokens, "supervised_per_step": supervised, "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds,
            "peak_mem_gib": timing["peak_mem_gib"], "model_tflops_per_step": flops / 1e12,
            "mfu": flops / seconds / (peak * 1e12) if peak else None}


def format_table(results: dict[str, dict]) -> str:
    """The side-by-side table: one column per setup, a ratio column when the reference is there."""
    names = list(results)
    rows = [("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"), ("samples/s", lambda r: f"{r['samples_per_s']:.2f}"),
            ("s/step", lambda r: f"{r['seconds_per_step']:.3f}"), ("peak GiB", lambda r: f"{r['peak_mem_gib']:.2f}"),
            ("MFU", lambda r: "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%")]
    for part in ("vision", "llm", "loss", "optimizer", "total"):
        rows.append((f"ops {part}", lambda r, p=part: f"{r['counts'][p]['ops']:,.0f}"))
    for part in ("vision", "llm", "loss", "optimizer", "total"):
        rows.append((f"GFLOPs {part}", lambda r, p=part: f"{r['counts'][p]['gflops']:.2f}"))
    width = max(14, *(len(n) + 2 for n in names))
    lines = ["per optimizer step".ljust(16) + "".join(n.rjust(width) for n in names)]
    for label, cell in rows:
        lines.append(label.ljust(16) + "".join(cell(results[n]).rjust(width) for n in names))
    return "\n".join(lines)


def ratios(ours: dict, reference: dict) -> dict:
    """vlora / reference for speed, and for operator calls per part (lower is better for calls)."""
    out = {"tokens_per_s": ours["tokens_per_s"] / reference["tokens_per_s"],
           "peak_mem": ours["peak_mem_gib"] / reference["peak_mem_gib"] if reference["peak_mem_gib"] else None}
    for part in ("vision", "llm", "loss", "optimizer", "total"):
        ref = reference["counts"][part]["ops"]
        out[f"ops_{part}"] = ours["counts"][part]["ops"] / ref if ref else None
    return out


def reference_figures(args, model_dir: Path, batches: list[dict], peak_tflops: float | None) -> dict:
    """The seeds' recipe (vlora.reference) on the same model and batches: timed steps, then one counted step."""
    from vlora.counters import StepCounter
    from vlora.reference import run_reference

    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    forward = getattr(transformers, config.architectures[0]).forward
    plain = [reference_inputs(b, forward, config.image_token_id) for b in batches]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counted = args.warmup + args.steps  # the last step is counted, the ones before it timed
    marks: dict[int, float] = {}
    holder: dict = {}

    def begin(step: int) -> None:
        if step == args.warmup:
            _sync(device)
            marks["start"] = time.perf_counter()
        if step == counted:
            _sync(device)
            marks["end"] = time.perf_counter()
            holder["counter"] = StepCounter(holder["model"])
            holder["ctx"] = holder["counter"].counting()
            holder["ctx"].__enter__()

    def end(step: int) -> None:
        if step == counted:
            holder["ctx"].__exit__(None, None, None)

    out = run_reference(model_dir, plain, gradient_checkpointing=args.gc, steps=counted + 1, device=device,
                        step_begin=begin, step_end=end, on_model=lambda m: holder.__setitem__("model", m))
    seconds = (marks["end"] - marks["start"]) / args.steps
    timing = {"seconds_per_step": seconds, "peak_mem_gib": out["peak_mem_gib"]}
    figures = shape_figures(holder["model"], batches[0], args.batch, timing, device, peak_tflops)
    figures["counts"] = holder["counter"].table()
    return figures


def reference_inputs(batch: dict, forward, image_token_id: int) -> dict:
    """A vlora batch as the stock model's `forward` takes it from its processor: labels instead of vlora's
    supervised-position indices, and (transformers >= 5.2x) `mm_token_type_ids`, without which the model silently
    falls back to 1-D positions for the image tokens."""
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")
    out = {k: batch[k] for k in keys if batch.get(k) is not None}
    if "mm_token_type_ids" in inspect.signature(forward).parameters:
        out["mm_token_type_ids"] = (batch["input_ids"] == image_token_id).long()  # as the processor gives it
    return out


def check_against_stock(run, batch: dict, *, tolerance: float = 1e-4) -> dict:
    """vlora's loss and LoRA gradients against the stock forward's own loss on the same batch and weights.

    The stock path is the peft model called with `labels` (full-vocabulary logits at every position, the model's
    own loss, transformers' own vision tower code): what a user's plain loop computes."""
    from vlora.kernels import stock_vision
    from vlora.train import to_device

    model, device = run.model, run.world.device
    hf = model.get_base_model()
    dev = to_device(batch, device)
    run.loss_model.eval()  # no LoRA dropout: both paths must see the same weights; eval mode keeps autograd
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with run.precision.autocast():
        ours = run.loss_model(dev) / batch["loss_index"].numel()
    ours.backward()
    ours_grads = {n: p.grad.detach().clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    with stock_vision(model), run.precision.autocast():
        stock = model(**reference_inputs(dev, hf.forward, hf.config.image_token_id), use_cache=False).loss
    stock.backward()
    worst = max(((p.grad - ours_grads[n]).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
                for n, p in params.items())
    model.zero_grad(set_to_none=True)
    run.loss_model.train()
    loss_diff = abs(ours.item() - stock.item()) / max(abs(stock.item()), 1e-12)
    return {"loss": ours.item(), "stock_loss": stock.item(), "loss_rel_diff": loss_diff,
            "grad_rel_diff": worst, "tolerance": tolerance, "ok": loss_diff <= tolerance and worst <= tolerance}


# ---------------------------------------------------------------------------------------------------------------
# The data loader


def loader_figures(args, collator, step_samples_s: float) -> dict:
    """The training stream (vlora.data.throughput: shards -> encode -> collate -> the trainer) on seeded JPEG
    shards of the bench's shape, with the bench's collator: in the main process and with 1 and 2 data workers,
    and the data workers that one rank at the timed step's samples/s needs."""
    import tempfile

    from vlora.data.throughput import loader_throughput, make_jpeg_shards, workers_needed

    # About 8 tokens per 7 words after the chat template's ~32, in the tiny and the Qwen vocabulary alike; the
    # table prints the tokens a sample really has. 8 shards: 2 workers read 4 each, evenly.
    words = max(1, (args.text - 32) * 7 // 8)
    with tempfile.TemporaryDirectory(prefix="vlora-bench-loader-") as tmp:
        shards = make_jpeg_shards(tmp, 8 * args.batch, size=args.image, words=words, seed=args.seed,
                                  shard_size=args.batch)
        rows = loader_throughput(shards, collator, workers=[0, 1, 2], samples=args.loader_samples,
                                 micro_batch=args.batch, seed=args.seed)
    return {"rows": rows, "step_samples_s": step_samples_s, "workers_needed": workers_needed(rows, step_samples_s)}


def format_loader(loader: dict) -> str:
    from vlora.data.throughput import format_throughput

    need = loader["workers_needed"]
    return "\n".join([
        "data loader, JPEG shards of this shape (stream + encode + collate; /core: samples/s of one busy core):",
        format_throughput(loader["rows"]),
        f"this step's {loader['step_samples_s']:.1f} samples/s need {'-' if need is None else need} data worker(s) "
        "per rank, a core each (data.num_workers)"])


# ---------------------------------------------------------------------------------------------------------------
# The command


def cmd_bench(args) -> int:
    model_dir = bench_model(args.model)
    ours, batches, run = vlora_figures(args, model_dir)
    results = {"vlora": ours}
    report = {"model": str(model_dir), "shape": {"batch": args.batch, "image": args.image, "text": args.text},
              "gradient_checkpointing": args.gc, "device": str(run.world.device), "results": results}
    if args.check:
        report["check"] = check_against_stock(run, batches[0])
    if args.loader:
        report["loader"] = loader_figures(args, run.collator, ours["samples_per_s"])
    if args.reference:
        del run
        results["reference"] = reference_figures(args, model_dir, batches, args.peak_tflops)
        report["ratios"] = ratios(ours, results["reference"])
    print(f"{model_dir} on {report['device']}: batch {args.batch} x (one {args.image}x{args.image} image + "
          f"~{args.text} text tokens), gradient checkpointing {'on' if args.gc else 'off'}")
    print(format_table(results))
    if "ratios" in report:
        r = report["ratios"]
        print(f"vlora / reference: tokens/s x{r['tokens_per_s']:.2f}, operator calls {100 * r['ops_total']:.0f}% "
              f"(vision {100 * r['ops_vision']:.0f}%)")
    if "loader" in report:
        print(format_loader(report["loader"]))
    if "check" in report:
        c = report["check"]
        print(f"check against the stock forward: loss {c['loss']:.6f} vs {c['stock_loss']:.6f}, largest relative "
              f"LoRA gradient difference {c['grad_rel_diff']:.2e} ({'ok' if c['ok'] else 'ABOVE'} {c['tolerance']:g})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report.get("check", {}).get("ok", True) else 1


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="time and count vlora's training step (and the usual recipe's, --reference)")
    b.add_argument("--model", default="tiny", help="a model folder, or tiny | tiny-3b | 3b | 7b (built under .cache/)")
    b.add_argument("--batch", type=int, default=4, help="samples per step")
    b.add_argument("--image", type=int, default=448, help="image side in pixels (448 = 256 image tokens)")
    b.add_argument("--text", type=int, default=256, help="text tokens per sample, template included")
    b.add_argument("--steps", type=int, default=3, help="timed steps, after the warm-up")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--gc", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing")
    b.add_argument("--reference", action="store_true", help="also run the seeds' HF Trainer recipe, side by side")
    b.add_argument("--check", action="store_true", help="compare loss and LoRA gradients with the stock forward")
    b.add_argument("--loader", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the data loader (main process, 1 and 2 workers) on JPEG shards of this shape")
    b.add_argument("--loader-samples", type=int, default=64, help="samples timed per worker count")
    b.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, help="also write the figures here")
    b.add_argument("overrides", nargs="*", help="run config overrides (section.key=value) for vlora's side")
    b.set_defaults(func=cmd_bench)
