"""The seeds' reference recipe: the QLoRA fine-tune that the public Qwen2.5-VL guides run, for `vlora bench`.

`vlora bench` measures vlora's own loop against what users of those guides run today, so this module reproduces
that recipe as they write it, with its costs, and not a cleaned-up version of it:

- the base loaded through `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...)`: every Linear in 4 bits but lm_head, the vision
  tower's included;
- `peft.prepare_model_for_kbit_training`, which freezes the base, up-casts every non-4-bit weight to fp32 and,
  with checkpointing, enables it and makes the input embeddings' output require grad;
- LoRA r=64, alpha 16, dropout 0.05 on all seven linear layers of every LLM block (not the vision tower);
- HF `Trainer` (its own loop, `trainer.train()`), batch 4, `adamw_torch_fused`, `report_to=[]`, and the loss the
  model computes from `labels`: full-vocabulary logits at every position, up-cast to fp32 for the cross-entropy.

The guides' unstated details are chosen as a guide would on each device (see `reference_dtypes`).
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("vlora")

# peft full-matches a string target_modules against module names: the seven linears of the LLM's blocks only
# (the vision blocks have gate/up/down_proj too).
LLM_LINEARS = r".*\.language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
LORA = dict(r=64, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
LEARNING_RATE = 2e-4  # the QLoRA paper's and the guides' value


def reference_dtypes(device: str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the weights load in, bitsandbytes compute dtype) as a guide runs them on `device`.

    The guides load bf16 (`torch_dtype=torch.bfloat16`) and compute in bf16. On the CPU the compute dtype is the one
    detail a guide's user changes: bf16 runs there, but without bf16 instructions 6 to 29 times slower than fp32
    (STACK.md), so fp32. Loading stays bf16, as the guides write it: the 4-bit weights keep a bf16 quant state
    (each backward dequantizes to bf16, then casts), and `prepare_model_for_kbit_training` up-casts the rest to fp32.
    With these choices the seeds' CPU operator counts are met within 1 % (3B structure, real vocabulary, batch 4 of
    one 448x448 image + 256 text tokens: 2,435 / 5,981 aten calls per step without / with checkpointing against
    2,432 / 5,953; fp32 loading gives 2,417 / 5,938, bf16 compute 2,539 / 6,184, adamw_torch +376).
    """
    if torch.device(device).type == "cpu":
        return torch.bfloat16, torch.float32
    return torch.bfloat16, torch.bfloat16


def load_reference_model(model_dir: str | Path, *, gradient_checkpointing: bool, device: str = "cpu"):
    """The 4-bit base, prepared for k-bit training, with the guides' LoRA on the LLM's linears."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    load_dtype, compute_dtype = reference_dtypes(device)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForImageTextToText.from_pretrained(
        str(model_dir), quantization_config=quant, dtype=load_dtype, device_map={"": torch.device(device)}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, LoraConfig(target_modules=LLM_LINEARS, **LORA))


class _Rows(torch.utils.data.Dataset):
    """Row r of ready batch k, for `steps` batches of `rows` rows (the batches cycle).

    The Trainer's DataLoader asks for `per_device_train_batch_size` rows per step; `_collator` hands back the
    ready batch those rows came from, the very tensors the caller passed, so the step sees them unchanged.
    """

    def __init__(self, n_batches: int, rows: int, steps: int):
        self.n_batches, self.rows, self.steps = n_batches, rows, steps

    def __len__(self):
        return self.steps * self.rows

    def __getitem__(self, i):
        return {"batch": (i // self.rows) % self.n_batches, "row": i % self.rows}


def _collator(batches: list[dict]) -> Callable[[list[dict]], dict]:
    def collate(items: list[dict]) -> dict:
        which = {it["batch"] for it in items}
        if len(which) != 1 or [it["row"] for it in items] != list(range(len(items))):
            raise RuntimeError(f"rows of different batches in one step: {items}")  # a shuffled sampler
        return dict(batches[which.pop()])

    return collate


def _callback(step_begin, step_end, device: str, times: list[float]):
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    class StepHooks(TrainerCallback):
        """Calls the caller's hooks right around each optimizer step (forward, backward, clip, optimizer, zero_grad)
        in the training thread, and times what lies between them."""

        def on_step_begin(self, args, state, control, **kwargs):
            if step_begin is not None:
                step_begin(state.global_step)
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            times.append(time.perf_counter() - self.t0)
            if step_end is not None:  # global_step has already moved on: report the step that began
                step_end(state.global_step - 1)

    return StepHooks()


def reference_args(output_dir: str, *, gradient_checkpointing: bool, steps: int, batch_size: int, device: str):
    """The guides' TrainingArguments, plus what a bench needs: no saving, a logged loss at every step."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        optim="adamw_torch_fused",
        learning_rate=LEARNING_RATE,
        gradient_checkpointing=gradient_checkpointing,
        # The guides' bf16=True (autocast) on a GPU; on the CPU no autocast: it would add a bf16 cast around every
        # op (and bf16 is slow there), and the seeds' CPU counts have none.
        bf16=torch.device(device).type == "cuda",
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the VLM guides' setting: pixel_values and image_grid_thw must get through
        train_sampling_strategy="sequential",  # rows of one ready batch stay together (see _Rows)
        include_num_input_tokens_seen=True,
        use_cpu=torch.device(device).type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def run_reference(model_dir: str | Path, batches: list[dict], *, gradient_checkpointing: bool, steps: int,
                  device: str | torch.device = "cpu", step_begin: Callable[[int], None] | None = None,
                  step_end: Callable[[int], None] | None = None,
                  on_model: Callable[[torch.nn.Module], None] | None = None) -> dict:
    """Train `steps` optimizer steps of the reference recipe with HF's Trainer on `batches`, one batch per step
    (cycled), each a dict of ready model inputs (input_ids, attention_mask, labels, pixel_values, image_grid_thw and,
    for transformers >= 5.2x, mm_token_type_ids: without it the model silently gives image tokens 1-D positions).

    `on_model(model)` sees the PEFT model before training (to hook or count it). `step_begin(step)` / `step_end(step)`
    (step from 0) run in the training thread right before the step's forward and right after its optimizer step and
    zero_grad. Returns per-step losses and wall seconds, the peak memory (CUDA: the allocator's peak while training;
    CPU: the process's peak RSS, loading included), the tokens the Trainer counted (every input_id, padding
    included) and the adapter's parameter count.
    """
    from transformers import PrinterCallback, Trainer

    device = str(device)
    rows = {len(b["input_ids"]) for b in batches}
    if len(rows) != 1:
        raise ValueError(f"every batch needs the same number of rows, got {sorted(rows)}")
    if any("image_grid_thw" in b and "mm_token_type_ids" not in b for b in batches):
        log.warning("reference batches without mm_token_type_ids: the model falls back to 1-D positions for images")
    model = load_reference_model(model_dir, gradient_checkpointing=gradient_checkpointing, device=device)
    if on_model is not None:
        on_model(model)
    times: list[float] = []
    cuda = torch.device(device).type == "cuda"
    with tempfile.TemporaryDirectory(prefix="vlora-reference-") as out:
        args = reference_args(out, gradient_checkpointing=gradient_checkpointing, steps=steps,
                              batch_size=rows.pop(), device=device)
        data = _Rows(len(batches), args.per_device_train_batch_size, steps)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_collator(batches))
        trainer.remove_callback(PrinterCallback)  # the caller reports; the losses are in log_history
        trainer.add_callback(_callback(step_begin, step_end, device, times))
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:  # Linux reports ru_maxrss in KiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "step_seconds": times,
        "peak_memory_bytes": int(peak),
        "peak_mem_gib": peak / 2**30,
        "peak_memory_kind": "cuda_max_allocated" if cuda else "cpu_max_rss",
        "tokens": int(trainer.state.num_input_tokens_seen),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
