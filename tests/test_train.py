"""The real entry point end to end: torchrun + gloo + 4-bit base + LoRA + accumulation, the saved adapter, bad input."""

import subprocess
import sys

import pytest
import torch

from helpers import REPO, clean_env, plain_peft_logits, read_jsonl, run_overrides, torchrun, train_in_process


@pytest.mark.slow
def test_torchrun_two_ranks_4bit_accumulation(tiny_model_dir, demo_shards, tmp_path):
    """2 ranks x micro-batch 2 x accumulation 2: replicas stay bit-identical after every step and held-out loss falls.
    run.report_samples: rank 0 then scores the saved adapter, and its report is the one `vlora eval` writes."""
    steps = 16
    proc = torchrun(run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
        "optim.max_steps": steps, "optim.global_batch": 8, "optim.micro_batch": 2, "model.quant": "nf4",
        "run.param_digest": "true", "run.log_every": 4, "run.report_samples": 6}))
    run = tmp_path / "t"
    assert "grad_accum 2" in proc.stderr and "world 2" in proc.stderr and "4-bit nf4" in proc.stderr

    digests = [read_jsonl(run / "digests" / f"rank{r}.jsonl") for r in (0, 1)]
    assert [d["step"] for d in digests[0]] == list(range(1, steps + 1))
    assert digests[0] == digests[1]  # identical LoRA weights on both ranks after every optimizer step
    assert len({d["digest"] for d in digests[0]}) == steps  # and they change at every step

    records = read_jsonl(run / "metrics.jsonl")
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert set(val) == {0, steps}
    assert val[steps] < val[0] - 1.0, val
    train_steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_steps] == [4, 8, 12, 16]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in train_steps)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "latest").read_text().strip() == f"step_{steps:08d}"
    assert {p.name for p in (run / f"step_{steps:08d}").iterdir()} == {
        "adapter", "train_state.json", "config.yaml", "rank00000.json", "rank00001.json",
        "optimizer.rank00000.pt", "optimizer.rank00001.pt", "rng.rank00000.safetensors", "rng.rank00001.safetensors"}
    assert f"held-out loss: {val[0]:.4f} at step 0 -> {val[steps]:.4f} at step {steps}" in proc.stdout
    assert_report_is_vlora_eval(run, demo_shards / "val", proc.stdout, samples=6, batch_size=2)


def assert_report_is_vlora_eval(run, shards, printed: str, *, samples: int, batch_size: int) -> None:
    """The run's runs/NAME/eval report (printed once, by rank 0) equals `vlora eval` of its saved adapter."""
    import contextlib
    import io
    import json

    from vlora import cli

    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["n_items"] == samples and report["systems"] == ["adapter", "base", "majority"]
    assert printed.count("exact match (%) on 6 samples") == 1 and f"report: {run / 'eval' / 'report.html'}" in printed
    again = run.parent / "again"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["eval", "--model", report["model"], "--adapter", str(run / "adapter"), "--shards",
                         str(shards), "--out", str(again), "--max-samples", str(samples), "--device", "cpu",
                         "--batch-size", str(batch_size)]) == 0
    expected = json.loads((again / "report.json").read_text())
    assert report["scores"] == expected["scores"]
    # Within float summation order: the test process and the run's rank 0 use different CPU thread counts.
    assert report["heldout_loss"] == pytest.approx(expected["heldout_loss"], rel=1e-6)
    assert [i["answers"] for i in report["items"]] == [i["answers"] for i in expected["items"]]


def test_saved_adapter_loads_with_plain_peft(tiny_model_dir, demo_shards, tmp_path, monkeypatch):
    """The adapter on disk, loaded by plain peft onto the tiny 4-bit base, gives the in-memory model's logits."""
    from vlora.data.stream import heldout_batches
    from vlora.model import full_logits

    result = train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **{
        "optim.max_steps": 6, "optim.global_batch": 4, "optim.micro_batch": 4})
    trained, collator = result.model, result.collator
    batch = heldout_batches(str(demo_shards / "val"), rank=0, world_size=1, max_samples=4, micro_batch=4,
                            encode=collator.encode, collate=collator.collate)[0]
    trained.eval()
    ours = full_logits(trained, batch)

    untrained, theirs = plain_peft_logits(tiny_model_dir, result.dir / "adapter", batch)

    mask = batch["attention_mask"].bool()
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-5, rtol=0), (ours[mask] - theirs[mask]).abs().max()
    assert (ours[mask] - untrained[mask]).abs().max() > 1e-2  # the adapter really changes the model


BAD_INPUTS = [
    ("data.train={missing}", "data.train shard folder '{missing}' does not exist"),
    ("model.path={missing}", "model.path '{missing}' does not exist"),
    ("optim.learning_rate=1e-4", "unknown config key 'optim.learning_rate'"),
    ("optim.global_batch=6", "optim.global_batch=6 is not divisible by optim.micro_batch x world size = 4 x 1 = 4"),
]


@pytest.mark.parametrize("override, expected", BAD_INPUTS, ids=["shards", "model", "key", "batch"])
def test_bad_input_is_one_line(tiny_model_dir, demo_shards, tmp_path, override, expected):
    missing = str(tmp_path / "nowhere")
    cmd = [sys.executable, "train.py",
           *run_overrides(tiny_model_dir, demo_shards, tmp_path, **{"optim.micro_batch": 4, "optim.global_batch": 8}),
           override.format(missing=missing)]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"vlora: error: {expected.format(missing=missing)}")
    assert "Traceback" not in proc.stderr


def test_model_folder_that_is_not_a_model(tiny_model_dir, demo_shards, tmp_path):
    """A folder that exists but holds no checkpoint fails at load time, still in one line naming it."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    cmd = [sys.executable, "train.py", *run_overrides(tiny_model_dir, demo_shards, tmp_path), f"model.path={empty}"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlora: error:")]
    assert len(errors) == 1 and f"cannot load model.path '{empty}' (folder)" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_continues_the_data_stream_exactly(tiny_model_dir, demo_shards, tmp_path, monkeypatch):
    """2 data workers: the keys consumed in 6 steps == those of 3 steps + resume + 3 steps, in order.

    3 micro-batches per step make 9 batches at the break: an odd count, so the resumed loader must continue the
    workers' round-robin from worker 1, not from worker 0. In process (the workers are real DataLoader processes):
    the 2-rank resumes of tests/test_loop.py and test_checkpoint_torture.py hold the losses of every step equal,
    which they could not with a data stream off by a sample.
    """
    common = {"optim.global_batch": 3, "optim.micro_batch": 1, "data.num_workers": 2, "run.trace_keys": "true",
              "data.val": "", "run.plot": "false"}
    train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **common,
                     **{"run.name": "full", "optim.max_steps": 6})
    train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **common,
                     **{"run.name": "cut", "optim.max_steps": 3})
    run = train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **common,
                           **{"run.name": "cut", "optim.max_steps": 6, "run.resume": "auto"})
    assert run.saved_step == 6 and run.batches.consumed == 18
    full = read_jsonl(tmp_path / "full" / "keys" / "rank0.jsonl")
    cut = read_jsonl(tmp_path / "cut" / "keys" / "rank0.jsonl")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    assert cut == full
    assert all(len(r["keys"]) == 3 for r in full)
    keys = [k for r in full for k in r["keys"]]
    assert len(keys) == len(set(keys)) == 18  # no sample twice within the first pass


PEERS = REPO.parent / "shared" / "peers" / "llamafactory_mllm_demo"


@pytest.mark.skipif(not PEERS.is_dir(), reason="../shared/peers is not beside this checkout")
@pytest.mark.parametrize("annotations, records", [("mllm_demo.json", 6), ("v1_multimodal_demo.jsonl", 24)])
def test_llamafactory_demo_files_pack_and_train(tiny_model_dir, tmp_path, monkeypatch, annotations, records):
    """LLaMA-Factory's own demo files, unedited: every record packs, and a few steps train on them."""
    from vlora.data.pack import pack

    shards = tmp_path / "shards"
    summary = pack(PEERS / annotations, shards / "train", shard_size=2)
    assert (summary.read, summary.written, summary.rejected, summary.shards) == (records, records, 0, records // 2)
    result = train_in_process(monkeypatch, tiny_model_dir, shards, tmp_path, **{
        "data.val": "", "optim.max_steps": 3, "optim.global_batch": 2, "optim.micro_batch": 2,
        "run.trace_keys": "true", "data.max_length": 4096})
    keys = [k for r in read_jsonl(tmp_path / "t" / "keys" / "rank0.jsonl") for k in r["keys"]]
    assert len(keys) == len(set(keys)) == 6  # 3 steps x 2 samples, none twice
    assert result.state.skipped_samples == 0
    assert (result.dir / "adapter" / "adapter_model.safetensors").is_file()
    losses = [r["loss"] for r in read_jsonl(tmp_path / "t" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)


def test_cpu_threads_leave_the_data_workers_their_cores(monkeypatch):
    """torch's threads on the CPU: the rank's share of the cores less its data workers, never below one; a user's
    OMP_NUM_THREADS and a GPU are left alone."""
    from vlora.distributed import cpu_threads, limit_cpu_threads

    assert cpu_threads(2, 1, 1) == 1
    assert cpu_threads(2, 1, 0) == 2
    assert cpu_threads(16, 2, 2) == 6
    assert cpu_threads(4, 8, 4) == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert limit_cpu_threads(torch.device("cpu"), 1) is None
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert limit_cpu_threads(torch.device("cuda", 0), 1) is None
        assert limit_cpu_threads(torch.device("cpu"), 1) == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
