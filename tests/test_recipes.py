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
        "Qwen/Qwen2.5-VL-72B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen/Qwen3-VL-32B-Instruct", "Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3.5-27B"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_pixel_budgets_are_whole_tokens_of_its_family(recipe):
    """data.min_pixels / max_pixels are factor x factor x tokens at the family's resize factor (28 px per token for
    Qwen2/2.5-VL, 32 for Qwen3-VL/3.5), and a budget's comment ("# 32 x 32 x 256: ...") says so."""
    import json

    from vlora import families

    cfg = load_config(recipe)
    factor = families.of_config(json.loads(hub_config(cfg).read_text())).resize_factor
    for key in ("min_pixels", "max_pixels"):
        value = getattr(cfg.data, key)
        assert value % factor**2 == 0, f"{recipe.name}: data.{key}={value} is not a whole number of {factor} px tokens"
        comment = re.search(rf"^  {key}: {value} +# (\d+) x (\d+) x (\d+):", recipe.read_text(), re.M)
        if comment:
            assert (int(comment[1]), int(comment[2]), value) == (factor, factor, factor**2 * int(comment[3]))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_moe_recipes_adapt_no_routed_expert(recipe):
    """llm_mlp finds no Linear in Qwen3-VL-MoE's layers (the experts are 3-D parameters): vlora refuses it there."""
    from vlora.memory import read_shape

    cfg = load_config(recipe)
    shape = read_shape(hub_config(cfg))
    if shape.moe_layers and not shape.shared_expert_intermediate:
        assert "llm_mlp" not in cfg.lora.targets


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
