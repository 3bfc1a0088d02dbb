"""Shared fixtures: the tiny Qwen2.5-VL and the demo shards are built once per test session."""

import json
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
def tiny_models(tmp_path_factory, tiny_model_dir):
    """family -> the tiny model folder of that family (vlora.families), each built once, with the tests' lm_head
    scale and rope_theta; qwen2_5_vl is `tiny_model_dir` itself."""
    from vlora.tiny import build_tiny_model

    built = {"qwen2_5_vl": tiny_model_dir}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp("tiny") / f"tiny-{family}"
            built[family] = build_tiny_model(out, family=family, seed=0, lm_head_std=0.1, rope_theta=1e6)
        return built[family]

    return get


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


@pytest.fixture(scope="session")
def mixed_shards(tmp_path_factory, demo_src) -> Path:
    """Two shards: 32 text-only samples, then 32 with an image. With 2 ranks x 1 reader each, one rank's
    micro-batches are all text-only and the other's all have images (checked in test_deepspeed from the key traces)."""
    from vlora.data.pack import pack

    src = tmp_path_factory.mktemp("mixed_src")
    (src / "a_text.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]}) + "\n"
        for i in range(32)))
    lines = (demo_src / "train.jsonl").read_text().splitlines()[:32]
    (src / "b_images.jsonl").write_text("".join(line + "\n" for line in lines))
    (src / "images").symlink_to(demo_src / "images")
    out = tmp_path_factory.mktemp("mixed") / "train"
    summary = pack(src, out, shard_size=32)
    assert (summary.written, summary.shards) == (64, 2)
    return out
