"""Shared fixtures: the tiny Qwen2.5-VL and the demo shards are built once per test session."""

import os
from pathlib import Path

import pytest
import torch

from helpers import REPO  # noqa: F401  (tests that still import it from here)

# Tests never reach a model hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlora.tiny import build_tiny_model

    # The tests' model keeps session 2's lm_head scale and rope_theta (the demo's model learns faster with
    # vlora.tiny's defaults): the fp16 overflow and skip tests are tuned to this model's logits.
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl", seed=0, lm_head_std=0.1,
                            rope_theta=1e6)


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    from vlora.data.synth import write_demo_data

    out = tmp_path_factory.mktemp("demo_src")
    write_demo_data(out, n_train=256, n_val=64, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, demo_src) -> Path:
    """shards/train (8 shards of 32) and shards/val (2 shards of 32), as `make shards` lays them out."""
    from vlora.data.pack import pack

    out = tmp_path_factory.mktemp("shards")
    pack(demo_src / "train.jsonl", out / "train", shard_size=32)
    pack(demo_src / "val.jsonl", out / "val", shard_size=32)
    return out


def tiny_lora_model(tiny_model_dir: Path, *overrides: str):
    """The tiny 4-bit base with LoRA (fp32 compute, no dropout), lora_B given weight so every adapter matters."""
    from vlora.config import load_config
    from vlora.model import build_model

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "lora.dropout=0", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    for name, p in model.named_parameters():  # LoRA B starts at zero, which would hide the adapter's path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()
