"""vlora.preflight: validate + the checks that read files, and the memory warning (a log line, never an error).

The one-line errors of each check are asserted in tests/test_config.py (and test_deepspeed.py for the JSON)."""

import json
import logging
import shutil

import pytest
import torch

from helpers import REPO
from vlora.config import load_config, validate
from vlora.engine import deepspeed_config
from vlora.preflight import estimate_run_memory, model_shape, preflight, warn_if_too_big

HUB_7B = REPO / "recipes" / "hub_configs" / "Qwen2.5-VL-7B-Instruct.json"


@pytest.fixture
def overrides(tmp_path, demo_shards):
    """A run on a stub 7B folder (only its config.json) and the demo shards."""
    model = tmp_path / "Qwen2.5-VL-7B-Instruct"
    model.mkdir()
    shutil.copy(HUB_7B, model / "config.json")
    return [f"model.path={model}", f"data.train={demo_shards / 'train'}", f"data.val={demo_shards / 'val'}",
            f"run.out_dir={tmp_path / 'runs'}", "data.num_workers=1", "run.precision=bf16"]


@pytest.fixture
def warnings_logged():
    """The vlora logger's warnings, whatever an earlier test's setup_logging did to its handlers."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("vlora")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_preflight_gives_validates_plan(overrides):
    cfg = load_config(None, overrides + ["optim.global_batch=64"])
    assert preflight(cfg, world_size=4) == validate(cfg, world_size=4)


def test_a_run_too_big_for_the_gpu_is_a_warning_not_an_error(overrides, monkeypatch, warnings_logged):
    monkeypatch.setattr("vlora.preflight.gpu_memory", lambda: 8 * 2**30)  # an 8 GiB GPU
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, overrides)
    assert preflight(cfg).grad_accum == 8  # the run goes on
    (record,) = warnings_logged
    message = record.getMessage()
    assert message.startswith("vlora: warning: this run may not fit the GPU's 8.0 GiB: estimated ")
    assert estimate_run_memory(cfg, 1).summary() in message and "model.gradient_checkpointing" in message
    assert "\n" not in message


def test_only_rank_0_warns_and_a_big_enough_gpu_is_quiet(overrides, monkeypatch, warnings_logged):
    cfg = load_config(None, overrides)
    monkeypatch.setenv("RANK", "3")
    assert warn_if_too_big(cfg, 1, available=2**30) is not None
    monkeypatch.setenv("RANK", "0")
    assert warn_if_too_big(cfg, 1, available=2**40).total < 2**40
    assert warnings_logged == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_no_gpu_no_estimate(overrides, warnings_logged):
    assert warn_if_too_big(load_config(None, overrides), 1) is None
    assert warnings_logged == []


def test_the_shape_comes_from_config_json_alone(overrides, tmp_path, monkeypatch):
    """A local folder's config.json, a hub id's only from the local cache (nothing is fetched), else nothing."""
    import huggingface_hub.constants

    assert model_shape(load_config(None, overrides)).hidden == 3584
    (tmp_path / "empty").mkdir()
    assert model_shape(load_config(None, [f"model.path={tmp_path / 'empty'}"])) is None
    hub_id = ["model.path=Qwen/Qwen2.5-VL-7B-Instruct"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_shape(load_config(None, hub_id)) is None
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-7B-Instruct"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    shutil.copy(HUB_7B, repo / "snapshots" / "abc" / "config.json")
    assert model_shape(load_config(None, hub_id)).layers == 28
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "something else"}))
    assert model_shape(load_config(None, [f"model.path={tmp_path / 'empty'}"])) is None  # loading will say why


def test_the_zero_stage_comes_from_the_deepspeed_json(overrides):
    cfg = load_config(None, overrides + ["run.engine=deepspeed", "run.deepspeed_config=ds_configs/zero3.json",
                                         "optim.global_batch=64", "optim.micro_batch=1"])
    plan = validate(cfg, 8)
    zero3 = estimate_run_memory(cfg, 8, deepspeed_config(cfg, plan, 8))
    ddp = estimate_run_memory(cfg, 8)
    assert zero3.base_4bit < ddp.base_4bit / 7
    cfg.run.deepspeed_config = "ds_configs/zero3_offload.json"
    assert estimate_run_memory(cfg, 8, deepspeed_config(cfg, plan, 8)).base_4bit == 0
