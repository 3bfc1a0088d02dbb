"""Checkpoints: atomic publish, the `latest` pointer, keep-last pruning, resume errors, and a run SIGKILLed
while it saves that resumes from the checkpoint before."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, Planted, clean_env, read_jsonl, run_overrides, train_in_process, wait_until
from vlora import checkpoint
from vlora.checkpoint import latest_checkpoint, resolve_resume, save_checkpoint, step_dir
from vlora.distributed import World
from vlora.errors import VloraError

WORLD = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))


@pytest.fixture
def fake_adapter(monkeypatch):
    """save_adapter writes a stand-in file: these tests are about folders and pointers, not about peft."""
    import vlora.model

    def save_adapter(model, out: Path, state_dict=None) -> None:
        out.mkdir(parents=True)
        (out / "adapter_model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(vlora.model, "save_adapter", save_adapter)
    return save_adapter


class OptimizerOnly:
    """The part of an engine a save touches: its optimizer state, as the DDP engine writes it."""

    name = "ddp"

    def __init__(self):
        p = torch.nn.Parameter(torch.ones(3))
        self.optimizer = torch.optim.AdamW([p], lr=0.1)
        p.sum().backward()
        self.optimizer.step()

    def save(self, folder):
        torch.save(self.optimizer.state_dict(), folder / "optimizer.rank00000.pt")
        return {"engine": self.name}

    def export_adapter(self, model, out):
        import vlora.model

        vlora.model.save_adapter(model, out)


def _save(run_dir: Path, step: int, keep_last: int = 2, **kwargs) -> Path:
    from vlora.checkpoint import TrainState

    return save_checkpoint(run_dir, TrainState(step=step, data={"step": step}), world=WORLD, peft_model=None,
                           engine=OptimizerOnly(), keep_last=keep_last, **kwargs)


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

    def crash(model, out, state_dict=None):
        raise OSError("disk full")

    monkeypatch.setattr("vlora.model.save_adapter", crash)
    with pytest.raises(OSError):
        _save(tmp_path, 4)
    assert _pointer(tmp_path) == "step_00000002"
    assert not step_dir(tmp_path, 4).exists()  # never published half-written
    assert (tmp_path / ".tmp-step_00000004").is_dir()

    monkeypatch.setattr("vlora.model.save_adapter", fake_adapter)
    _save(tmp_path, 4)  # the same step saved again: the stale temporary folder is replaced, not merged into
    assert _pointer(tmp_path) == "step_00000004"
    assert not (tmp_path / ".tmp-step_00000004").exists()
    assert (step_dir(tmp_path, 4) / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"


def test_a_stale_temporary_folder_of_another_step_is_removed(tmp_path, fake_adapter, monkeypatch):
    """Killed while saving step 4, resumed with a save_every that never saves step 4 again: the dead save's
    temporary folder (a whole adapter + optimizer state at real sizes) should not stay forever."""
    def killed(model, out, state_dict=None):
        raise OSError("killed")

    monkeypatch.setattr("vlora.model.save_adapter", killed)
    with pytest.raises(OSError):
        _save(tmp_path, 4)
    assert (tmp_path / ".tmp-step_00000004").is_dir()
    monkeypatch.setattr("vlora.model.save_adapter", fake_adapter)
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


def test_a_step_saved_again_is_reused_not_rewritten(tmp_path, fake_adapter, monkeypatch):
    """A stop signal right after a periodic save, a resume that stops at once, a finished run resumed: the same
    step is saved again. The complete folder is kept as it is: nothing is deleted, nothing can be lost."""
    final = _save(tmp_path, 2)
    before = {p.name: p.stat().st_ino for p in final.iterdir()}

    def must_not_write(*args, **kwargs):
        raise AssertionError("the reused checkpoint was written again")

    monkeypatch.setattr("vlora.model.save_adapter", must_not_write)
    assert _save(tmp_path, 2, reuse=True, preempted=True) == final
    assert {p.name: p.stat().st_ino for p in final.iterdir()} == before
    assert _pointer(tmp_path) == "step_00000002" and (tmp_path / "PREEMPTED").read_text() == "2\n"


def test_a_kill_while_replacing_a_step_never_leaves_latest_naming_nothing(tmp_path, fake_adapter, monkeypatch):
    """An abandoned attempt's step_4 is replaced by a new save of step 4, and the save dies between moving the old
    folder out and renaming the new one in (today's main deleted step_4 first: `latest` then named nothing and
    run.resume=auto started over at step 0). auto now resumes from a complete step 4."""
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    real_replace = os.replace

    def die_on_publish(src, dst):
        if Path(src).name == ".tmp-step_00000004":
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", die_on_publish)
    with pytest.raises(OSError):
        _save(tmp_path, 4)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert _pointer(tmp_path) == "step_00000004"
    found = resolve_resume(tmp_path, "auto")
    assert found is not None and json.loads((found / "train_state.json").read_text())["step"] == 4
    # The next save cleans up: the moved-aside folder and the dead save's temporary one are gone.
    _save(tmp_path, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000006"]


@pytest.mark.parametrize("failpoint", ["save:begin", "save:rank_files", "save:before_rename", "save:after_rename",
                                       "save:after_latest", "save:end"])
def test_a_save_killed_at_any_failpoint_resumes_from_a_complete_checkpoint(tmp_path, fake_adapter, monkeypatch,
                                                                           failpoint):
    _save(tmp_path, 2)
    monkeypatch.setenv("VLORA_FAILPOINTS", f"raise@{failpoint}:step4")
    with pytest.raises(RuntimeError, match="failpoint"):
        _save(tmp_path, 4)
    found = resolve_resume(tmp_path, "auto")
    # `latest` decides while it names a complete folder: step 4, renamed into place but not yet named, is not
    # taken over it (a newer folder may be an abandoned attempt's)
    published = failpoint in ("save:after_latest", "save:end")
    assert found == step_dir(tmp_path, 4 if published else 2)
    monkeypatch.delenv("VLORA_FAILPOINTS")
    _save(tmp_path, 6)
    assert not list(tmp_path.glob(".*step_*"))


def test_resume_auto_falls_back_to_the_newest_complete_checkpoint_and_says_so(tmp_path, fake_adapter, caplog):
    _save(tmp_path, 2, keep_last=5)
    _save(tmp_path, 4, keep_last=5)
    (step_dir(tmp_path, 4) / "rank00000.json").unlink()  # incomplete
    (tmp_path / "latest").write_text("step_00000006\n")  # names a folder that is not there
    with caplog.at_level("WARNING", logger="vlora"):
        assert resolve_resume(tmp_path, "auto") == step_dir(tmp_path, 2)
    assert any("names step_00000006, which is missing or incomplete; resuming from step_00000002" in r.message
               for r in caplog.records)
    # no `latest` at all (killed between the first publish and the pointer): the newest complete folder
    (tmp_path / "latest").unlink()
    assert resolve_resume(tmp_path, "auto") == step_dir(tmp_path, 2)


def test_resume_auto_refuses_when_latest_names_nothing_complete(tmp_path, fake_adapter):
    (tmp_path / "latest").write_text("step_00000006\n")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(VloraError) as e:
        resolve_resume(tmp_path, "auto")
    assert "\n" not in str(e.value) and "names step_00000006, which is missing or incomplete" in str(e.value)


@pytest.mark.parametrize("pointer", ["../../etc", "/tmp/x", "step_00000002/../../elsewhere", "adapter"])
def test_latest_must_name_a_step_folder_of_the_run(tmp_path, fake_adapter, pointer):
    _save(tmp_path, 2)
    (tmp_path / "latest").write_text(pointer + "\n")
    with pytest.raises(VloraError) as e:
        resolve_resume(tmp_path, "auto")
    assert "\n" not in str(e.value) and "not a step_NNNNNNNN folder of this run" in str(e.value)
    assert checkpoint.latest_checkpoint(tmp_path) is None


def test_rng_states_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    checkpoint.save_rng_states(tmp_path / "rng.safetensors", checkpoint.rng_states())
    expected = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    checkpoint.set_rng_states(checkpoint.load_rng_states(tmp_path / "rng.safetensors"))
    got = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2:] == expected[2:]
    assert (tmp_path / "rng.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


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
            cwd=REPO, env=clean_env(VLORA_FAILPOINTS="sleep=4@save:rank_files"), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            tmp4 = run / ".tmp-step_00000004"
            wait_until(lambda: (tmp4 / "rank00000.json").is_file(), 240, "the step-4 save began", proc=proc, log=log)
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


# ---- no pickle on resume ----------------------------------------------------------------------------------


RESUME_FILES = ["train_state.json", "rank00000.json", "rng.rank00000.safetensors", "optimizer.rank00000.pt",
                "adapter/adapter_model.safetensors"]


def test_every_file_a_resume_reads_refuses_a_planted_pickle(tiny_model_dir, demo_shards, tmp_path, monkeypatch):
    """A pickle planted in each file a DDP resume reads: refused in one line naming the file, and the planted
    code never runs (its marker file is not created). The untouched checkpoint loads."""
    import shutil

    from vlora.config import load_config, validate
    from vlora.engine import Engine
    from vlora.model import SupervisedLoss
    from vlora.optim import build_optimizer, resolve_precision
    from vlora.checkpoint import TrainState

    overrides = {"optim.max_steps": 2, "optim.global_batch": 2, "optim.micro_batch": 2, "data.val": "",
                 "run.plot": "false"}
    result = train_in_process(monkeypatch, tiny_model_dir, demo_shards, tmp_path, **overrides)
    good = tmp_path / "t" / "step_00000002"
    cfg = load_config(None, run_overrides(tiny_model_dir, demo_shards, tmp_path / "unused", **overrides))
    engine = Engine(cfg, validate(cfg), WORLD, resolve_precision(cfg, WORLD.device))
    model = result.model
    engine.prepare(SupervisedLoss(model), build_optimizer(model, cfg.optim, WORLD.device))
    state = TrainState()
    checkpoint.load_checkpoint(good, state, world=WORLD, peft_model=model, engine=engine)
    assert state.step == 2 and state.data is not None and state.rng is not None

    assert sorted(str(p.relative_to(good)) for p in good.rglob("*") if p.is_file() and p.name != "config.yaml"
                  and p.parent.name != "adapter" or p.name == "adapter_model.safetensors") == sorted(RESUME_FILES)
    for name in RESUME_FILES:
        bad = tmp_path / f"bad-{name.replace('/', '-')}"
        shutil.copytree(good, bad)
        marker = tmp_path / f"ran-{name.replace('/', '-')}"
        torch.save(Planted(marker), bad / name)
        with pytest.raises(VloraError) as e:
            checkpoint.load_checkpoint(bad, TrainState(), world=WORLD, peft_model=model, engine=engine)
        assert str(bad / name) in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        assert not marker.exists(), name


def test_train_py_refuses_a_planted_optimizer_pickle_in_one_line(tiny_model_dir, demo_shards, tmp_path):
    """Through train.py: today's main failed here with a traceback from torch.load."""
    common = {"optim.max_steps": 2, "optim.global_batch": 2, "optim.micro_batch": 2, "data.val": "",
              "run.plot": "false", "data.num_workers": 0}
    proc = subprocess.run([sys.executable, "train.py", *run_overrides(tiny_model_dir, demo_shards, tmp_path,
                                                                       **common)],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = tmp_path / "ran"
    torch.save(Planted(marker), tmp_path / "t" / "step_00000002" / "optimizer.rank00000.pt")
    proc = subprocess.run([sys.executable, "train.py", *run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
                                                                       **common, "run.resume": "auto",
                                                                       "optim.max_steps": 3})],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not marker.exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlora: error:")]
    assert len(errors) == 1 and "optimizer.rank00000.pt is not a plain tensor file; refused to unpickle" in errors[0]
    assert "Traceback" not in proc.stderr
