"""Checkpoints: atomic publish, the `latest` pointer, keep-last pruning, resume errors, and a run SIGKILLed
while it saves that resumes from the checkpoint before."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from test_train import clean_env, read_jsonl, run_overrides
from vlora import checkpoint
from vlora.checkpoint import latest_checkpoint, resolve_resume, save_checkpoint, step_dir
from vlora.distributed import World
from vlora.errors import VloraError

WORLD = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))


@pytest.fixture
def fake_adapter(monkeypatch):
    """save_adapter writes a stand-in file: these tests are about folders and pointers, not about peft."""
    def save_adapter(model, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "adapter_model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(checkpoint, "save_adapter", save_adapter)
    return save_adapter


def _optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    return opt


def _save(run_dir: Path, step: int, keep_last: int = 2, optimizer=None) -> Path:
    return save_checkpoint(run_dir, step, world=WORLD, peft_model=None, optimizer=optimizer or _optimizer(),
                           train_state={"skipped_samples": 0}, rank_state={"data": {"step": step}},
                           keep_last=keep_last)


def _pointer(run_dir: Path) -> str:
    return (run_dir / "latest").read_text().strip()


def test_save_publishes_a_complete_folder_and_then_the_pointer(tmp_path, fake_adapter, monkeypatch):
    seen = []
    write_atomic = checkpoint._write_atomic

    def spy(path, text):  # when `latest` moves, the folder it will name must already be complete and in place
        folder = path.parent / text.strip()
        seen.append(sorted(p.name for p in folder.iterdir()))
        write_atomic(path, text)

    monkeypatch.setattr(checkpoint, "_write_atomic", spy)
    final = _save(tmp_path, 2)
    assert final == step_dir(tmp_path, 2) == tmp_path / "step_00000002"
    assert _pointer(tmp_path) == "step_00000002" and latest_checkpoint(tmp_path) == final
    assert "train_state.json" in seen[0] and "adapter" in seen[0] and "rank00000.json" in seen[0]
    assert any(name.startswith("optimizer") for name in seen[0])
    assert json.loads((final / "train_state.json").read_text())["step"] == 2
    assert json.loads((final / "rank00000.json").read_text()) == {"data": {"step": 2}}
    # nothing temporary is left behind: no .tmp-step_* folder, no .latest.tmp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint_latest(tmp_path, fake_adapter, monkeypatch):
    _save(tmp_path, 2)

    def crash(model, out):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_adapter", crash)
    with pytest.raises(OSError):
        _save(tmp_path, 4)
    assert _pointer(tmp_path) == "step_00000002"
    assert not step_dir(tmp_path, 4).exists()  # never published half-written
    assert (tmp_path / ".tmp-step_00000004").is_dir()

    monkeypatch.setattr(checkpoint, "save_adapter", fake_adapter)
    _save(tmp_path, 4)  # the same step saved again: the stale temporary folder is replaced, not merged into
    assert _pointer(tmp_path) == "step_00000004"
    assert not (tmp_path / ".tmp-step_00000004").exists()
    assert (step_dir(tmp_path, 4) / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"


@pytest.mark.xfail(strict=True, reason="save_checkpoint removes only a stale temporary folder of the step it saves")
def test_a_stale_temporary_folder_of_another_step_is_removed(tmp_path, fake_adapter, monkeypatch):
    """Killed while saving step 4, resumed with a save_every that never saves step 4 again: the dead save's
    temporary folder (a whole adapter + optimizer state at real sizes) should not stay forever."""
    def killed(model, out):
        raise OSError("killed")

    monkeypatch.setattr(checkpoint, "save_adapter", killed)
    with pytest.raises(OSError):
        _save(tmp_path, 4)
    monkeypatch.setattr(checkpoint, "save_adapter", fake_adapter)
    _save(tmp_path, 6)
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_prunes_old_folders_but_never_the_one_just_written(tmp_path, fake_adapter):
    for step in (2, 4, 6):
        _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert _pointer(tmp_path) == "step_00000006"

    # Resumed from step 4 and saving step 4 again while step 6 (a later, abandoned one) exists: the newest
    # by name is 6, but the folder just written is 4, and it stays.
    _save(tmp_path, 4, keep_last=1)
    assert step_dir(tmp_path, 4).is_dir()
    assert _pointer(tmp_path) == "step_00000004"
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 4)

    _save(tmp_path, 8, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000008"]


def test_resolve_resume(tmp_path, fake_adapter):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert resolve_resume(run_dir, "") is None
    assert resolve_resume(run_dir, "auto") is None  # nothing saved yet: a fresh start
    final = _save(run_dir, 2)
    assert resolve_resume(run_dir, "auto") == final
    assert resolve_resume(run_dir, str(final)) == final


@pytest.mark.parametrize("target", ["missing", "empty", "run"], ids=["missing", "not-a-checkpoint", "run-folder"])
def test_resume_from_a_folder_that_is_not_a_checkpoint_is_one_line(tmp_path, target):
    path = tmp_path / target
    if target != "missing":
        path.mkdir()
    if target == "run":
        (path / "latest").write_text("step_00000002\n")  # a run folder, not one of its checkpoints
    with pytest.raises(VloraError) as e:
        resolve_resume(tmp_path, str(path))
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message and "run.resume" in message


def test_train_py_with_a_bad_resume_path_is_one_line(tiny_model_dir, demo_shards, tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "train.py", *run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
        "run.resume": missing, "data.val": ""})], cwd=REPO, env=clean_env(), capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlora: error:")]
    assert errors == [f"vlora: error: run.resume '{missing}' is not a checkpoint folder (no train_state.json)"]
    assert "Traceback" not in proc.stderr


# ---- the kill test --------------------------------------------------------------------------------------


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Poll until predicate() holds; fail with the run's log if it ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_from_the_checkpoint_before(tiny_model_dir, demo_shards, tmp_path):
    """SIGKILL lands while step 4 is being saved: `latest` still names step 2, complete; run.resume=auto
    continues from step 2 to the end, and the half-written step 4 is cleaned up by the next save of step 4."""
    run = tmp_path / "t"
    common = {"optim.global_batch": 2, "optim.micro_batch": 2, "run.save_every": 2, "run.log_every": 1,
              "data.val": "", "run.plot": "false"}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        # Every save pauses between the ranks' files and the publish; the step-2 save gets through it,
        # the step-4 save is killed inside it.
        proc = subprocess.Popen(
            [sys.executable, "train.py", *run_overrides(tiny_model_dir, demo_shards, tmp_path, **common,
                                                        **{"optim.max_steps": 6})],
            cwd=REPO, env=clean_env(VLORA_DEBUG_SAVE_PAUSE="4"), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            tmp4 = run / ".tmp-step_00000004"
            wait_for(lambda: (tmp4 / "rank00000.json").is_file(), proc, log, 240, "the step-4 save began")
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its data-loader worker, mid-save
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    assert (run / "latest").read_text().strip() == "step_00000002"
    step2 = run / "step_00000002"
    names = {p.name for p in step2.iterdir()}
    assert {"adapter", "train_state.json", "rank00000.json"} <= names, names
    assert any(n.startswith("optimizer") for n in names), names
    assert (step2 / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((step2 / "train_state.json").read_text())["step"] == 2
    assert not (run / "step_00000004").exists() and tmp4.is_dir()
    first_steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert first_steps[:4] == [1, 2, 3, 4]

    proc = subprocess.run(
        [sys.executable, "train.py", *run_overrides(tiny_model_dir, demo_shards, tmp_path, **common,
                                                    **{"optim.max_steps": 6, "run.resume": "auto"})],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert (run / "latest").read_text().strip() == "step_00000006"
    assert not tmp4.exists()  # the step-4 save after the resume replaced the stale temporary folder
    assert not list(run.glob(".tmp-*"))
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    resumed_at = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[resumed_at:] == [3, 4, 5, 6]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
