"""What many tests need, once: config overrides for the tiny model and demo shards, a clean environment, launching
torchrun, waiting for a process to get somewhere, reading what a run wrote, comparing runs, a free port.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the team's shared folder beside the checkout (peers' data); may be absent


# ---- configs and environments ----


def run_overrides(tiny_model_dir, demo_shards, out_dir, **extra) -> list[str]:
    """`section.key=value` overrides for a small run of the tiny model on the demo shards, in out_dir/NAME."""
    base = {
        "model.path": tiny_model_dir, "data.train": demo_shards / "train", "data.val": demo_shards / "val",
        "data.num_workers": 1, "data.val_samples": 32, "run.out_dir": out_dir, "run.name": "t",
        "run.progress": "false", "optim.lr": 5e-3, "optim.warmup_steps": 2, "lora.dropout": 0.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def clean_env(**extra) -> dict:
    """This environment without torchrun's variables, one thread per process, unbuffered output, no hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- running ----


def torchrun_cmd(overrides: list[str], nproc: int = 2, *launcher_args: str) -> list[str]:
    """torchrun on this machine (--standalone unless launcher_args say otherwise) running train.py."""
    launcher = list(launcher_args) or ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc), "train.py",
            *overrides]


def torchrun(overrides: list[str], nproc: int = 2, *, env: dict | None = None, timeout: int = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """A torchrun launch to its end; with `check`, a non-zero status fails the test with the log's tail."""
    proc = subprocess.run(torchrun_cmd(overrides, nproc), cwd=REPO, env=clean_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_in_process(monkeypatch, tiny_model_dir, demo_shards, out_dir, **extra):
    """A run in this process, as a world of one (no torchrun variables leak in), through vlora.train's build and
    fit; returns the Run (its trained `model`, `collator`, `world`, `val_losses`, `state`, `dir`)."""
    import contextlib

    from vlora.config import load_config
    from vlora.preflight import preflight
    from vlora.train import build, fit

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "0")  # recorded, so that whatever the run sets is undone after the test
        monkeypatch.delenv(var)
    cfg = load_config(None, run_overrides(tiny_model_dir, demo_shards, out_dir, **{"data.num_workers": 0, **extra}))
    with contextlib.ExitStack() as resources:
        run = build(cfg, preflight(cfg), resources)
        fit(run)
    return run


def wait_until(predicate, timeout: float, what: str, *, proc: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.05) -> None:
    """Poll until predicate() holds; fail (with the log's tail) if `proc` ends first or the time runs out."""
    def tail() -> str:
        return log.read_text()[-4000:] if log is not None and log.is_file() else ""

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}:\n{tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{tail()}")
        time.sleep(interval)


# ---- what a run wrote ----


def read_jsonl(path: Path, torn_ok: bool = False) -> list[dict]:
    """The records of a JSON Lines file; with `torn_ok`, a line a killed writer left half-written is passed over
    (a resumed run goes on on a line of its own)."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if not torn_ok:
                    raise
    return out


def step_records(run_dir: Path, torn_ok: bool = False) -> dict[int, dict]:
    """Step -> the training record of metrics.jsonl (a later attempt's record of a step replaces an earlier one)."""
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl", torn_ok) if "loss" in r}


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_run(a: Path, b: Path, *, steps: int, rtol: float, atol: float = 2e-5, grad_norms: bool = True,
                    mean_atol: float | None = 1e-7, torn_ok: bool = False) -> None:
    """Runs a and b logged the same steps 1..steps with the same losses (and gradient norms) to `rtol`, and wrote
    the same adapter: every element to rtol/atol, and the mean difference below `mean_atol`."""
    ra, rb = step_records(a, torn_ok), step_records(b, torn_ok)
    assert sorted(ra) == sorted(rb) == list(range(1, steps + 1))
    for s in ra:
        assert ra[s]["loss"] == pytest.approx(rb[s]["loss"], rel=rtol, abs=rtol), s
        if grad_norms:
            assert ra[s]["grad_norm"] == pytest.approx(rb[s]["grad_norm"], rel=rtol), s
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        # Adam turns a gradient element near 0 into a +-lr step, so rounding can move a rare element by ~1e-5:
        # bound every element loosely and the mean tightly.
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol)
        if mean_atol is not None:
            assert (wa[k] - wb[k]).abs().mean() < mean_atol, k


def plain_peft_logits(tiny_model_dir, adapter_dir, batch):
    """(base logits, base + adapter logits) as a user gets them: the 4-bit tiny base and plain PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from vlora.model import full_logits, keep_training_layout

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["model.visual", "lm_head"])
    base = AutoModelForImageTextToText.from_pretrained(
        tiny_model_dir, quantization_config=quant, dtype=torch.float32, device_map="cpu")
    # bitsandbytes would otherwise repack the 4-bit weights for its bf16 CPU inference kernel in eval mode
    # (AVX512-BF16 machines only), which moves logits by ~0.02 whatever the adapter: compare like with like.
    keep_training_layout(base)
    untrained = full_logits(base, batch)
    return untrained, full_logits(PeftModel.from_pretrained(base, adapter_dir).eval(), batch)


class Planted:
    """A pickle that creates a file when it is loaded: the code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def random_adapter(tiny_model_dir, out_dir, *, seed: int, targets: str = "[llm_attn,llm_mlp]", scale: float = 0.3,
                   extra: tuple = ()) -> Path:
    """An adapter of the tiny 4-bit base with every LoRA weight drawn N(0, scale) (the peft init leaves B = 0,
    which would make an adapter indistinguishable from the base); saved with peft to out_dir."""
    import torch

    from conftest import tiny_lora_model

    model = tiny_lora_model(tiny_model_dir, f"lora.targets={targets}", *extra)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
