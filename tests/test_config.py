"""Config: file + overrides, types, unknown keys, batch arithmetic, paths; each error is one line naming the culprit.

validate() checks values alone; preflight() (vlora/preflight.py) runs it and then the checks that read files, so the
tests of paths, shards and run folders go through preflight.
"""

import ast
from pathlib import Path

import pytest

from vlora.config import group_values, load_config, validate
from vlora.errors import VloraError
from vlora.preflight import preflight

VLORA = Path(__file__).resolve().parents[1] / "vlora"


@pytest.fixture
def paths(tmp_path, demo_shards):
    """A config whose paths exist (8 train shards), so each test breaks exactly one thing."""
    (tmp_path / "model").mkdir()
    return [f"model.path={tmp_path / 'model'}", f"data.train={demo_shards / 'train'}",
            f"data.val={demo_shards / 'val'}", f"run.out_dir={tmp_path / 'runs'}", "data.num_workers=2"]


def test_file_then_overrides(tmp_path, paths):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\n  global_batch: 64\nlora:\n  targets: [llm_attn]\n")
    cfg = load_config(f, paths + ["optim.lr=5e-4", "run.progress=false", "lora.targets=llm_attn,merger"])
    assert cfg.optim.lr == 5e-4 and cfg.optim.global_batch == 64
    assert cfg.run.progress is False
    assert cfg.lora.targets == ["llm_attn", "merger"]
    plan = validate(cfg, world_size=4)
    assert plan.grad_accum == 64 // (4 * 4)


def test_too_few_shards_for_ranks_and_workers(paths):
    cfg = load_config(None, paths + ["optim.global_batch=64"])
    preflight(cfg, world_size=4)  # 8 shards, 4 ranks x 2 workers
    with pytest.raises(VloraError, match=r"has 8 shard\(s\) but 8 rank\(s\) x 2 worker\(s\) = 16 readers"):
        preflight(cfg, world_size=8)


def test_used_run_folder_needs_overwrite(tmp_path, paths):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(VloraError, match=r"run folder .*runs/demo already holds a run; .*run.overwrite=true"):
        preflight(load_config(None, paths))
    preflight(load_config(None, paths + ["run.overwrite=true"]))


def test_damaged_shard_folder_is_named(tmp_path, paths):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VloraError, match=r"empty"):
        preflight(load_config(None, paths + [f"data.val={tmp_path / 'empty'}"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("modle.path=x", "unknown config key 'modle.path'"),
        ("optim.max_steps=ten", "config key 'optim.max_steps' expects int, got 'ten'"),
        ("run.precision=fp8", "config key 'run.precision' is 'fp8'; choose one of auto, fp32, bf16, fp16"),
        ("lora.targets=llm_attn,vision", "lora.targets has 'vision'"),
        ("data.num_workers=-1", "config key 'data.num_workers' must be >= 0, got -1"),
        ("optim.min_lr_ratio=2", "config key 'optim.min_lr_ratio' must lie in [0, 1], got 2.0"),
        ("data.train_on=everything", "config key 'data.train_on' is 'everything'; choose one of assistant, all"),
    ],
)
def test_bad_keys_and_values(paths, override, message):
    with pytest.raises(VloraError) as e:
        validate(load_config(None, paths + [override]))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_batch_not_divisible(paths):
    cfg = load_config(None, paths + ["optim.global_batch=20", "optim.micro_batch=4"])
    assert validate(cfg, world_size=1).grad_accum == 5
    with pytest.raises(VloraError, match=r"optim.global_batch=20 is not divisible by .* = 4 x 2 = 8; set "
                                         r"optim.micro_batch=2 to keep this global batch on 2 process"):
        validate(cfg, world_size=2)
    with pytest.raises(VloraError, match=r"= 4 x 3 = 12; pick a global batch that is a multiple of 12"):
        validate(cfg, world_size=3)  # no micro-batch divides 20 over 3 processes


def test_missing_paths_named(tmp_path, paths):
    with pytest.raises(VloraError, match=r"model.path '.*/nowhere' does not exist"):
        preflight(load_config(None, paths + [f"model.path={tmp_path / 'nowhere'}"]))
    with pytest.raises(VloraError, match=r"data.train shard folder '.*/gone' does not exist"):
        preflight(load_config(None, paths + [f"data.train={tmp_path / 'gone'}"]))
    # An owner/name that is not on disk is a hub id: allowed here, resolved (or refused) at load time.
    preflight(load_config(None, paths + ["model.path=Qwen/Qwen2.5-VL-3B-Instruct"]))


def test_unknown_key_in_file(tmp_path, paths):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  open_shard: 10\n")
    with pytest.raises(VloraError, match="unknown config key 'data.open_shard' \\(did you mean 'data.open_shards'\\?\\)"):
        load_config(f, paths)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.targets=llm_attn,vision_attn"], "lora.targets has 'vision_attn' but model.freeze_vision=true; set "
                                                 "model.freeze_vision=false or drop 'vision_attn' from lora.targets"),
        (["model.freeze_llm=true"], "lora.targets has 'llm_attn' but model.freeze_llm=true"),
        (["model.freeze_merger=true"], "lora.targets has 'merger' but model.freeze_merger=true"),
        (["lora.targets=llm_attn", "lora.train_merger_fully=true", "model.freeze_merger=true"],
         "lora.train_merger_fully=true but model.freeze_merger=true"),
        (["lora.train_merger_fully=true"], "drop 'merger' from lora.targets"),
        (["lora.targets=[]"], "lora.targets is empty and lora.train_merger_fully=false: nothing would train"),
        (["lora.group_r=vision_mlp=8"],
         "config key 'lora.group_r' sets 'vision_mlp', which lora.targets does not place"),
        (["lora.group_alpha=merger:8"], "config key 'lora.group_alpha' item 'merger:8' must look like group=integer"),
        (["lora.group_r=projector=8"], "config key 'lora.group_r' names group 'projector'; choose from llm_attn"),
        (["lora.group_r=merger=0"], "config key 'lora.group_r' gives 'merger' 0; it must be positive"),
        (["lora.dropout=1"], "config key 'lora.dropout' must lie in [0, 1), got 1.0"),
        (["optim.lr_vision=0"], "config key 'optim.lr_vision' must be positive, got 0.0"),
        (["lora.init_from=/nowhere/adapter"], "lora.init_from '/nowhere/adapter' is not an adapter folder "
                                              "(no adapter_config.json)"),
    ],
)
def test_lora_freeze_and_lr_settings_are_checked_before_loading(paths, overrides, message):
    with pytest.raises(VloraError) as e:
        preflight(load_config(None, paths + overrides))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_lora_group_settings_parse_from_file_and_command_line(tmp_path, paths):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  freeze_vision: false\nlora:\n  targets: [llm_attn, merger, vision_attn]\n"
                 "  group_r: [merger=32, vision_attn=8]\noptim:\n  lr_merger: 10\n")
    cfg = load_config(f, paths + ["lora.group_alpha=merger=64,vision_attn=16", "lora.rslora=true"])
    validate(cfg)
    assert cfg.lora.group_r == ["merger=32", "vision_attn=8"]
    assert group_values("lora.group_alpha", cfg.lora.group_alpha) == {"merger": 64, "vision_attn": 16}
    assert cfg.optim.lr_merger == 10.0 and cfg.lora.rslora is True
    # A projector-only stage: no LoRA group, the merger trained fully, the LLM frozen.
    validate(load_config(None, paths + ["lora.targets=[]", "lora.train_merger_fully=true", "model.freeze_llm=true"]))


def test_train_as_a_yaml_list_is_joined(tmp_path, paths, demo_shards):
    f = tmp_path / "c.yaml"
    f.write_text(f"data:\n  train:\n    - {demo_shards / 'train'}:2\n    - {demo_shards / 'val'}\n")
    cfg = load_config(f, [p for p in paths if not p.startswith("data.train=")])
    assert cfg.data.train == f"{demo_shards / 'train'}:2,{demo_shards / 'val'}"
    preflight(cfg)
    f.write_text("run:\n  name: [a, b]\n")  # a list for any other text key is a mistake, not "['a', 'b']"
    with pytest.raises(VloraError, match=r"config key 'run.name' expects str, got \['a', 'b'\]"):
        load_config(f, paths)


def test_text_overrides_keep_the_raw_text(paths):
    cfg = load_config(None, paths + ["run.name=007", "run.resume=yes", "model.quant=none", "optim.lr=5e-4",
                                     "run.progress=no", "optim.max_steps=12"])
    assert (cfg.run.name, cfg.run.resume, cfg.model.quant) == ("007", "yes", "none")
    assert cfg.optim.lr == 5e-4 and cfg.run.progress is False and cfg.optim.max_steps == 12
    with pytest.raises(VloraError, match=r"override 'optim.lr=\[' is not a valid value"):
        load_config(None, ["optim.lr=["])


@pytest.mark.parametrize("override, message", [
    ("data.val_samples=-1", "config key 'data.val_samples' must be >= 0, got -1"),
    ("optim.beta1=1", "config key 'optim.beta1' must lie in [0, 1), got 1.0"),
    ("optim.beta2=-0.1", "config key 'optim.beta2' must lie in [0, 1), got -0.1"),
    ("optim.eps=0", "config key 'optim.eps' must be positive, got 0.0"),
])
def test_val_samples_and_adam_settings(paths, override, message):
    with pytest.raises(VloraError) as e:
        validate(load_config(None, paths + [override]))
    assert str(e.value) == message
    validate(load_config(None, paths + ["data.val_samples=0", "optim.beta1=0", "optim.beta2=0.95", "optim.eps=1e-6"]))


def test_max_pixels_below_what_the_shards_were_checked_for(tmp_path, paths, demo_shards, tiny_models):
    """A smaller data.max_pixels than the packed images allow could shrink one to a zero side in a data worker; the
    floor is the model family's (28 or 32 px per token)."""
    import json
    import shutil

    train = demo_shards / "train"
    # The demo images are square (112x112): they resize under any max_pixels from 28 * 28 + 1 on (32 * 32 + 1 for a
    # Qwen3-VL model).
    preflight(load_config(None, paths + ["data.min_pixels=785", "data.max_pixels=785"]))
    with pytest.raises(VloraError) as e:
        preflight(load_config(None, paths + ["data.min_pixels=784", "data.max_pixels=784"]))
    assert str(e.value) == (f"data.max_pixels=784 is below 785, the least that every image in {train} resizes under without a "
                            "zero side (its narrowest image); raise data.max_pixels to 785 or repack with "
                            "`vlora pack --max-pixels 784`, which rejects those images")
    assert json.loads((train / "manifest.json").read_text())["checks"]["max_pixels_floor"] == {"28": 785, "32": 1025}
    qwen3 = [f"model.path={tiny_models('qwen3_vl')}", "data.min_pixels=1024"]
    preflight(load_config(None, paths + qwen3 + ["data.max_pixels=1025"]))
    with pytest.raises(VloraError, match=r"^data.max_pixels=1024 is below 1025, the least"):
        preflight(load_config(None, paths + qwen3 + ["data.max_pixels=1024"]))
    # A manifest from before the floor was recorded: held to the max_pixels it was packed with.
    old = tmp_path / "old_val"
    shutil.copytree(demo_shards / "val", old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["checks"]["max_pixels_floor"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    preflight(load_config(None, paths + [f"data.val={old}", "data.max_pixels=200704"]))
    with pytest.raises(VloraError, match=rf"data.max_pixels=12544 is below max_pixels=200704, which {old} was packed"):
        preflight(load_config(None, paths + [f"data.val={old}", "data.max_pixels=12544"]))
    # Older packs' floors were checked at 28 px per token only: a family at 32 asks for a repack, whatever the floor.
    for checks in ({"max_pixels_floor": 785}, {"max_pixels": 200704}):
        (old / "manifest.json").write_text(json.dumps({**manifest, "checks": {**manifest["checks"], **checks}}))
        preflight(load_config(None, paths + [f"data.val={old}", "data.max_pixels=200704"]))
        with pytest.raises(VloraError, match=rf"^{old} was packed by an older vlora, which checked its images at 28 pixels "
                                             "per image token only; this model has 32: repack it"):
            preflight(load_config(None, paths + qwen3 + [f"data.val={old}", "data.max_pixels=200704"]))


def test_validate_reads_no_file(tmp_path):
    """validate() is the value check alone: paths that point nowhere are preflight's to refuse, not validate's."""
    nowhere = tmp_path / "nowhere"
    cfg = load_config(None, [f"model.path={nowhere}", f"data.train={nowhere}", f"data.val={nowhere}",
                             f"lora.init_from={nowhere}", "run.engine=deepspeed", f"run.deepspeed_config={nowhere}.json"])
    assert validate(cfg, world_size=8).grad_accum == 1
    with pytest.raises(VloraError, match=r"lora.init_from '.*nowhere' is not an adapter folder"):
        preflight(cfg, world_size=8)


def test_run_keys_stay_flat_while_grouped_by_concern(tmp_path):
    """run.* is split into four dataclasses in the code; the user's keys, cfg.run.<key> and the saved config stay flat."""
    import dataclasses

    from vlora.config import RUN_CONCERNS, RunArgs, save_config

    names = [f.name for f in dataclasses.fields(RunArgs)]
    by_concern = [f.name for concern in RUN_CONCERNS for f in dataclasses.fields(concern)]
    assert sorted(names) == sorted(by_concern) and len(set(by_concern)) == len(by_concern)  # each in one concern
    cfg = load_config(None, ["run.resume=auto", "run.save_every=5", "run.engine=deepspeed", "run.log_every=3",
                             "run.name=x", "run.dist_timeout_s=60", "run.keep_last=4", "run.wandb=true"])
    assert (cfg.run.resume, cfg.run.save_every, cfg.run.engine, cfg.run.log_every, cfg.run.name) == (
        "auto", 5, "deepspeed", 3, "x")
    assert all(isinstance(cfg.run, concern) for concern in RUN_CONCERNS)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and "run:\n  name: x\n" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(VloraError, match=r"unknown config key 'run.checkpoint.resume'"):
        load_config(None, ["run.checkpoint.resume=auto"])


def test_default_pixels_agree_with_the_data_package():
    """The data package may not import the config (nor the config it): the two copies of the defaults must agree."""
    from vlora.config import DataArgs
    from vlora.data.pack import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    assert (DataArgs.min_pixels, DataArgs.max_pixels) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


def vlora_imports(path: Path) -> set[str]:
    """The vlora modules a file imports, at any level (module, function, class), relative imports resolved."""
    import importlib.util

    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = {module_name(p) for p in VLORA.rglob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "vlora")
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            if base.split(".")[0] == "vlora":
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)  # from vlora import x
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(VLORA.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_config_is_a_leaf():
    """vlora/config.py imports nothing of vlora but vlora/errors.py, at any level."""
    assert vlora_imports(VLORA / "config.py") <= {"vlora.errors"}, vlora_imports(VLORA / "config.py")


def test_no_import_cycle_among_vlora_modules():
    """The graph of vlora's imports (every level, function-level included) has no cycle."""
    graph = {module_name(p): vlora_imports(p) - {module_name(p)} for p in VLORA.rglob("*.py")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_data_takes_plain_arguments():
    """vlora/data/ imports neither the training config nor the model, the engine or the loop (DESIGN: data flows one
    way); vlora/cli.py does not reach the config for the packer's defaults either."""
    for path in sorted((VLORA / "data").rglob("*.py")):
        imported = vlora_imports(path)
        assert not imported & {"vlora.config", "vlora.model", "vlora.engine", "vlora.train", "vlora.checkpoint"}, (
            path.name, imported)
    assert "vlora.config" not in vlora_imports(VLORA / "cli.py")


def test_data_boxes_choices_are_the_families_box_modes():
    """config.py stays a leaf, so it spells data.boxes' values itself: they must be vlora.families.BOX_MODES."""
    from vlora import families
    from vlora.config import CHOICES

    assert CHOICES["data.boxes"] == families.BOX_MODES
