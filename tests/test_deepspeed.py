"""engine=deepspeed: ZeRO-2 and ZeRO-3 under the same loop, on the CPU with gloo and 2 ranks, 4-bit tiny model.

One set of launches serves several tests (module-scoped, each run made on first use):
    ddp            the reference: 4 steps on a mixed data set (rank 0 reads only text, rank 1 only images)
    zero2, zero3, zero3_offload   the same 4 steps under DeepSpeed, a checkpoint at step 2
    zero2_resumed, zero3_resumed, zero3_offload_resumed   resumed from that step-2 checkpoint (ZeRO-3 with
                   run.zero3_init=false)
    zero2_nan      ZeRO-2 whose rank 1 gets a NaN loss at step 2 (failpoint)
and two more launches: a rank that stops answering, and a resume from a checkpoint with a planted pickle. LoRA
dropout is on, so resume also needs the RNG states. The held-out set (9 samples) is split unevenly: 3 batches on
rank 0, 2 on rank 1, which ZeRO-3's lockstep evaluation has to even out.

Per-step losses of ZeRO-2/3 equal DDP's to a relative 1e-5 (the engines sum gradients over ranks in different
orders; measured differences are ~1e-7). Resume is bit-exact.
"""

import contextlib
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_lora_model
from helpers import (
    REPO, Planted, adapter_weights, clean_env, plain_peft_logits, read_jsonl, run_overrides, step_records, torchrun,
    torchrun_cmd, wait_until,
)
from vlora.config import Plan, load_config
from vlora.engine import DS_TAG, DeepSpeedEngine
from vlora.errors import VloraError

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

STEPS = 4
DS_ENV = {"TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
RUN = {
    "optim.max_steps": STEPS, "optim.global_batch": 8, "optim.micro_batch": 2, "lora.dropout": 0.1,
    "run.save_every": 2, "run.keep_last": 5, "run.trace_keys": "true", "run.plot": "false", "data.val_samples": 9,
    "run.dist_timeout_s": 60,  # a hang (e.g. mixed batches under ZeRO-3) becomes an error within a minute
}
ENGINES = {
    "ddp": {"run.engine": "ddp"},
    "zero2": {"run.engine": "deepspeed", "run.deepspeed_config": "ds_configs/zero2.json"},
    "zero3": {"run.engine": "deepspeed", "run.deepspeed_config": "ds_configs/zero3.json"},
    "zero3_offload": {"run.engine": "deepspeed", "run.deepspeed_config": "ds_configs/zero3_offload.json"},
}
# ZeRO-2's and ZeRO-3's files in a checkpoint's deepspeed/ folder (2 ranks).
DS_FILES = {
    "zero2": ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    "zero3": [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")],
}


def launch(overrides: list[str], env: dict | None = None, timeout: int = 300,
           check: bool = True) -> subprocess.CompletedProcess:
    """torchrun with 2 ranks and DeepSpeed's compile cache in the project."""
    return torchrun(overrides, env={**DS_ENV, **(env or {})}, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, demo_shards, mixed_shards):
    """name -> (run folder, torchrun's result); each launch happens once, when a test first needs it."""
    out = tmp_path_factory.mktemp("ds_runs")
    done = {}
    recipes = {
        # Both answer 3 held-out samples at each evaluation (2 on rank 0, 1 on rank 1: ZeRO-3 generates in step).
        "ddp": ({**ENGINES["ddp"], "run.eval_generate": 3}, {}),
        "zero2": ({**ENGINES["zero2"], "run.param_digest": "true"}, {}),
        "zero3": ({**ENGINES["zero3"], "run.eval_generate": 3}, {}),
        "zero3_offload": ({**ENGINES["zero3_offload"]}, {}),
        "zero2_resumed": ({**ENGINES["zero2"], "run.resume": "{zero2}/step_00000002"}, {}),
        "zero3_resumed": ({**ENGINES["zero3"], "run.resume": "{zero3}/step_00000002", "run.zero3_init": "false"}, {}),
        "zero3_offload_resumed": ({**ENGINES["zero3_offload"], "run.resume": "{zero3_offload}/step_00000002"}, {}),
        # Rank 1's loss is NaN at step 2 (rank 0's is finite): the whole step must be skipped on both ranks.
        "zero2_nan": ({**ENGINES["zero2"], "run.param_digest": "true", "run.save_every": 0, "data.val": ""},
                      {"VLORA_FAILPOINTS": "nan@loss:step2:rank1"}),
    }

    def get(name: str):
        if name not in done:
            extra, env = recipes[name]
            if "run.resume" in extra:
                source = extra["run.resume"].split("}")[0][1:]
                get(source)
                extra = {**extra, "run.resume": extra["run.resume"].format(**{source: out / source})}
            start = time.perf_counter()
            proc = launch(run_overrides(tiny_model_dir, demo_shards, out, **{
                **RUN, **extra, "run.name": name, "data.train": mixed_shards}), env=env)
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
    ds_config = torch.load(run / "step_00000004" / "deepspeed" / model_states(engine), weights_only=True)["ds_config"]
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
    assert {"adapter", "train_state.json", "rank00000.json", "rank00001.json", "rng.rank00000.safetensors",
            "rng.rank00001.safetensors"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "train_state.json").read_text())["engine"] == f"deepspeed-{engine}"
    # Only what trains: the LoRA weights, no frozen or quantized base weight, no 4-bit quant state.
    module = torch.load(folder / "deepspeed" / model_states(engine), weights_only=True)["module"]
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


@pytest.fixture(scope="module")
def heldout(tiny_model_dir, demo_shards) -> list[list[dict]]:
    """Each rank's held-out batches, built as the runs build them (RUN's data.val_samples and micro-batch)."""
    from vlora.data.collate import Collator
    from vlora.data.stream import heldout_batches
    from vlora.model import load_processor

    data = load_config(None, []).data
    collator = Collator(load_processor(str(tiny_model_dir)), min_pixels=data.min_pixels, max_pixels=data.max_pixels,
                        max_length=data.max_length, train_on=data.train_on, pixel_dtype=torch.float32,
                        pack_length=data.pack_length)
    return [heldout_batches(str(demo_shards / "val"), rank=r, world_size=2, max_samples=RUN["data.val_samples"],
                            micro_batch=RUN["optim.micro_batch"], encode=collator.encode, collate=collator.collate)
            for r in (0, 1)]


def run_model(run: Path):
    """The run's own model (its config.yaml: base, LoRA layout and scaling), built afresh on the CPU, eval mode."""
    from vlora.model import build_model

    cfg = load_config(run / "config.yaml", [])
    torch.manual_seed(cfg.run.seed)  # the LoRA init the run started from (B = 0: the base's outputs)
    return build_model(cfg, torch.device("cpu"), torch.float32).eval()


def ds_to_adapter_name(name: str) -> str:
    """A trained tensor's name in DeepSpeed's files (the loss module's) -> in the PEFT adapter file."""
    return name.removeprefix("peft_model.").replace(".default", "")


@pytest.mark.slow
def test_zero3_adapter_is_deepspeeds_trained_weights_and_plain_peft_gives_the_trained_logits(
        runs, tiny_model_dir, heldout):
    """The adapter exported from ZeRO-3 shards (gathered to rank 0) holds exactly the trained weights DeepSpeed
    checkpointed at the last step (its fp32 partitions consolidated; an fp32 run, so the masters are the weights),
    by name, every one. Loaded by plain peft onto the 4-bit base it gives the logits of the run's own model with
    those weights (so adapter_config.json has the run's layout and scaling), which differ from the base's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vlora.model import full_logits

    run, _, _ = runs("zero3")
    final = run / f"step_{STEPS:08d}"
    masters = get_fp32_state_dict_from_zero_checkpoint(str(final), tag=DS_TAG)
    adapter = adapter_weights(run)
    assert masters and all(".lora_A." in k or ".lora_B." in k for k in masters), list(masters)[:3]
    assert sorted(ds_to_adapter_name(k) for k in masters) == sorted(adapter)
    for name, master in masters.items():
        exported = adapter[ds_to_adapter_name(name)]
        assert master.dtype == exported.dtype == torch.float32, name
        assert torch.equal(master, exported), name
    assert any(".lora_B." in k and master.abs().max() > 0 for k, master in masters.items())  # B trained off zero
    # The run's own model with DeepSpeed's weights vs. the exported adapter in plain peft, on rank 0's first
    # held-out batch.
    model = run_model(run)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trained) == sorted(k.removeprefix("peft_model.") for k in masters)
    with torch.no_grad():
        for name, master in masters.items():
            trained[name.removeprefix("peft_model.")].copy_(master)
    batch = heldout[0][0]
    ours = full_logits(model, batch)
    untrained, theirs = plain_peft_logits(tiny_model_dir, run / "adapter", batch)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-5, rtol=0), (ours[mask] - theirs[mask]).abs().max()
    assert (theirs[mask] - untrained[mask]).abs().max() > 1e-2  # the adapter really changes the model
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
    """Rank 1 stops answering at step 3 (failpoint stall@step:step3:rank1); rank 0's next collective times out after
    run.dist_timeout_s and the run ends with one line naming rank 1 and the step. (The stalled rank dies when
    torchrun passes on the failure with SIGTERM; a truly stuck one torchrun SIGKILLs 30 s later.) ZeRO-3 with the
    LLM-only targets: the vision tower runs on text-only batches only to keep the ranks in lockstep."""
    timeout = 10
    cmd = torchrun_cmd(run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
        **RUN, **ENGINES["zero3"], "data.train": mixed_shards, "run.dist_timeout_s": timeout,
        "lora.targets": "llm_attn,llm_mlp", "data.val": ""}))
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(**DS_ENV, VLORA_FAILPOINTS="stall@step:step3:rank1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "t"
    wait_until(lambda: (run / "metrics.jsonl").is_file() and 2 in step_records(run), 240, "step 2", proc=proc)
    stalled_at = time.monotonic()
    _, err = proc.communicate(timeout=timeout + 90)
    took = time.monotonic() - stalled_at  # includes saving step 2's checkpoint and stopping both ranks
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("vlora: error:")]
    assert errors == ["vlora: error: [rank 0] collective at step 3 timed out after 10 s (run.dist_timeout_s); "
                      "stopped answering: rank 1 (last entered step 2)"], err[-3000:]
    assert timeout <= took < timeout + 20, took
    assert sorted(step_records(run)) == [1, 2]


@pytest.mark.slow
def test_zero2_skips_a_step_whose_loss_is_nan_on_one_rank(runs):
    """Rank 1's loss is NaN at step 2, rank 0's finite: both ranks skip the update (the weights after step 2 are
    those after step 1, on both), count it once, and steps 3 and 4 train on with finite losses."""
    run, proc, _ = runs("zero2_nan")
    clean, _, _ = runs("zero2")
    records = step_records(run)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert [records[s]["skipped_steps"] for s in range(1, STEPS + 1)] == [0, 1, 1, 1]
    assert "step 2: non-finite loss; update skipped (1 in a row)" in proc.stderr
    assert math.isnan(records[2]["loss"]) and not math.isfinite(records[2]["grad_norm"])
    assert all(math.isfinite(records[s]["loss"]) and math.isfinite(records[s]["grad_norm"]) for s in (1, 3, 4))
    assert records[1]["loss"] == step_records(clean)[1]["loss"]  # the same run up to the NaN
    digests = {r: [d["digest"] for d in read_jsonl(run / "digests" / f"rank{r}.jsonl")] for r in (0, 1)}
    assert digests[0] == digests[1] and len(digests[0]) == STEPS  # the ranks agreed on every step
    d1, d2, d3, d4 = digests[0]
    assert d2 == d1  # no update at step 2
    assert len({d1, d3, d4}) == 3  # steps 3 and 4 change the weights again
    clean_digests = [d["digest"] for d in read_jsonl(clean / "digests" / "rank0.jsonl")]
    assert d1 == clean_digests[0] and clean_digests[1] != clean_digests[0]  # step 2 would have changed them


@pytest.mark.slow
def test_zero3_offload_trains_with_ddp_losses_and_resumes_exactly(runs):
    """ds_configs/zero3_offload.json (optimizer and parameters offloaded to the CPU): DDP's losses to a relative
    1e-5, its checkpoint holds ZeRO-3's files, and a resume from step 2 repeats steps 3-4 and the adapter bit for
    bit."""
    run, proc, _ = runs("zero3_offload")
    resumed, resumed_proc, _ = runs("zero3_offload_resumed")
    ddp, _, _ = runs("ddp")
    assert "engine deepspeed-zero3" in proc.stderr
    assert sorted(step_records(run)) == list(range(1, STEPS + 1))
    assert_losses_match(run, ddp, rtol=1e-5)
    folder = run / "step_00000002"
    assert sorted(p.name for p in (folder / DS_TAG).iterdir()) == DS_FILES["zero3"]
    zero = torch.load(folder / DS_TAG / model_states("zero3"), weights_only=True)["ds_config"]["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert f"resumed from {folder} at step 2" in resumed_proc.stderr
    assert sorted(step_records(resumed)) == [3, 4]
    for s in (3, 4):
        assert step_records(resumed)[s]["loss"] == step_records(run)[s]["loss"], s
        assert step_records(resumed)[s]["grad_norm"] == step_records(run)[s]["grad_norm"], s
    theirs = adapter_weights(resumed)
    assert sorted(theirs) == sorted(adapter_weights(run))
    for k, w in adapter_weights(run).items():
        assert torch.equal(w, theirs[k]), k


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r}


@pytest.mark.slow
def test_zero3_lockstep_evaluation_with_uneven_heldout_shares_counts_each_batch_once(runs, heldout):
    """9 held-out samples: rank 0 gets 5 (3 batches), rank 1 gets 4 (2 batches). Under ZeRO-3 rank 1 runs its last
    batch a second time to keep in step, and that repeat is not counted: the held-out loss before and after
    training equals DDP's (which runs each rank's own batches only) to a relative 1e-5, and before training it is
    the per-token mean over the 5 batches computed here, each once."""
    from vlora.model import SupervisedLoss

    assert [len(b) for b in heldout] == [3, 2]
    assert [[len(b["keys"]) for b in batches] for batches in heldout] == [[2, 2, 1], [2, 2]]
    zero3, ddp = runs("zero3")[0], runs("ddp")[0]
    ours, reference = val_losses(zero3), val_losses(ddp)
    assert sorted(ours) == sorted(reference) == [0, STEPS]
    for s in ours:
        assert ours[s] == pytest.approx(reference[s], rel=1e-5), (s, ours[s], reference[s])
    resumed = val_losses(runs("zero3_resumed")[0])
    assert resumed == {STEPS: ours[STEPS]}  # from the checkpoint: the same final weights, the same evaluation

    loss_model = SupervisedLoss(run_model(zero3)).eval()
    with torch.no_grad():
        sums = [(loss_model(b).double().item(), b["loss_index"].numel()) for batches in heldout for b in batches]
    once = sum(l for l, _ in sums) / sum(n for _, n in sums)
    repeated = (sum(l for l, _ in sums) + sums[-1][0]) / (sum(n for _, n in sums) + sums[-1][1])
    assert ours[0] == pytest.approx(once, rel=1e-5), (ours[0], once)
    assert abs(repeated - once) > 1e-3 * once, (repeated, once)  # counting the repeat would show


def test_deepspeed_checkpoint_files_pass_with_the_short_list_and_a_planted_pickle_is_refused(runs, tmp_path):
    """Every file of ZeRO-2's and ZeRO-3's checkpoints loads with weights_only=True and DeepSpeedEngine.SAFE_GLOBALS
    (each of ZeRO-2's optimizer-state classes is needed); a pickle planted in any one of ZeRO-2's files is refused
    in one line naming it, and its code never runs (the marker file it would create does not appear)."""

    for engine in ("zero2", "zero3"):
        folder = runs(engine)[0] / "step_00000002"
        assert [p.name for p in DeepSpeedEngine.check_checkpoint_files(folder)] == DS_FILES[engine]
    good = runs("zero2")[0] / "step_00000002"
    for name in ("LossScaler", "ZeroStageEnum", "fragment_address"):
        shortened = tuple(g for g in DeepSpeedEngine.SAFE_GLOBALS if not g.endswith("." + name))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DeepSpeedEngine, "SAFE_GLOBALS", shortened)
            with pytest.raises(VloraError, match="not a plain tensor file"):
                DeepSpeedEngine.check_checkpoint_files(good)
    for name in DS_FILES["zero2"]:
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(good, bad)
        marker = tmp_path / f"ran-{name}"
        torch.save(Planted(marker), bad / DS_TAG / name)
        with pytest.raises(VloraError) as e:
            DeepSpeedEngine.check_checkpoint_files(bad)
        message = str(e.value)
        assert message.startswith(f"checkpoint file {bad / DS_TAG / name} is not a plain tensor file; refused to "
                                  "unpickle it (") and "\n" not in message, message
        assert not marker.exists(), name
    empty = tmp_path / "empty"
    (empty / DS_TAG).mkdir(parents=True)
    with pytest.raises(VloraError, match="holds no DeepSpeed files"):
        DeepSpeedEngine.check_checkpoint_files(empty)


def test_fp16s_dynamic_loss_scaler_passes_the_check(tmp_path):
    """fp16 (not on this CPU) saves DeepSpeed's DynamicLossScaler as the optimizer's loss scaler: numbers, flags
    and a dtype, which the check lets through."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    scaler = CreateLossScaler(dtype=torch.half, static_loss_scale=0, dynamic_scaling=True, dynamic_loss_args={
        "init_scale": 2.0**16, "scale_window": 1000, "min_scale": 1, "delayed_shift": 2,
        "consecutive_hysteresis": False})
    assert type(scaler).__name__ == "DynamicLossScaler"
    (tmp_path / DS_TAG).mkdir()
    torch.save({"optimizer_state_dict": {"loss_scaler": scaler, "zero_stage": 2}}, tmp_path / DS_TAG / "optim.pt")
    assert DeepSpeedEngine.check_checkpoint_files(tmp_path) == [tmp_path / DS_TAG / "optim.pt"]
    loaded = torch.load(tmp_path / DS_TAG / "optim.pt", weights_only=False)["optimizer_state_dict"]["loss_scaler"]
    assert loaded.__dict__ == scaler.__dict__


@pytest.mark.slow
def test_a_resume_refuses_a_planted_pickle_in_a_deepspeed_file_on_every_rank(runs, tiny_model_dir, demo_shards,
                                                                             mixed_shards, tmp_path):
    """Through torchrun: a ZeRO-2 checkpoint whose rank-1 optimizer shard is a planted pickle. Each rank reads every
    DeepSpeed file before DeepSpeed does (under ZeRO-1/2 DeepSpeed loads every rank's shard), so both refuse it in
    one line naming it and exit with 2 (main's code for an error); the planted code never runs."""

    bad = tmp_path / "planted"
    shutil.copytree(runs("zero2")[0] / "step_00000002", bad)
    planted = bad / DS_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "ran"
    torch.save(Planted(marker), planted)
    proc = launch(run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
        **RUN, **ENGINES["zero2"], "data.train": mixed_shards, "run.resume": bad, "data.val": ""}), check=False)
    assert proc.returncode != 0 and not marker.exists()
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("vlora: error:"))
    assert len(errors) == 2, proc.stderr[-3000:]
    for rank, line in enumerate(errors):
        assert line.startswith(f"vlora: error: [rank {rank}] checkpoint file {planted} is not a plain tensor file; "
                               "refused to unpickle it ("), line
    # torchrun's report of each rank's exit: the first rank out exits with 2; torchrun may SIGTERM the other before
    # its own exit lands (its error line above shows it refused the file too). No other exit is allowed.
    codes = re.findall(r"exitcode\s*: (-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert "resumed from" not in proc.stderr and not (tmp_path / "t" / "metrics.jsonl").exists()


def test_deepspeed_backward_makes_a_non_finite_loss_skip_the_step():
    """An infinite loss can have finite gradients, which DeepSpeed (deciding by the gradients) would apply: the
    engine's backward makes them NaN. A finite loss's gradients are untouched, bit for bit."""
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # only .ds is used by backward

    class FakeDeepSpeed:
        def backward(self, loss, scale_wrt_gas):
            loss.backward()

    engine.ds = FakeDeepSpeed()
    w = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    engine.backward((w * w).sum() / 3)
    expected = (2 * w / 3).detach()
    assert torch.equal(w.grad, expected)
    for bad in (math.inf, math.nan):
        w.grad = None
        ((w * w).sum() / 3 + bad).backward()  # plain autograd: a non-finite loss, finite gradients
        assert torch.equal(w.grad, expected)
        w.grad = None
        engine.backward((w * w).sum() / 3 + bad)
        assert torch.isnan(w.grad).all(), bad


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
    from vlora.preflight import preflight

    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2},')
    cfg = load_config(None, run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
        "run.engine": "deepspeed", "run.deepspeed_config": tmp_path / "bad.json"}))
    with pytest.raises(VloraError, match="is not valid JSON"):
        preflight(cfg)
    cfg.run.deepspeed_config = "ds_configs/zero3.json"
    assert preflight(cfg).grad_accum == 8


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


@pytest.mark.slow
def test_zero3_generates_in_lockstep_and_scores_as_ddp(runs):
    """run.eval_generate under ZeRO-3: every forward of generate gathers weights, and rank 1 has fewer samples than
    rank 0; the run neither hangs nor differs: the exact match at each evaluation equals DDP's."""
    scores = {}
    for name in ("ddp", "zero3"):
        records = read_jsonl(runs(name)[0] / "metrics.jsonl")
        scores[name] = {r["step"]: r["val_exact_match"] for r in records if "val_exact_match" in r}
    assert sorted(scores["ddp"]) == [0, STEPS] and all(0 <= v <= 100 for v in scores["ddp"].values())
    assert scores["zero3"] == scores["ddp"]


# ---- elastic resume: vlora's own copy of the trained state, loaded on another number of processes ----


def deepspeed_consolidated(folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own checkpoint files (deepspeed/) consolidated by its zero_to_fp32: {NAME: fp32 master weight,
    NAME.exp_avg, NAME.exp_avg_sq}. The moments: the same code run on a copy whose flat fp32 partitions are
    replaced by the AdamW moments' partitions (the same layout)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vlora.engine import MOMENTS

    out = dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG))
    for key in MOMENTS:
        copy = tmp_path / key
        shutil.copytree(folder / DS_TAG, copy / DS_TAG)
        for path in (copy / DS_TAG).glob("*_optim_states.pt"):
            ds = torch.load(path, weights_only=False)  # DeepSpeed's pickle, written by this module's own run
            outer = ds["optimizer_state_dict"]
            if "fp32_flat_groups" in outer:  # ZeRO-3: the torch optimizer's state per sub-group
                states, flat_key = outer["optimizer_state_dict"]["state"], "fp32_flat_groups"
            else:  # ZeRO-1/2: per parameter group
                states, flat_key = outer["base_optimizer_state"]["state"], "single_partition_of_fp32_groups"
            assert len(states) == len(outer[flat_key])
            outer[flat_key] = [states[i][key] for i in range(len(states))]
            torch.save(ds, path)
        out.update((f"{name}.{key}", t) for name, t in
                   get_fp32_state_dict_from_zero_checkpoint(str(copy), tag=DS_TAG).items())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_checkpoint_holds_vlora_trained_state_equal_to_deepspeeds(runs, engine, tmp_path):
    """Beside DeepSpeed's files, each of the 2 ranks wrote its share of the trained state (rank r: tensors r, r+2,
    ...): the fp32 master weights and AdamW moments, whole, equal bit for bit to what DeepSpeed's own files hold
    (consolidated by its zero_to_fp32), and AdamW's step (2: no step was skipped)."""
    from safetensors import safe_open

    from vlora.engine import TRAINED_STATE_KEY, read_trained_state, trained_state_file

    folder = runs(engine)[0] / "step_00000002"
    state, names = read_trained_state(folder, 2)
    theirs = deepspeed_consolidated(folder, tmp_path)
    assert int(state["step"]) == 2 and len(names) == 32
    assert sorted(k for k in state if k != "step") == sorted(theirs)
    for key, value in theirs.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value), key
    assert all(state[f"{n}.exp_avg_sq"].abs().max() > 0 for n in names)  # moments of two real steps
    for rank in (0, 1):
        with safe_open(str(trained_state_file(folder, rank)), framework="pt") as f:
            meta = json.loads(f.metadata()[TRAINED_STATE_KEY])
            assert sorted(f.keys()) == sorted(f"{n}{s}" for n in names[rank::2]
                                              for s in ("", ".exp_avg", ".exp_avg_sq"))
        assert meta == {"step": 2, "count": 32, "names": names[rank::2], "rank": rank, "world_size": 2}
    assert "loss_scaler" not in json.loads((folder / "train_state.json").read_text())  # fp32: no loss scaling


@contextlib.contextmanager
def run_of_one(monkeypatch, tmp_path: Path, source: Path):
    """The run of `source`'s config (its run folder) built in this process as a world of one, nothing resumed:
    what a resume builds before it loads a checkpoint into the engine."""
    from vlora.distributed import cleanup
    from vlora.preflight import preflight
    from vlora.train import build

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(source / "config.yaml", [f"run.out_dir={tmp_path}", "run.name=one", "run.resume=",
                                               "data.val=", "data.num_workers=0", "run.trace_keys=false"])
    try:
        with contextlib.ExitStack() as resources:
            yield build(cfg, preflight(cfg), resources)
    finally:
        cleanup()  # the group of one (with the engine's close, DeepSpeed forgets its groups: the next build works)


def one_step(run) -> None:
    from vlora.train import step_counts, train_step

    micro_batches = [next(run.batches) for _ in range(run.plan.grad_accum)]
    result, _ = train_step(run, micro_batches, step_counts(run, micro_batches).supervised)
    assert result.applied


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_checkpoint_of_2_ranks_loads_exactly_on_1(runs, engine, monkeypatch, tmp_path):
    """The step-2 checkpoint of 2 ranks into a world of one (engine.load with the checkpoint's train_state): the
    engine then holds exactly the checkpoint's masters, moments and AdamW step (trained_state(), bit for bit), the
    model's own weights (what forward uses; ZeRO-3: gathered) are the masters, and AdamW goes on from step 2. A
    checkpoint without vlora's files (an older vlora) is refused in one line before anything is touched."""
    from vlora.engine import read_trained_state, trained_state_file

    folder = runs(engine)[0] / "step_00000002"
    shared = json.loads((folder / "train_state.json").read_text())
    saved, names = read_trained_state(folder, 2)
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    trained_state_file(older, 1).unlink()
    with run_of_one(monkeypatch, tmp_path, runs(engine)[0]) as run:
        assert run.world.size == 1 and run.engine.name == f"deepspeed-{engine}"
        with pytest.raises(VloraError) as err:
            run.engine.load(older, shared)
        assert str(err.value) == (f"checkpoint {older} has no trained_state.rank00001.safetensors (written by a vlora "
                                  "without elastic resume): it can only resume on 2 processes, the number that "
                                  "wrote it")
        run.engine.load(folder, shared)
        held = run.engine.trained_state()
        assert sorted(held) == sorted(saved)
        for key, value in saved.items():
            assert held[key].dtype == value.dtype and torch.equal(held[key], value), key
        with run.engine.full_weights():
            model = dict(run.loss_model.named_parameters())
            assert all(torch.equal(model[n].detach(), saved[n]) for n in names)
        one_step(run)  # AdamW's own update on the loaded state: step 3, every tensor moves
        after = run.engine.trained_state()
        assert int(after["step"]) == 3
        assert all(not torch.equal(after[k], saved[k]) for k in saved if k != "step")
        # Saved by a world of one: one file, which holds what the engine holds.
        run.engine.save(tmp_path)
        written, _ = read_trained_state(tmp_path, 1)
        assert all(torch.equal(written[k], after[k]) for k in after)


@pytest.mark.slow
def test_ddp_checkpoint_of_2_ranks_merges_on_1_and_a_missing_shard_is_refused(runs, monkeypatch, tmp_path):
    """DDP's optimizer state is sharded by parameter index over the ranks that wrote it: on one process both
    shards merge, and AdamW holds every parameter's moments and step of the checkpoint. A missing shard, or
    shards taken for another world size (train_state's world_size 1 on 2 shards), is refused in one line."""
    folder = runs("ddp")[0] / "step_00000002"
    shared = json.loads((folder / "train_state.json").read_text())
    shards = [torch.load(folder / f"optimizer.rank0000{r}.pt", weights_only=True)["state"] for r in (0, 1)]
    assert sorted(shards[0]) == list(range(0, 32, 2)) and sorted(shards[1]) == list(range(1, 32, 2))
    missing = tmp_path / "missing"
    shutil.copytree(folder, missing)
    (missing / "optimizer.rank00001.pt").unlink()
    with run_of_one(monkeypatch, tmp_path, runs("ddp")[0]) as run:
        with pytest.raises(VloraError, match=re.escape(f"checkpoint file {missing / 'optimizer.rank00001.pt'} is "
                                                       "missing")):
            run.engine.load(missing, shared)
        with pytest.raises(VloraError) as err:
            run.engine.load(folder, {**shared, "world_size": 1})
        assert str(err.value).startswith(f"checkpoint {folder}: its 1 optimizer.rank*.pt shards hold the state of "
                                         "other parameters than were saved (parameter 1;")
        run.engine.load(folder, shared)
        held = run.engine.trained_state()
        assert int(held["step"]) == 2 and len(held) == 1 + 3 * 32
        # The shards number the parameters as the optimizer orders them (by group), not by name.
        name_of = {id(p): n for n, p in zip(run.engine.trained_names, run.engine.params)}
        ordered = [name_of[id(p)] for group in run.optimizer.param_groups for p in group["params"]]
        for i, name in enumerate(ordered):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(held[f"{name}.{key}"], shards[i % 2][i][key]), (name, key)


def test_fp16_loss_scale_is_recorded_for_a_resume_on_another_world_size():
    """DeepSpeed keeps fp16's dynamic loss scale in its own files only, which a resume on another number of
    processes does not read: save() records it in train_state.json (numbers, JSON); fp32 and bf16 record nothing."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    from vlora.optim import Precision

    scaler = CreateLossScaler(dtype=torch.half, static_loss_scale=0, dynamic_scaling=True, dynamic_loss_args={
        "init_scale": 2.0**16, "scale_window": 1000, "min_scale": 1, "delayed_shift": 2,
        "consecutive_hysteresis": False})
    # Where a run would be after overflows (update_scale itself needs DeepSpeed's process group).
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis = 2.0**14, 7, 5, 1
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # only .ds and .precision are used
    engine.ds = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler))
    engine.precision = Precision("fp16", "cpu")
    recorded = json.loads(json.dumps(engine._loss_scaler_state()))
    assert recorded == {"cur_scale": 2.0**14, "cur_iter": 7, "last_overflow_iter": 5, "cur_hysteresis": 1}
    engine.precision = Precision("bf16", "cpu")
    assert engine._loss_scaler_state() == {}
