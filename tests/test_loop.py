"""The loop's arithmetic and its stops: accumulation and world size do not change the update; a pre-empted and
resumed run is the uninterrupted run; non-finite steps are skipped, and too many in a row stop the run."""

import json
import re
import signal
import subprocess
import sys

import pytest
import torch

from helpers import (
    REPO, adapter_weights, assert_same_run, clean_env, run_overrides, step_records, torchrun, torchrun_cmd,
    train_in_process, wait_until,
)


COMMON = {"data.val": "", "run.log_every": 1, "optim.lr": 2e-3, "optim.warmup_steps": 1, "run.plot": "false"}


def test_accumulation_equals_the_big_micro_batch(tiny_model_dir, demo_shards, tmp_path, monkeypatch):
    """4 micro-batches of 1 give the same steps (loss, gradient norm, weights) as 1 micro-batch of 4."""
    for name, micro in (("accum", 1), ("big", 4)):
        train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **COMMON, **{
            "run.name": name, "optim.max_steps": 3, "optim.global_batch": 4, "optim.micro_batch": micro})
    assert_same_run(tmp_path / "accum", tmp_path / "big", steps=3, rtol=1e-5)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_twice_the_batch(tiny_model_dir, demo_shards, tmp_path, monkeypatch):
    """2 ranks x micro-batch 2 == 1 rank x 2 micro-batches of 2: the global-token normalisation makes world size
    invisible. (A reader's samples depend only on its global index, so rank r and worker r read the same.)"""
    runs = {"run.name": "ranks", "optim.max_steps": 3, "optim.global_batch": 4, "optim.micro_batch": 2}
    torchrun(run_overrides(tiny_model_dir, demo_shards, tmp_path, **COMMON, **runs, **{"data.num_workers": 1}))
    train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **COMMON, **{
        **runs, "run.name": "one", "data.num_workers": 2})
    assert_same_run(tmp_path / "ranks", tmp_path / "one", steps=3, rtol=1e-5)


@pytest.mark.slow
def test_sigterm_then_resume_repeats_the_uninterrupted_losses(tiny_model_dir, demo_shards, tmp_path):
    """2 ranks, fp32, LoRA dropout on (so RNG state matters): stopped by SIGTERM at step k and resumed, the
    per-step losses equal the uninterrupted run's to 1e-6."""
    steps = 10
    cfg = {**COMMON, "optim.max_steps": steps, "optim.global_batch": 4, "optim.micro_batch": 1,
           "lora.dropout": 0.1, "data.num_workers": 1, "run.precision": "fp32"}
    torchrun(run_overrides(tiny_model_dir, demo_shards, tmp_path, **cfg, **{"run.name": "whole"}))

    cmd = torchrun_cmd(run_overrides(tiny_model_dir, demo_shards, tmp_path, **cfg, **{"run.name": "cut"}))
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: (cut / "metrics.jsonl").is_file() and len(step_records(cut)) >= 3, 120, "step 3", proc=proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, err = proc.communicate(timeout=120)
    stopped = int((cut / "PREEMPTED").read_text())
    assert 3 <= stopped < steps, err[-3000:]
    assert (cut / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert "pre-empted (SIGTERM)" in err
    assert sorted(step_records(cut)) == list(range(1, stopped + 1))

    proc = torchrun(run_overrides(tiny_model_dir, demo_shards, tmp_path, **cfg, **{
        "run.name": "cut", "run.resume": "auto"}))
    assert f"at step {stopped}" in proc.stderr
    assert not (cut / "PREEMPTED").exists()
    whole, resumed = step_records(tmp_path / "whole"), step_records(cut)
    assert sorted(resumed) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert abs(whole[s]["loss"] - resumed[s]["loss"]) < 1e-6, (s, whole[s]["loss"], resumed[s]["loss"])
    for k, w in adapter_weights(tmp_path / "whole").items():
        torch.testing.assert_close(w, adapter_weights(cut)[k], rtol=0, atol=1e-6)


def test_a_non_finite_step_is_skipped(tiny_model_dir, demo_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("VLORA_FAILPOINTS", "nan@2")
    result = train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **COMMON, **{
        "optim.max_steps": 3, "optim.global_batch": 4, "optim.micro_batch": 4})
    records = step_records(tmp_path / "t")
    assert records[1]["skipped_steps"] == 0 and records[2]["skipped_steps"] == 1 and records[3]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert records[3]["loss"] == records[3]["loss"]  # finite again


def test_too_many_non_finite_steps_stop_with_a_checkpoint(tiny_model_dir, demo_shards, tmp_path):
    cmd = [sys.executable, "train.py", *run_overrides(tiny_model_dir, demo_shards, tmp_path, **COMMON, **{
        "optim.max_steps": 8, "optim.global_batch": 4, "optim.micro_batch": 4, "run.max_bad_steps": 3,
        "data.num_workers": 0})]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(VLORA_FAILPOINTS="nan@3,nan@4,nan@5,nan@6"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlora: error:")]
    assert len(errors) == 1 and "3 non-finite steps in a row (steps 3-5)" in errors[0]
    assert (tmp_path / "t" / "latest").read_text().strip() == "step_00000005"
    assert "Traceback" not in proc.stderr


def test_fp16_skips_an_overflow_step_and_resume_restores_the_scaler(tiny_model_dir, demo_shards, tmp_path,
                                                                     monkeypatch):
    """fp16 with GradScaler: an inf gradient at step 3 (as an overflow makes one) skips that update without counting
    it as a bad step and halves the scale; a run that crashes at step 5 and resumes from step 4 restores the
    scaler (scale and growth tracker) and ends as the uninterrupted run does."""
    import json
    import math

    from vlora.failpoints import FailpointError

    cfg = {**COMMON, "run.precision": "fp16", "optim.max_steps": 6, "optim.global_batch": 2,
           "optim.micro_batch": 2, "run.save_every": 2, "run.keep_last": 5}
    monkeypatch.setenv("VLORA_FAILPOINTS", "nan@grad:step3")
    train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **cfg, **{"run.name": "whole"})
    whole = step_records(tmp_path / "whole")
    assert [whole[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert math.isinf(whole[3]["grad_norm"]) and all(math.isfinite(whole[s]["loss"]) for s in whole)

    def scaler(run, step):
        return json.loads((tmp_path / run / f"step_{step:08d}" / "train_state.json").read_text())["grad_scaler"]

    assert scaler("whole", 2)["scale"] == 65536.0 and scaler("whole", 4)["scale"] == 32768.0  # halved once
    assert scaler("whole", 6)["_growth_tracker"] == 3  # steps 4, 5, 6 since the overflow

    monkeypatch.setenv("VLORA_FAILPOINTS", "nan@grad:step3,raise@step:step5")
    with pytest.raises(FailpointError):
        train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **cfg, **{"run.name": "cut"})
    monkeypatch.delenv("VLORA_FAILPOINTS")
    train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **cfg, **{"run.name": "cut",
                                                                                    "run.resume": "auto"})
    assert scaler("cut", 6) == scaler("whole", 6)  # unrestored, it would be 65536 with a tracker of 2
    cut = step_records(tmp_path / "cut")
    for s in range(1, 7):
        assert cut[s]["loss"] == whole[s]["loss"] and cut[s]["skipped_steps"] == whole[s]["skipped_steps"], s
    for k, w in adapter_weights(tmp_path / "whole").items():
        assert torch.equal(w, adapter_weights(tmp_path / "cut")[k]), k


@pytest.mark.parametrize("norm", [50.0, 0.5])
def test_clipping_brings_a_gradient_above_grad_clip_down_to_it(norm):
    """A gradient of norm 50 comes out at optim.grad_clip=1 (its direction kept); one of 0.5 is left alone. The
    step reports the norm before clipping."""
    from vlora.config import load_config
    from vlora.distributed import World
    from vlora.engine import Engine
    from vlora.optim import Precision

    cfg = load_config(None, ["optim.grad_clip=1.0"])
    module = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(module.weight)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    engine = Engine(cfg, None, World(0, 0, 1, torch.device("cpu")), Precision("fp32", "cpu"))
    engine.prepare(module, optimizer)
    (module.weight * torch.tensor([[0.6, 0.8]]) * norm).sum().backward()
    result = engine.step(torch.tensor(1.0))
    assert result.applied and result.grad_norm.item() == pytest.approx(norm)
    expected = torch.tensor([[0.6, 0.8]]) * min(norm, 1.0)  # SGD at lr 1: the weight moved by minus the gradient
    torch.testing.assert_close(module.weight.detach(), -expected)


@pytest.mark.slow
def test_fp16_two_ranks_a_non_finite_loss_on_one_rank_stops_every_rank_together(tiny_model_dir, demo_shards,
                                                                                 tmp_path):
    """fp16 on 2 ranks, rank 1's loss non-finite at steps 3 and 4: both ranks count the same bad steps (not a loss-
    scale overflow on rank 0), and with run.max_bad_steps=2 both save the step-4 checkpoint and stop with the same
    line. Deciding from each rank's own loss, rank 0 counted overflows and went on into the next step's collective
    while rank 1 waited in the save: a hang."""
    proc = torchrun(run_overrides(tiny_model_dir, demo_shards, tmp_path, **COMMON, **{
        "run.precision": "fp16", "optim.max_steps": 8, "optim.global_batch": 4, "optim.micro_batch": 2,
        "run.max_bad_steps": 2, "run.dist_timeout_s": 60, "data.num_workers": 0}),
        env={"VLORA_FAILPOINTS": "nan@loss:step3:rank1,nan@loss:step4:rank1"}, timeout=300, check=False)
    assert proc.returncode != 0
    # Each rank that gets to print says the same; torchrun may end the slower rank (SIGTERM) once the first has
    # exited, before it prints. That both stopped at step 4 together shows in the step-4 checkpoint: a collective
    # save every rank entered. A disagreement shows as a timed-out or broken collective instead.
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("vlora: error:"))
    assert 1 <= len(errors) <= 2, proc.stderr[-3000:]
    for line in errors:
        assert re.match(r"vlora: error: \[rank [01]\] 2 non-finite steps in a row \(steps 3-4\)", line), line
    assert "timed out" not in proc.stderr and "lost a peer" not in proc.stderr
    assert (tmp_path / "t" / "latest").read_text().strip() == "step_00000004"
    assert json.loads((tmp_path / "t" / "step_00000004" / "train_state.json").read_text())["skipped_steps"] == 2
    records = step_records(tmp_path / "t")
    assert [records[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 0, 1]  # step 4 stopped the run before its log
