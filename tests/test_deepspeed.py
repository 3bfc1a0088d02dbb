"""engine=deepspeed: ZeRO-2 and ZeRO-3 under the same loop, on the CPU with gloo and 2 ranks, 4-bit tiny model.

One set of launches serves several tests (module-scoped, each run made on first use):
    ddp            the reference: 4 steps on a mixed data set (rank 0 reads only text, rank 1 only images)
    zero2, zero3   the same 4 steps under DeepSpeed, a checkpoint at step 2 (ZeRO-3 also dumps its logits)
    zero2_resumed, zero3_resumed   resumed from that step-2 checkpoint (ZeRO-3 with run.zero3_init=false)
and one more launch for a rank that stops answering. LoRA dropout is on, so resume also needs the RNG states.

Per-step losses of ZeRO-2/3 equal DDP's to a relative 1e-5 (the engines sum gradients over ranks in different
orders; measured differences are ~1e-7). Resume is bit-exact.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_lora_model
from test_loop import adapter_weights, step_records
from test_train import clean_env, plain_peft_logits, read_jsonl, run_overrides
from vlora.config import Plan, load_config
from vlora.errors import VloraError

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

STEPS = 4
DS_ENV = {"TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
RUN = {
    "optim.max_steps": STEPS, "optim.global_batch": 8, "optim.micro_batch": 2, "lora.dropout": 0.1,
    "run.save_every": 2, "run.keep_last": 5, "run.trace_keys": "true", "run.plot": "false", "data.val_samples": 8,
    "run.dist_timeout_s": 60,  # a hang (e.g. mixed batches under ZeRO-3) becomes an error within a minute
}
ENGINES = {
    "ddp": {"run.engine": "ddp"},
    "zero2": {"run.engine": "deepspeed", "run.deepspeed_config": "ds_configs/zero2.json"},
    "zero3": {"run.engine": "deepspeed", "run.deepspeed_config": "ds_configs/zero3.json"},
}


def launch(overrides: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(**DS_ENV, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, demo_src) -> Path:
    """Two shards: 32 text-only samples, then 32 with an image. With 2 ranks x 1 reader each, one rank's
    micro-batches are all text-only and the other's all have images (checked below from the key traces)."""
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, demo_shards, mixed_shards):
    """name -> (run folder, torchrun's result); each launch happens once, when a test first needs it."""
    out = tmp_path_factory.mktemp("ds_runs")
    done = {}
    recipes = {
        "ddp": ({**ENGINES["ddp"]}, {}),
        "zero2": ({**ENGINES["zero2"]}, {}),
        "zero3": ({**ENGINES["zero3"]}, {"VLORA_DEBUG_LOGITS": str(out / "zero3_logits.pt")}),
        "zero2_resumed": ({**ENGINES["zero2"], "run.resume": "{zero2}/step_00000002"}, {}),
        "zero3_resumed": ({**ENGINES["zero3"], "run.resume": "{zero3}/step_00000002", "run.zero3_init": "false"}, {}),
    }

    def get(name: str):
        if name not in done:
            extra, env = recipes[name]
            if "run.resume" in extra:
                source = extra["run.resume"].split("}")[0][1:]
                get(source)
                extra = {**extra, "run.resume": extra["run.resume"].format(**{source: out / source})}
            start = time.perf_counter()
            proc = launch(run_overrides(tiny_model_dir, demo_shards, out, **RUN, **extra, **{
                "run.name": name, "data.train": mixed_shards}), env=env)
            done[name] = (out / name, proc, time.perf_counter() - start)
        return done[name]

    return get


def assert_losses_match(a: Path, b: Path, rtol: float, steps=range(1, STEPS + 1)) -> None:
    ra, rb = step_records(a), step_records(b)
    for s in steps:
        assert ra[s]["loss"] == pytest.approx(rb[s]["loss"], rel=rtol), (s, ra[s]["loss"], rb[s]["loss"])
        assert ra[s]["grad_norm"] == pytest.approx(rb[s]["grad_norm"], rel=rtol), s


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_trains_the_4bit_model_with_ddp_losses(runs, engine):
    """ZeRO-2 and ZeRO-3 train the 4-bit tiny model; every step's loss and gradient norm equal the DDP engine's on
    the same data to a relative 1e-5. The data is mixed: under ZeRO-3 that is the no-hang test as well."""
    run, proc, _ = runs(engine)
    ddp, _, _ = runs("ddp")
    assert f"engine deepspeed-{engine}" in proc.stderr and "4-bit nf4" in proc.stderr
    assert sorted(step_records(run)) == list(range(1, STEPS + 1))
    assert_losses_match(run, ddp, rtol=1e-5)
    losses = [step_records(run)[s]["loss"] for s in range(1, STEPS + 1)]
    assert losses[-1] < losses[0] - 0.5  # it really trains
    # vlora's config reached DeepSpeed: global batch 8 = 2 per rank x 2 ranks x 2 accumulation steps
    ds_config = torch.load(run / "step_00000004" / "deepspeed" / model_states(engine), weights_only=False)["ds_config"]
    assert (ds_config["train_batch_size"], ds_config["train_micro_batch_size_per_gpu"],
            ds_config["gradient_accumulation_steps"], ds_config["gradient_clipping"]) == (8, 2, 2, 1.0)
    assert ds_config["zero_optimization"]["stage"] == int(engine[-1])


def model_states(engine: str, rank: int = 0) -> str:
    return "mp_rank_00_model_states.pt" if engine == "zero2" else f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_checkpoint_holds_deepspeed_shards_of_what_trains_and_resume_is_exact(runs, engine):
    run, _, _ = runs(engine)
    resumed, proc, _ = runs(f"{engine}_resumed")
    assert f"resumed from {run / 'step_00000002'} at step 2" in proc.stderr

    # DeepSpeed's files sit inside vlora's step folder, one optimizer shard per rank (ZeRO-3: model states too).
    folder = run / "step_00000002"
    files = {p.name for p in (folder / "deepspeed").iterdir()}
    per_rank = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    expected = per_rank | ({model_states(engine)} if engine == "zero2" else {model_states(engine, r) for r in (0, 1)})
    assert files == expected
    assert {"adapter", "train_state.json", "rank00000.json", "rank00001.json", "rng.rank00000.pt",
            "rng.rank00001.pt"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "train_state.json").read_text())["engine"] == f"deepspeed-{engine}"
    # Only what trains: the LoRA weights, no frozen or quantized base weight, no 4-bit quant state.
    module = torch.load(folder / "deepspeed" / model_states(engine), weights_only=False)["module"]
    assert module and all(".lora_A." in k or ".lora_B." in k for k in module), [k for k in module if "lora" not in k]
    trained = {k.replace("peft_model.", "", 1).replace(".default", "") for k in module}
    adapter_keys = set(adapter_weights(run))
    assert trained == adapter_keys

    # Exact: the resumed steps 3-4 (losses, gradient norms) and the final adapter, bit for bit.
    assert sorted(step_records(resumed)) == [3, 4]
    for s in (3, 4):
        assert step_records(resumed)[s]["loss"] == step_records(run)[s]["loss"]
        assert step_records(resumed)[s]["grad_norm"] == step_records(run)[s]["grad_norm"]
    for k, w in adapter_weights(run).items():
        assert torch.equal(w, adapter_weights(resumed)[k]), k


@pytest.mark.slow
def test_zero3_adapter_loads_with_plain_peft_and_gives_the_trained_logits(runs, tiny_model_dir):
    """The adapter exported from ZeRO-3 shards (gathered to rank 0) in PEFT's layout, loaded by plain peft onto
    the 4-bit base, reproduces the logits the trained ZeRO-3 model computed in the run."""
    run, _, _ = runs("zero3")
    dump = torch.load(run.parent / "zero3_logits.pt", weights_only=False)
    batch, trained = dump["batch"], dump["logits"]
    untrained, theirs = plain_peft_logits(tiny_model_dir, run / "adapter", batch)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(trained[mask], theirs[mask], atol=1e-5, rtol=0), (trained[mask] - theirs[mask]).abs().max()
    assert (trained[mask] - untrained[mask]).abs().max() > 1e-2  # the adapter really changes the model
    assert (run / "adapter" / "processor_config.json").is_file()


@pytest.mark.slow
def test_mixed_batches_under_zero3_one_rank_text_only(runs):
    """USERS.md #2: rank 0's micro-batches have no image, rank 1's all have; ZeRO-3 finished all steps (a hang would
    have hit run.dist_timeout_s=60 or the launch's timeout) with DDP's losses (test above)."""
    run, _, _ = runs("zero3")
    keys = {r: read_jsonl(run / "keys" / f"rank{r}.jsonl") for r in (0, 1)}
    assert [rec["step"] for rec in keys[0]] == list(range(1, STEPS + 1))
    kinds = {r: {k.split("_")[0] for rec in keys[r] for k in rec["keys"]} for r in (0, 1)}
    assert kinds == {0: {"a"}, 1: {"b"}}  # a_text_* on rank 0, b_images_* on rank 1


@pytest.mark.slow
def test_a_stalled_rank_ends_the_run_within_the_timeout_naming_it(tiny_model_dir, demo_shards, mixed_shards,
                                                                  tmp_path):
    """Rank 1 stops answering at step 3 (VLORA_DEBUG_STALL); rank 0's next collective times out after
    run.dist_timeout_s and the run ends with one line naming rank 1 and the step. (The stalled rank dies when
    torchrun passes on the failure with SIGTERM; a truly stuck one torchrun SIGKILLs 30 s later.) ZeRO-3 with the
    LLM-only targets: the vision tower runs on text-only batches only to keep the ranks in lockstep."""
    timeout = 10
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
               **RUN, **ENGINES["zero3"], "data.train": mixed_shards, "run.dist_timeout_s": timeout,
               "lora.targets": "llm_attn,llm_mlp", "data.val": ""})]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(**DS_ENV, VLORA_DEBUG_STALL="1:3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "t"
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and 2 in step_records(run)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    stalled_at = time.monotonic()
    _, err = proc.communicate(timeout=timeout + 90)
    took = time.monotonic() - stalled_at  # includes saving step 2's checkpoint and stopping both ranks
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("vlora: error:")]
    assert errors == ["vlora: error: [rank 0] collective at step 3 timed out after 10 s (run.dist_timeout_s); "
                      "stopped answering: rank 1 (last entered step 2)"], err[-3000:]
    assert timeout <= took < timeout + 20, took
    assert sorted(step_records(run)) == [1, 2]


# ---- no launch: the DeepSpeed config, and the idle vision pass ----


def _cfg(tmp_path, ds: dict | None = None, *overrides):
    path = tmp_path / "ds.json"
    if ds is not None:
        path.write_text(json.dumps(ds))
    return load_config(None, ["run.engine=deepspeed", f"run.deepspeed_config={path}", "optim.global_batch=32",
                              "optim.micro_batch=4", *overrides])


def test_shipped_configs_get_vlora_batch_accumulation_precision_and_clipping():
    from vlora.engine import deepspeed_config

    cfg = load_config(None, ["optim.global_batch=32", "optim.micro_batch=4", "optim.grad_clip=0.5"])
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        cfg.run.deepspeed_config = f"ds_configs/{name}.json"
        ds = deepspeed_config(cfg, Plan(grad_accum=2), world_size=4, precision="bf16")
        assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
        assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
        assert ds["zero_optimization"]["stage"] == stage and "optimizer" not in ds
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # vlora's AdamW on the offloaded copy, nothing compiled


def test_a_users_json_sets_only_what_it_names(tmp_path):
    from vlora.engine import deepspeed_config

    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1234},
                          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4,
                          "bf16": {"enabled": "auto"}, "fp16": {"loss_scale_window": 500}})
    ds = deepspeed_config(cfg, Plan(grad_accum=4), world_size=2, precision="fp16")
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1234}
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 4
    assert ds["fp16"] == {"loss_scale_window": 500, "enabled": True} and ds["bf16"] == {"enabled": False}
    assert ds["steps_per_print"] > 10**6  # vlora's default, untouched by the JSON


@pytest.mark.parametrize("ds, overrides, message", [
    ({"train_micro_batch_size_per_gpu": 8}, [],
     "sets train_micro_batch_size_per_gpu=8, but optim.micro_batch gives 4 (world size 2)"),
    ({"gradient_accumulation_steps": 1}, [],
     "sets gradient_accumulation_steps=1, but optim.global_batch / (optim.micro_batch x world size) gives 4"),
    ({"gradient_clipping": 0.3}, [], "sets gradient_clipping=0.3, but optim.grad_clip gives 1.0"),
    ({"bf16": {"enabled": True}}, ["run.precision=fp32"], "sets bf16.enabled=true, but run.precision is fp32"),
    ({"optimizer": {"type": "AdamW"}}, [], "has an 'optimizer' section; vlora builds AdamW"),
    ({"scheduler": {"type": "WarmupLR"}}, [], "has an 'scheduler' section"),
    ({"zero_optimization": {"stage": 4}}, [], "zero_optimization.stage is 4"),
    ({"zero_optimization": {"stage": 3}}, ["lora.dora=true"], "lora.dora=true does not work under ZeRO-3"),
    (None, [], "does not exist"),
], ids=["micro", "accum", "clip", "precision", "optimizer", "scheduler", "stage", "dora", "missing"])
def test_a_conflict_is_one_clear_line(tmp_path, ds, overrides, message):
    from vlora.engine import deepspeed_config

    cfg = _cfg(tmp_path, ds, *overrides)
    with pytest.raises(VloraError) as err:
        deepspeed_config(cfg, Plan(grad_accum=4), world_size=2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_validate_checks_the_deepspeed_json_before_any_model_loads(tiny_model_dir, demo_shards, tmp_path):
    from vlora.config import validate

    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2},')
    cfg = load_config(None, run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
        "run.engine": "deepspeed", "run.deepspeed_config": tmp_path / "bad.json"}))
    with pytest.raises(VloraError, match="is not valid JSON"):
        validate(cfg)
    cfg.run.deepspeed_config = "ds_configs/zero3.json"
    assert validate(cfg).grad_accum == 8


def test_idle_vision_pass_runs_where_images_would_and_changes_nothing(tiny_model_dir):
    """Under ZeRO-3 a text-only batch runs the vision tower (vision_lockstep), also when nothing in it trains:
    after the token embedding and before the first layer, as for an image batch; loss and gradients unchanged."""
    from vlora.data.collate import Collator
    from vlora.model import SupervisedLoss, load_processor

    model = tiny_lora_model(tiny_model_dir, "lora.targets=llm_attn,llm_mlp")
    collator = Collator(load_processor(str(tiny_model_dir)), min_pixels=3136, max_pixels=12544, max_length=512)
    text = [{"__key__": f"t{i}", "json": json.dumps({"messages": [
        {"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} {i} {i}"}]}).encode()}
        for i in range(2)]
    batch = collator.collate([collator.encode(s) for s in text])
    assert batch.get("pixel_values") is None
    base = model.get_base_model()
    order = []
    hooks = [m.register_forward_pre_hook(lambda *a, name=name: order.append(name)) for name, m in (
        ("embed", base.model.language_model.embed_tokens), ("vision", base.model.visual),
        ("layer0", base.model.language_model.layers[0]))]
    results = []
    for lockstep in (False, True):
        order.clear()
        model.zero_grad(set_to_none=True)
        loss = SupervisedLoss(model, vision_lockstep=lockstep)(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, list(order)))
    for h in hooks:
        h.remove()
    (plain, plain_grads, plain_order), (idle, idle_grads, idle_order) = results
    assert plain_order == ["embed", "layer0"] and idle_order == ["embed", "vision", "layer0"]
    assert torch.equal(plain, idle)
    assert all(torch.equal(plain_grads[n], idle_grads[n]) for n in plain_grads)


def test_launch_scripts_engine_setting_becomes_overrides():
    """ENGINE in launch/slurm.sbatch (and torchrun.sh, the same lines) turns into run.engine / run.deepspeed_config
    ahead of the command line's overrides, which win."""
    sbatch = REPO / "launch" / "slurm.sbatch"
    for script in (sbatch, REPO / "launch" / "torchrun.sh"):
        settings = script.read_text().split("# ---- settings")[1].split("# -----")[0]
        assert "ENGINE=${ENGINE:-}" in settings
    for engine, expected in (("", "--config vlora/configs/demo.yaml run.name=x"),
                             ("zero3", "run.engine=deepspeed run.deepspeed_config=ds_configs/zero3.json run.name=x"),
                             ("my.json", "run.engine=deepspeed run.deepspeed_config=my.json run.name=x"),
                             ("ddp", "run.engine=ddp run.name=x")):
        proc = subprocess.run(["bash", str(sbatch), "run.name=x"], cwd=REPO, capture_output=True, text=True,
                              env=clean_env(DRY_RUN="1", ENGINE=engine), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert expected + " run.resume=auto" in proc.stdout, proc.stdout
