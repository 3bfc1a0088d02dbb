"""recipes/*.yaml: each passes preflight against a stub model folder that holds only the checkpoint's published
config.json (no weights), and its `# batch:` and `# memory:` comments are what the config and vlora.memory say."""

import re
import shutil
from pathlib import Path

import pytest

from helpers import REPO
from vlora.config import load_config, validate
from vlora.preflight import estimate_run_memory, preflight

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
HUB_CONFIGS = REPO / "recipes" / "hub_configs"


def header(path: Path) -> dict:
    """The recipe's machine-checked comment lines: gpus, batch (global, micro, gpus, accumulation), memory."""
    text = path.read_text()
    gpus = re.search(r"^# gpus: (\d+)$", text, re.M)
    batch = re.search(r"^# batch: global (\d+) = micro (\d+) x (\d+) GPUs? x (\d+) accumulation steps?$", text, re.M)
    memory = re.search(r"^# memory: (.*)$", text, re.M)
    assert gpus and batch and memory, f"{path.name} lacks a '# gpus:', '# batch:' or '# memory:' line"
    return {"gpus": int(gpus[1]), "batch": tuple(int(x) for x in batch.groups()), "memory": memory[1]}


def hub_config(cfg) -> Path:
    """recipes/hub_configs/NAME.json for model.path Qwen/NAME."""
    return HUB_CONFIGS / f"{cfg.model.path.split('/')[-1]}.json"


def recipe_estimate(path: Path, overrides=()):
    """(config, gpus, vlora.memory estimate) of a recipe, on its published config.json."""
    from vlora.memory import read_shape

    gpus = header(path)["gpus"]
    cfg = load_config(path, list(overrides))
    ds_config = None
    if cfg.run.engine == "deepspeed":
        from vlora.engine import deepspeed_config

        ds_config = deepspeed_config(cfg, validate(cfg, gpus), gpus)
    return cfg, gpus, estimate_run_memory(cfg, gpus, ds_config, shape=read_shape(hub_config(load_config(path))))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, demo_src) -> Path:
    """The demo training samples one per shard (256 shards): enough for 32 GPUs x 4 data workers."""
    from vlora.data.pack import pack

    out = tmp_path_factory.mktemp("many") / "train"
    pack(demo_src / "train.jsonl", out, shard_size=1)
    return out


def test_there_are_recipes_for_the_public_checkpoints():
    assert {load_config(p).model.path for p in RECIPES} == {
        "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-32B-Instruct",
        "Qwen/Qwen2.5-VL-72B-Instruct"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_passes_preflight_with_only_a_config_json(recipe, tmp_path, many_shards, demo_shards):
    cfg = load_config(recipe)
    stub = tmp_path / cfg.model.path.split("/")[-1]
    stub.mkdir()
    shutil.copy(hub_config(cfg), stub / "config.json")  # no weights, no tokenizer: preflight must not need them
    info = header(recipe)
    cfg = load_config(recipe, [f"model.path={stub}", f"data.train={many_shards}", f"data.val={demo_shards / 'val'}",
                               f"run.out_dir={tmp_path / 'runs'}"])
    plan = preflight(cfg, world_size=info["gpus"])
    assert info["batch"] == (cfg.optim.global_batch, cfg.optim.micro_batch, info["gpus"], plan.grad_accum)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_memory_comment_is_the_estimate(recipe):
    """The figure in the comment is recomputed, so it cannot drift from the config or the estimator."""
    _, _, estimate = recipe_estimate(recipe)
    assert header(recipe)["memory"] == estimate.summary(), (
        f"{recipe.name}: write '# memory: {estimate.summary()}'")
