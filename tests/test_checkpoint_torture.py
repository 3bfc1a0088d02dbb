"""Checkpoint torture: a run SIGKILLed again and again, at random moments and at every named point of a save
(the pre-emption save right after a periodic one included), each time continued with run.resume=auto, ends with
the uninterrupted run's adapter bytes, and every step it logged (repeats included) has the uninterrupted loss.

The runs are processes forked from a server that has torch, transformers and peft imported already
(multiprocessing's forkserver), so a run costs its model load and steps, not 10 s of imports: 30+ kills fit in a
few minutes on 2 cores. Each run is vlora.train.main() in a world of one, killed with a real SIGKILL.
"""

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from helpers import read_jsonl, run_overrides
from vlora.checkpoint import resolve_resume
from vlora.failpoints import SAVE_POINTS

STEPS, SAVE_EVERY = 10, 2
CONFIG = {"optim.max_steps": STEPS, "optim.global_batch": 2, "optim.micro_batch": 2, "optim.warmup_steps": 2,
          "optim.lr": 5e-3, "lora.dropout": 0.1, "run.save_every": SAVE_EVERY, "run.keep_last": 2,
          "run.log_every": 1, "data.val": "", "data.num_workers": 0, "run.plot": "false", "run.progress": "false"}
SEED = 1234
KILLS = 30


def _run(argv: list[str], failpoints: str, log: str) -> None:
    """A training run in a forked child: its own log file, its failpoints, vlora.train.main; exits with its status."""
    import sys

    import torch

    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "VLORA_FAILPOINTS"):
        os.environ.pop(var, None)
    if failpoints:
        os.environ["VLORA_FAILPOINTS"] = failpoints
    from vlora.train import main

    os._exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "bitsandbytes", "webdataset", "vlora.train",
                                "vlora.model", "vlora.engine", "vlora.data.collate", "vlora.data.stream",
                                "test_checkpoint_torture"])
    warm = ctx.Process(target=time.sleep, args=(0,))  # the server starts and imports once, outside any timing
    warm.start()
    warm.join()
    return ctx


def attempt(ctx, argv, log: Path, *, failpoints: str = "", kill_after: float | None = None) -> int:
    """One run; SIGKILLed from outside after `kill_after` seconds if it is still going. Its exit status."""
    proc = ctx.Process(target=_run, args=(argv, failpoints, str(log)))
    proc.start()
    proc.join(kill_after if kill_after is not None else 300)
    if proc.is_alive():
        if kill_after is None:
            proc.kill()
            raise AssertionError(f"a run took over 300 s:\n{log.read_text()[-3000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    return proc.exitcode


def step_losses(run: Path) -> list[tuple[int, float]]:
    """Every training record's (step, loss), repeats of a step by later attempts included."""
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl", torn_ok=True) if "loss" in r]


def saved_step(run: Path) -> int:
    """The step the next attempt resumes from (0: none yet), as run.resume=auto finds it."""
    found = resolve_resume(run, "auto") if run.is_dir() else None
    return json.loads((found / "train_state.json").read_text())["step"] if found else 0


def next_kill(rng: random.Random, kind: str, run: Path, run_seconds: float) -> dict:
    """The next way to die, for a run that resumes at `saved_step(run)`: every named save point (at a save still
    ahead), a pre-emption right after a periodic save (clean, or killed inside the pre-emption save), the start of
    a step, and random moments, in turn."""
    done = saved_step(run)
    ahead = [s for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY) if s > done]
    if done == STEPS:  # the last checkpoint is saved: let this attempt finish the chain
        return {"why": "finish"}
    if kind in SAVE_POINTS and ahead:
        return {"failpoints": f"kill@{kind}:step{rng.choice(ahead)}", "why": kind}
    if kind == "preempt" and ahead[:-1]:
        step = rng.choice(ahead[:-1])
        second = rng.choice(["term@save:end:step{s}:hit1", "term@save:end:step{s}:hit1,kill@save:end:step{s}:hit2"])
        return {"failpoints": second.format(s=step), "why": "pre-emption right after a periodic save"}
    if kind == "step" and done < STEPS:
        return {"failpoints": f"kill@step:step{rng.randint(done + 1, STEPS)}", "why": "start of a step"}
    # a random moment: model loading, a step, a save, the end; the shorter the work left, the sooner
    left = (STEPS - done) / STEPS
    return {"kill_after": rng.uniform(0.2, run_seconds * (0.3 + 0.7 * left)), "why": "random moment"}


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_auto_gives_the_uninterrupted_run(forkserver, tiny_model_dir, demo_shards,
                                                                       tmp_path):
    reference = tmp_path / "ref"
    started = time.monotonic()
    assert attempt(forkserver, run_overrides(tiny_model_dir, demo_shards, tmp_path, **CONFIG, **{"run.name": "ref"}),
                   tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()[-3000:]
    run_seconds = time.monotonic() - started
    expected = dict(step_losses(reference))
    assert sorted(expected) == list(range(1, STEPS + 1))

    def check(run: Path) -> None:
        """A finished chain: the reference's adapter bytes, and every logged step (repeats too) its loss."""
        assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
            (reference / "adapter" / "adapter_model.safetensors").read_bytes(), run
        logged = step_losses(run)
        assert {s for s, _ in logged} == set(range(1, STEPS + 1)), run
        for step, loss in logged:
            assert loss == pytest.approx(expected[step], rel=0, abs=1e-6), (run, step, loss, expected[step])
        assert (run / "latest").read_text().strip() == f"step_{STEPS:08d}"
        assert not list(run.glob(".*step_*"))  # no leftovers of killed saves once the run has saved again

    # Chains of attempts in one run folder each: every attempt resumes (auto) where the last one died; when an
    # attempt gets to the end, its chain is checked and the next chain starts in a new folder.
    rng = random.Random(SEED)
    kinds = [*SAVE_POINTS, "preempt", "preempt", "step", "random", "random", "random", "random"]
    rng.shuffle(kinds)
    chains, survived, outcomes = 0, 0, []
    while survived < KILLS:
        assert len(outcomes) < 4 * KILLS, outcomes
        name = f"cut{chains}"
        argv = run_overrides(tiny_model_dir, demo_shards, tmp_path, **CONFIG, **{"run.name": name,
                                                                                 "run.resume": "auto"})
        log = tmp_path / f"{name}.log"
        kill = next_kill(rng, kinds[len(outcomes) % len(kinds)], tmp_path / name, run_seconds)
        status = attempt(forkserver, argv, log, failpoints=kill.get("failpoints", ""),
                         kill_after=kill.get("kill_after"))
        outcomes.append((kill["why"], status))
        # killed (SIGKILL), pre-empted (143), or it reached the end first (0)
        assert status in (-signal.SIGKILL, 143, 0), (kill, status, log.read_text()[-3000:])
        survived += status == -signal.SIGKILL
        if status == 0:
            # a resume of the finished run saves nothing new and changes no byte
            assert attempt(forkserver, argv, log) == 0, log.read_text()[-3000:]
            check(tmp_path / name)
            chains += 1
    name = f"cut{chains}"
    argv = run_overrides(tiny_model_dir, demo_shards, tmp_path, **CONFIG, **{"run.name": name, "run.resume": "auto"})
    while attempt(forkserver, argv, tmp_path / f"{name}.log") == 143:
        pass
    check(tmp_path / name)
    elapsed = time.monotonic() - started

    print(f"\ntorture: {survived} SIGKILLs survived in {len(outcomes)} attempts over {chains + 1} chains, "
          f"{elapsed:.0f} s (an uninterrupted run {run_seconds:.1f} s); {outcomes}")
    assert survived >= 30, outcomes
